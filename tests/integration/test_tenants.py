"""Many tenants on one server: the token policy matrix, cost quotas, reload without loss, fair
share on the tiny model, and the access log. A real server on loopback, a real client."""

from __future__ import annotations

import json
import logging
import queue
import threading
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from imagegen_client import Adapter, OutputFormat, RetryPolicy
from imagegen_server.api.access_log import ACCESS_LOGGER, JsonFormatter
from support import StreamWatcher, start_server

NO_RETRY = RetryPolicy(max_attempts=1)
NPY = OutputFormat.NPY
ADMIN = "admin-token-0123456789ab"
CAPPED = "capped-token-0123456789"
LIGHT = "light-token-0123456789"
HEAVY = "heavy-token-0123456789"
THRIFTY = "thrifty-token-0123456789"
COST_64 = 64 * 64 * 4 / 1e6  # one 64x64 image, 4 steps, no CFG: megapixel-steps

POLICY = f"""
tenants:
  light: {{weight: 1}}
  heavy: {{weight: 3}}
  thrifty: {{per_day: {COST_64 * 8}}}  # a UTC day: no window rolls over mid-test
tokens:
  - {{name: ops, token: {ADMIN}, role: admin}}
  - name: capped
    token: {CAPPED}
    role: client
    tenant: light
    priority: {{highest: 2}}
    adapters: ["ink"]
    variants: ["fast*"]
  - {{name: light, token: {LIGHT}, role: client, tenant: light}}
  - {{name: heavy, token: {HEAVY}, role: client, tenant: heavy}}
  - {{name: thrifty, token: {THRIFTY}, role: client, tenant: thrifty}}
"""


def write_tokens(directory: Path, text: str = POLICY) -> Path:
    path = directory / "tokens.yaml"
    path.write_text(text)
    return path


def start(server_factory: Any, tmp_path: Path, tiny_model: Path, **overrides: Any) -> Any:
    return server_factory(
        auth_tokens_file=str(write_tokens(tmp_path)),
        auth_tokens_poll_s=0,
        adapter_dir=str(tiny_model / "adapters"),
        preload_adapters=["ink", "neon"],
        **overrides,
    )


def raw_generate(server: Any, token: str, **fields: Any) -> pb.GenerateResponse:
    """Generate through the generated stub: sets fields the typed client may not know yet."""
    with grpc.insecure_channel(server.target) as channel:
        response: pb.GenerateResponse = pb_grpc.ImageGenerationStub(channel).Generate(
            pb.GenerateRequest(prompt="p", **fields),
            metadata=(("authorization", f"Bearer {token}"),),
        )
        return response


def refused(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failure:
        call()
    return failure.value


# Two variants without LoRAs, for the policy's variant patterns ("fast*" allows only the first).
POLICY_VARIANTS = [
    {"name": "fast-4", "default_steps": 4, "min_steps": 2, "max_steps": 4, "default": True},
    {"name": "full", "default_steps": 4, "min_steps": 2, "max_steps": 8},
]


def test_the_policy_matrix(server_factory: Any, tmp_path: Path, tiny_model: Path) -> None:
    server = start(
        server_factory, tmp_path, tiny_model, variants=POLICY_VARIANTS, default_steps=None
    )
    capped = server.client(token=CAPPED, retry=NO_RETRY)
    admin = server.client(token=ADMIN, retry=NO_RETRY)
    result = capped.generate("ok", priority=2, adapters=[Adapter("ink", 1.0)])
    assert result.cost == pytest.approx(COST_64)
    assert raw_generate(server, CAPPED, priority=2, variant="fast-4").images
    assert capped.server_info().cost_unit == "megapixel-step"
    cases = {
        "priority": lambda: capped.generate("urgent", priority=1),
        "adapters": lambda: capped.generate("neon", priority=2, adapters=[Adapter("neon", 1.0)]),
        "variant": lambda: raw_generate(server, CAPPED, priority=2, variant="full"),
        "admin role": capped.list_adapters,
    }
    for field, call in cases.items():
        error = refused(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, field
        assert field.split()[0] in error.details(), (field, error.details())
    assert raw_generate(server, ADMIN, priority=1, variant="full").images
    assert {adapter.name for adapter in admin.list_adapters() if adapter.loaded} >= {"ink"}


def test_the_policy_matrix_over_http(server_factory: Any, tmp_path: Path, tiny_model: Path) -> None:
    server = start(
        server_factory,
        tmp_path,
        tiny_model,
        variants=POLICY_VARIANTS,
        default_steps=None,
        http_port=0,
    )

    def api(token: str) -> openai.OpenAI:
        url = f"http://127.0.0.1:{server.server.http_port}/v1"
        return openai.OpenAI(base_url=url, api_key=token, max_retries=0)

    allowed = {"priority": 2, "adapters": ["ink"]}
    capped = api(CAPPED)
    assert capped.images.generate(prompt="ok", model="fast-4", size="64x64", extra_body=allowed)
    cases = {
        "priority": {"extra_body": {"priority": 1}},
        "adapters": {"extra_body": {"priority": 2, "adapters": ["neon"]}},
        "variant": {"model": "full", "extra_body": {"priority": 2}},
    }
    for field, options in cases.items():
        with pytest.raises(openai.PermissionDeniedError) as denied:
            capped.images.generate(prompt="x", size="64x64", **options)
        assert field in str(denied.value.body["param"]), (field, denied.value.body)
    assert [model.id for model in capped.models.list().data][1:] == ["fast-4", "full"]
    thrifty = api(THRIFTY)
    thrifty.images.generate(prompt="big", n=4, size="64x64")
    thrifty.images.generate(prompt="big", n=4, size="64x64")
    with pytest.raises(openai.RateLimitError) as limited:
        thrifty.images.generate(prompt="one more", size="64x64")
    assert 0 < int(limited.value.response.headers["retry-after"]) <= 86_400


def test_a_spent_quota_is_resource_exhausted_with_retry_after(
    server_factory: Any, tmp_path: Path, tiny_model: Path
) -> None:
    server = start(server_factory, tmp_path, tiny_model)
    thrifty = server.client(token=THRIFTY, retry=NO_RETRY)
    thrifty.generate("big", num_images=4)  # 4 of the day's 8 units of one image
    thrifty.generate("big", num_images=4)
    error = refused(lambda: thrifty.generate("one more"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "thrifty" in error.details()
    assert 0 < int(dict(error.trailing_metadata())["retry-after-ms"]) <= 86_400_000
    assert server.client(token=LIGHT).generate("other tenants are unaffected").images
    metrics = server.metrics()
    assert metrics['imagegen_tenant_cost_admitted_total{tenant="thrifty"}'] == pytest.approx(
        8 * COST_64
    )
    key = 'imagegen_tenant_requests_total{code="RESOURCE_EXHAUSTED",tenant="thrifty"}'
    assert metrics[key] == 1


def test_a_reload_applies_to_new_calls_and_keeps_running_ones(
    server_factory: Any, tmp_path: Path, tiny_model: Path
) -> None:
    server = start(server_factory, tmp_path, tiny_model, step_budget=0)
    running = StreamWatcher(server.client(token=LIGHT, retry=NO_RETRY), "in flight", steps=4)
    running.queued()
    server.batcher.set_step_budget(1)
    running.step(1)
    write_tokens(tmp_path, POLICY.replace(f"token: {LIGHT}", "token: rotated-light-0123456789"))
    assert server.server.tokens.reload()
    server.batcher.set_step_budget(None)
    assert running.completed().result.images  # admitted under the old file: it finishes
    error = refused(lambda: server.client(token=LIGHT, retry=NO_RETRY).generate("new"))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert server.client(token="rotated-light-0123456789").generate("new").images
    write_tokens(tmp_path, "tokens:\n  - {name: broken, role: client}\n")
    assert not server.server.tokens.reload()  # refused: the previous file stays in force
    assert server.client(token="rotated-light-0123456789").generate("still").images


def test_two_tenants_weighted_1_to_3_share_the_engine_1_to_3(
    server_factory: Any, tmp_path: Path, tiny_model: Path
) -> None:
    """Both flood a one-row engine with equal requests; of the first 8 served, the weight-3
    tenant gets 6 and the weight-1 tenant 2. Tolerance: one request either way."""
    server = start(
        server_factory, tmp_path, tiny_model, step_budget=0, max_batch_size=1, max_num_images=1
    )
    served: queue.Queue[str] = queue.Queue()
    watchers = []
    for tenant, token in (("light", LIGHT), ("heavy", HEAVY)):
        client = server.client(token=token, retry=NO_RETRY)
        watchers += [(tenant, StreamWatcher(client, f"{tenant} {i}", seed=i)) for i in range(8)]
    for _, watcher in watchers:
        watcher.queued()
    for tenant, watcher in watchers:
        threading.Thread(
            target=lambda t=tenant, w=watcher: (w.completed(), served.put(t)), daemon=True
        ).start()
    server.batcher.set_step_budget(8 * 4)  # exactly 8 requests of 4 steps, then hold
    first = [served.get(timeout=60) for _ in range(8)]
    assert 5 <= first.count("heavy") <= 7, first
    server.batcher.set_step_budget(None)
    rest = [served.get(timeout=60) for _ in range(8)]
    assert sorted(first + rest) == ["heavy"] * 8 + ["light"] * 8


class Lines(logging.Handler):
    """The access log as JSON lines, as `--log-format json` writes them."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []
        self._written = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._written:
            self.lines.append(self.format(record))
            self._written.notify_all()

    def wait_for(self, count: int) -> None:
        with self._written:
            assert self._written.wait_for(lambda: len(self.lines) >= count, timeout=60)

    def parsed(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]


@pytest.fixture
def access_lines() -> Any:
    handler = Lines()
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)


FIELDS = {
    "event", "request_id", "tenant", "method", "protocol", "width", "height", "steps", "images",
    "variant", "adapters", "status", "queue_s", "compute_s", "total_s", "max_batch",
    "mean_batch", "bytes_out", "cost",
}  # fmt: skip


def test_one_access_line_per_call_success_failure_cancel_and_rejection(
    server_factory: Any, tmp_path: Path, tiny_model: Path, access_lines: Lines
) -> None:
    server = start(server_factory, tmp_path, tiny_model, fault_injection_request_marker="poison")
    light = server.client(token=LIGHT, retry=NO_RETRY)
    light.generate("a secret prompt", request_id="ok-1", num_images=2, output_format=NPY)
    refused(lambda: light.generate("x", request_id="poison-1"))
    refused(lambda: server.client(token="nobody-0123456789abc", retry=NO_RETRY).generate("x"))
    thrifty = server.client(token=THRIFTY, retry=NO_RETRY)
    refused(lambda: thrifty.generate("x", request_id="too-big", num_images=4, steps=16))
    server.batcher.set_step_budget(0)
    with grpc.insecure_channel(server.target) as channel:
        stream = pb_grpc.ImageGenerationStub(channel).StreamProgress(
            pb.GenerateRequest(prompt="x", request_id="cancel-1"),
            metadata=(("authorization", f"Bearer {LIGHT}"),),
        )
        assert next(stream).HasField("queued")
        stream.cancel()
    access_lines.wait_for(5)
    server.batcher.set_step_budget(None)
    by_status = {}
    for line in access_lines.parsed():
        by_status[line["status"]] = line
    ok = by_status["OK"]
    assert set(ok) >= FIELDS and "prompt" not in ok and "secret" not in json.dumps(ok)
    assert (ok["request_id"], ok["tenant"], ok["method"], ok["images"]) == (
        "ok-1", "light", "Generate", 2
    )  # fmt: skip
    assert ok["bytes_out"] > 64 * 64 * 3 * 4 * 2 and ok["max_batch"] == 2 and ok["total_s"] > 0
    assert by_status["INTERNAL"]["request_id"] == "poison-1"
    assert by_status["UNAUTHENTICATED"]["tenant"] == ""
    assert by_status["PERMISSION_DENIED"]["request_id"] == "too-big"  # over the whole day's quota
    cancel = by_status["CANCELLED"]
    assert (cancel["request_id"], cancel["method"], cancel["compute_s"]) == (
        "cancel-1", "StreamProgress", 0
    )  # fmt: skip
    assert len(access_lines.lines) == 5


def test_http_image_requests_get_their_access_line_and_tenant_count(
    server_factory: Any, tmp_path: Path, tiny_model: Path, access_lines: Lines
) -> None:
    server = start(server_factory, tmp_path, tiny_model, http_port=0)
    api = openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key=LIGHT, max_retries=0
    )
    ok = {"X-Request-Id": "http-ok"}
    api.images.generate(prompt="a secret prompt", size="64x64", n=2, extra_headers=ok)
    streamed = {"X-Request-Id": "http-stream"}
    assert list(api.images.generate(prompt="s", size="64x64", stream=True, extra_headers=streamed))
    with pytest.raises(openai.BadRequestError):
        api.images.generate(prompt="x", size="13x7", extra_headers={"X-Request-Id": "http-bad"})
    access_lines.wait_for(3)
    lines = {line["request_id"]: line for line in access_lines.parsed()}
    for request_id, method, status in (
        ("http-ok", "Generate", "OK"),
        ("http-stream", "StreamProgress", "OK"),
        ("http-bad", "Generate", "INVALID_ARGUMENT"),
    ):
        line = lines[request_id]
        assert (line["protocol"], line["method"], line["status"]) == ("http", method, status)
        assert line["tenant"] == "light"  # from the token, even when validation refuses
    assert set(lines["http-ok"]) >= FIELDS and "secret" not in json.dumps(lines["http-ok"])
    assert lines["http-ok"]["images"] == 2 and lines["http-ok"]["bytes_out"] > 0
    assert lines["http-ok"]["max_batch"] >= 1 and lines["http-ok"]["total_s"] > 0
    assert "width" in lines["http-bad"]["error"]
    metrics = server.metrics()
    assert metrics['imagegen_tenant_requests_total{code="OK",tenant="light"}'] == 2
    assert metrics['imagegen_tenant_requests_total{code="INVALID_ARGUMENT",tenant="light"}'] == 1


def test_a_charge_is_given_back_when_its_request_never_runs_a_step(
    server_factory: Any, tmp_path: Path, tiny_model: Path
) -> None:
    server = start(server_factory, tmp_path, tiny_model, max_queue_size=1, step_budget=0)
    light = server.client(token=LIGHT, retry=NO_RETRY)
    thrifty = server.client(token=THRIFTY, retry=NO_RETRY)
    holder = StreamWatcher(light, "holds the only queue slot", request_id="holder")
    holder.queued()
    full = refused(lambda: thrifty.generate("refused by the full queue", num_images=4))
    assert full.code() == grpc.StatusCode.UNAVAILABLE
    assert light.cancel(request_id="holder") == "queued"
    assert holder.error().code() == grpc.StatusCode.CANCELLED
    waiting = StreamWatcher(thrifty, "cancelled while queued", request_id="waiting", num_images=4)
    waiting.queued()
    assert thrifty.cancel(request_id="waiting") == "queued"
    assert waiting.error().code() == grpc.StatusCode.CANCELLED
    server.batcher.set_step_budget(None)
    # The day's 8 units are all there: neither request above ran a step.
    thrifty.generate("the first half of the day", num_images=4)
    thrifty.generate("the second half", num_images=4)
    assert refused(lambda: thrifty.generate("over")).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    metrics = server.metrics()
    refunded = metrics['imagegen_tenant_cost_refunded_total{tenant="thrifty"}']
    assert refunded == pytest.approx(8 * COST_64)
    admitted = metrics['imagegen_tenant_cost_admitted_total{tenant="thrifty"}']
    assert admitted == pytest.approx(16 * COST_64)


def test_a_keyed_request_is_accounted_when_it_ends_not_when_its_caller_leaves(
    server_factory: Any, tmp_path: Path, tiny_model: Path
) -> None:
    server = start(server_factory, tmp_path, tiny_model, step_budget=0)
    keyed = {"prompt": "p", "seed": 7, "idempotency_key": "outlives-its-caller"}
    with grpc.insecure_channel(server.target) as channel:
        stream = pb_grpc.ImageGenerationStub(channel).StreamProgress(
            pb.GenerateRequest(**keyed), metadata=(("authorization", f"Bearer {LIGHT}"),)
        )
        assert next(stream).HasField("queued")
        stream.cancel()  # the caller leaves; the keyed job runs on
    server.batcher.set_step_budget(None)
    assert raw_generate(server, LIGHT, seed=7, idempotency_key="outlives-its-caller").images
    metrics = server.metrics()
    served = metrics['imagegen_tenant_cost_served_total{tenant="light"}']
    assert served == pytest.approx(COST_64)  # once, by the job: the repeat joined it
    assert metrics['imagegen_tenant_queue_seconds_count{tenant="light"}'] == 1


def test_sqlite_quota_state_survives_a_restart(
    server_factory: Any, tmp_path: Path, tiny_model: Path
) -> None:
    store = f"sqlite:{tmp_path / 'quota.db'}"
    before = start_server(
        tiny_model,
        auth_tokens_file=str(write_tokens(tmp_path)),
        auth_tokens_poll_s=0,
        quota_store=store,
    )
    try:
        thrifty = before.client(token=THRIFTY, retry=NO_RETRY)
        thrifty.generate("most of the day", num_images=4)
        thrifty.generate("most of the day", num_images=3)
    finally:
        before.stop()  # the restart: a new server process state, the same file
    after = start(server_factory, tmp_path, tiny_model, quota_store=store)
    thrifty = after.client(token=THRIFTY, retry=NO_RETRY)
    thrifty.generate("the last unit")
    error = refused(lambda: thrifty.generate("over"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

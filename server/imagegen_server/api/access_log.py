"""One access-log line per finished generation request, and the JSON form of the server's logs.

The gRPC interceptor opens an `AccessRecord` for every Generate and StreamProgress call (so
calls refused before the servicer runs, by the token check or a malformed message, get their
line too), and the HTTP edge one for every image request (`http_calls.py`, protocol `http`);
the servicer fills in what it learns (tenant, parameters, timings, bytes out); the edge writes
the line with the final status. Lines go to the `imagegen.access` logger:
`key=value` pairs in text mode, one JSON object per line with `--log-format json`. Prompt text
is left out unless `--log-prompts` is set: prompts may hold personal data.
"""

from __future__ import annotations

import json
import logging
import re
import time
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any

from ..base.request import Request
from ..base.types import GenerationParams
from .policy import TokenPolicy

ACCESS_LOGGER = "imagegen.access"
MAX_LOGGED_ID_CHARS = 128  # a refused request's id is unchecked: log no more than a valid one
PLAIN = re.compile(r"^[A-Za-z0-9._:/@+-]+$")  # text-mode values written without quotes
access_log = logging.getLogger(ACCESS_LOGGER)


@dataclass(slots=True)
class AccessRecord:
    """What one access-log line says; durations in seconds, sizes in pixels."""

    method: str  # the RPC's name: Generate, StreamProgress
    protocol: str = "grpc"  # the edge it came in through: grpc or http
    request_id: str = ""  # the client's id ("" until validated)
    tenant: str = ""  # the token's tenant; "" = no token policy (no auth)
    token: str = ""  # the token entry's name in the tokens file (never the token)
    status: str = ""  # final status code name: OK, RESOURCE_EXHAUSTED, CANCELLED, ...
    width: int = 0
    height: int = 0
    steps: int = 0
    images: int = 0
    priority: int = 0
    variant: str = ""  # the variant asked for ("" = the default)
    adapters: list[str] = field(default_factory=list)  # adapter names it used
    cost: float = 0.0  # megapixel-steps charged (base/cost.py)
    queue_s: float = 0.0  # accepted to first step (0 if it never started)
    compute_s: float = 0.0  # first step to its end
    total_s: float = 0.0  # the whole RPC, as the server saw it
    max_batch: int = 0  # most rows of a transformer call it stepped in
    mean_batch: float = 0.0  # mean rows of the transformer calls it stepped in
    bytes_out: int = 0  # encoded image bytes sent
    error: str = ""  # the status message when it failed
    prompt: str | None = None  # only with --log-prompts
    started: float = field(default_factory=time.perf_counter, repr=False)  # not logged

    def note_policy(self, policy: TokenPolicy | None) -> None:
        """Who the call is billed to, once the token check has named it (so a request refused
        later, by validation or a quota, still says whose it was)."""
        if policy is not None:
            self.tenant, self.token = policy.tenant.name, policy.name

    def note_params(self, params: GenerationParams, variant: str, with_prompt: bool) -> None:
        self.request_id = params.request_id
        self.width, self.height, self.steps = params.width, params.height, params.steps
        self.images, self.priority, self.variant = params.num_images, params.priority, variant
        self.adapters = [spec.name for spec in params.adapters]
        if with_prompt:
            self.prompt = params.prompt

    def note_run(self, request: Request, now: float) -> None:
        """Timings and batch sizes from the scheduler's request (on the batcher's clock)."""
        if request.started_at is not None:
            self.queue_s = request.started_at - request.arrival
            self.compute_s = now - request.started_at
        else:
            self.queue_s = now - request.arrival
        self.max_batch, self.mean_batch = request.max_batch, round(request.mean_batch, 3)

    def fields(self) -> dict[str, Any]:
        values = asdict(self)
        del values["started"]
        if values["prompt"] is None:
            del values["prompt"]
        for name in ("cost", "queue_s", "compute_s", "total_s"):
            values[name] = round(values[name], 4)
        return values


# The record of the RPC being served (per task, so per RPC); None outside generation calls.
CURRENT_RECORD: ContextVar[AccessRecord | None] = ContextVar("imagegen_access", default=None)


def write(record: AccessRecord, status: str, message: str = "") -> None:
    record.status = status
    record.error = message if status != "OK" else ""
    record.total_s = time.perf_counter() - record.started
    values = record.fields()
    text = " ".join(f"{key}={_text(value)}" for key, value in values.items())
    access_log.info("access %s", text, extra={"access": values})


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(value) or "-"
    if isinstance(value, str):  # quoted (and escaped) unless plainly safe: no log injection
        return value if PLAIN.match(value) else json.dumps(value)
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger and message, or an access line's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if access is not None:
            line.update(event="access", **access)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str, log_format: str) -> None:
    """The root handler: text lines, or JSON lines with `log_format == "json"`."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)

"""Per-request LoRA adapters: several in one batch, loaded and unloaded while serving."""

from __future__ import annotations

import gc
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
import torch
from diffusers import QwenImagePipeline
from imagegen_client import Adapter, OutputFormat, RetryPolicy
from support import ALL_ROWS, StreamWatcher, assert_same_image, pipeline_image, pixels

NPY = OutputFormat.NPY
NO_RETRY = RetryPolicy(max_attempts=1)


def pipeline_with(model: Path, adapters: dict[str, float], directory: Path | None = None) -> Any:
    """QwenImagePipeline with adapters (from `directory`, else the tiny model's) loaded through
    load_lora_weights: the reference."""
    directory = directory or model / "adapters"
    pipeline = QwenImagePipeline.from_pretrained(model, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    for name in adapters:
        pipeline.load_lora_weights(str(directory / f"{name}.safetensors"), adapter_name=name)
    if adapters:
        pipeline.set_adapters(list(adapters), adapter_weights=list(adapters.values()))
    return pipeline


@pytest.fixture(scope="module")
def adapter_server(tiny_model: Path) -> Any:
    from support import start_server

    running = start_server(
        tiny_model,
        adapter_dir=str(tiny_model / "adapters"),
        preload_adapters=["ink", "neon", "sepia", "pastel"],
        max_loaded_adapters=6,
        **ALL_ROWS,
    )
    yield running
    running.stop()


# (prompt, seed, adapters) of the rows in one mixed batch: Kohya, Kohya with alpha != rank,
# PEFT, two at once, none.
MIXED = [
    ("a fox", 1, {"ink": 1.0}),
    ("an owl", 2, {"sepia": 0.7}),
    ("a cat", 3, {"neon": 1.0}),
    ("a dog", 4, {"neon": 1.0, "pastel": 0.5}),
    ("a hen", 5, {}),
]


def test_rows_with_different_adapters_share_a_batch_and_match_the_pipeline(
    adapter_server: Any, tiny_model: Path
) -> None:
    client = adapter_server.client()
    adapter_server.batcher.set_step_budget(0)
    watchers = [
        StreamWatcher(
            client,
            prompt,
            seed=seed,
            output_format=NPY,
            adapters=[Adapter(name, scale) for name, scale in adapters.items()],
        )
        for prompt, seed, adapters in MIXED
    ]
    for watcher in watchers:
        watcher.queued()
    rows_before = adapter_server.metrics().get('imagegen_adapter_rows_total{adapter="neon"}', 0)
    adapter_server.batcher.set_step_budget(None)
    mixed = [watcher.completed().result for watcher in watchers]
    assert {result.batch_size for result in mixed} == {len(MIXED)}  # one transformer batch
    # neon is on two rows of each of the 4 steps.
    assert (
        adapter_server.metrics()['imagegen_adapter_rows_total{adapter="neon"}'] - rows_before == 8
    )
    for result, (prompt, seed, adapters) in zip(mixed, MIXED, strict=True):
        alone = client.generate(
            prompt,
            seed=seed,
            output_format=NPY,
            adapters=[Adapter(name, scale) for name, scale in adapters.items()],
        )
        assert_same_image(pixels(result), pixels(alone))
        assert_same_image(
            pixels(result), pipeline_image(pipeline_with(tiny_model, adapters), prompt, seed)
        )


def test_separate_adapter_batching_keeps_one_adapter_set_per_batch(
    server_factory: Any, tiny_model: Path
) -> None:
    """The comparison mode of the adapter benchmark: rows share a batch only with rows of the
    same adapters, and every image is still the one it would be alone."""
    running = server_factory(
        step_budget=0,
        adapter_dir=str(tiny_model / "adapters"),
        preload_adapters=["ink", "neon"],
        adapter_batching="separate",
        **ALL_ROWS,
    )
    client = running.client()
    rows = [("a fox", 1, "ink"), ("an owl", 2, "ink"), ("a cat", 3, "neon"), ("a hen", 4, "")]
    watchers = [
        StreamWatcher(
            client,
            prompt,
            seed=seed,
            output_format=NPY,
            adapters=[Adapter(name)] if name else [],
        )
        for prompt, seed, name in rows
    ]
    for watcher in watchers:
        watcher.queued()
    running.batcher.set_step_budget(None)
    results = [watcher.completed().result for watcher in watchers]
    assert [result.batch_size for result in results] == [2, 2, 1, 1]
    for result, (prompt, seed, name) in zip(results, rows, strict=True):
        alone = client.generate(
            prompt, seed=seed, output_format=NPY, adapters=[Adapter(name)] if name else []
        )
        assert_same_image(pixels(result), pixels(alone))


def test_an_adapter_changes_the_image_and_scale_zero_is_no_adapter(adapter_server: Any) -> None:
    client = adapter_server.client()
    plain = pixels(client.generate("a fox", seed=1, output_format=NPY))
    zero = pixels(
        client.generate("a fox", seed=1, output_format=NPY, adapters=[Adapter("ink", 0.0)])
    )
    inked = pixels(
        client.generate("a fox", seed=1, output_format=NPY, adapters=[Adapter("ink", 1.0)])
    )
    assert_same_image(zero, plain)
    assert float(np.abs(inked - plain).max()) > 0.01


def test_server_info_and_list_adapters_describe_them(adapter_server: Any) -> None:
    client = adapter_server.client()
    info = client.server_info()
    assert {a.name for a in info.adapters} == {"ink", "neon", "sepia", "pastel"}
    listed = {a.name: a for a in client.list_adapters()}
    assert (listed["ink"].format, listed["ink"].rank) == ("kohya", 4)
    assert (listed["pastel"].format, listed["pastel"].rank) == ("peft", 8)
    assert all(a.loaded for a in listed.values())


@pytest.fixture
def runtime_server(server_factory: Any, tiny_model: Path, tmp_path: Path) -> Any:
    """A server with an adapter directory of its own (copies), nothing preloaded."""
    directory = tmp_path / "adapters"
    directory.mkdir()
    for source in (tiny_model / "adapters").iterdir():
        (directory / source.name).write_bytes(source.read_bytes())
    server = server_factory(adapter_dir=str(directory), max_loaded_adapters=2)
    server.directory = directory
    return server


def lora_weights(
    transformer: Any, ranks: dict[str, int], seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (down, up) weights of the given rank for each layer path of `transformer`."""
    modules = dict(transformer.named_modules())
    generator = torch.Generator("cpu").manual_seed(seed)
    weights = {}
    for path, rank in ranks.items():
        layer = modules[path]
        down = torch.randn((rank, layer.in_features), generator=generator) / layer.in_features**0.5
        weights[path] = (down, torch.randn((layer.out_features, rank), generator=generator))
    return weights


def save_peft_lora(
    directory: Path,
    name: str,
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
    metadata: dict[str, Any] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Writes `weights` (and `extra` tensors beside them) with diffusers' save_lora_weights, as
    its training scripts do: keys prefixed `transformer.`, adapter metadata if given."""
    layers = {
        f"{path}.lora_{part}.weight": tensor
        for path, pair in weights.items()
        for part, tensor in zip("AB", pair, strict=True)
    }
    QwenImagePipeline.save_lora_weights(
        str(directory),
        transformer_lora_layers=layers | (extra or {}),
        transformer_lora_adapter_metadata=metadata,
        weight_name=f"{name}.safetensors",
    )


def assert_server_matches_load_lora_weights(
    server: Any, tiny_model: Path, name: str, scale: float
) -> None:
    """Two rows of one request with adapter `name` (loaded now) against diffusers' images."""
    client = server.client(retry=NO_RETRY)
    client.load_adapter(name)
    result = client.generate(
        "a fox", seed=5, num_images=2, output_format=NPY, adapters=[Adapter(name, scale)]
    )
    expected = pipeline_with(tiny_model, {name: scale}, server.directory)
    for index, seed in enumerate((5, 6)):
        assert_same_image(pixels(result, index), pipeline_image(expected, "a fox", seed))


def test_a_kohya_lora_on_layers_with_one_vector_per_row_matches_load_lora_weights(
    runtime_server: Any, tiny_model: Path, reference_pipeline: Any
) -> None:
    """The modulation, output-norm and timestep layers see [rows, features], not [rows,
    tokens, features]; Qwen-Image-Lightning's LoRA targets the modulation ones."""
    from safetensors.torch import save_file

    paths = ["norm_out.linear", "time_text_embed.timestep_embedder.linear_1"] + [
        f"transformer_blocks.{block}.{layer}"
        for block in (0, 1)
        for layer in ("img_mod.1", "txt_mod.1")
    ]
    tensors = {}
    ranks = dict.fromkeys(paths, 4)
    for path, (down, up) in lora_weights(reference_pipeline.transformer, ranks, 7).items():
        tensors[f"{path}.lora_down.weight"] = down
        tensors[f"{path}.lora_up.weight"] = up * 0.5
        tensors[f"{path}.alpha"] = torch.tensor(2.0)  # alpha != rank, as in Lightning's file
    save_file(tensors, str(runtime_server.directory / "modulation.safetensors"))
    assert_server_matches_load_lora_weights(runtime_server, tiny_model, "modulation", 0.8)


def test_peft_metadata_scales_each_layer_by_its_lora_alpha_over_rank(
    runtime_server: Any, tiny_model: Path, reference_pipeline: Any
) -> None:
    """A file written by diffusers' save_lora_weights with adapter metadata (as its training
    scripts write it): lora_alpha / r, with per-layer patterns, scales each layer."""
    ranks = {
        "transformer_blocks.0.attn.to_q": 4,
        "transformer_blocks.1.attn.to_v": 2,  # rank_pattern
        "transformer_blocks.0.img_mlp.net.2": 4,  # alpha_pattern
    }
    save_peft_lora(
        runtime_server.directory,
        "trained",
        lora_weights(reference_pipeline.transformer, ranks, 11),
        metadata={
            "r": 4,
            "lora_alpha": 16,
            "rank_pattern": {"transformer_blocks.1.attn.to_v": 2},
            "alpha_pattern": {"img_mlp.net.2": 2},
            "target_modules": list(ranks),
        },
    )
    assert_server_matches_load_lora_weights(runtime_server, tiny_model, "trained", 0.5)


TO_Q = "transformer_blocks.0.attn.to_q"


@pytest.mark.parametrize(
    "metadata,extra_key,message",
    [
        ({"r": 0, "lora_alpha": 4}, None, f"{TO_Q}: adapter metadata r = 0, not a positive"),
        ({"r": 4, "lora_alpha": "four"}, None, f"{TO_Q}: adapter metadata lora_alpha = 'four'"),
        ({"r": 4, "rank_pattern": {"to_(q": 2}}, None, f"{TO_Q}: adapter metadata rank_pattern"),
        ({"r": 4, "use_dora": True}, None, "sets use_dora: DoRA is not supported"),
        ({"r": 4, "lora_bias": True}, None, "sets lora_bias: a bias on lora_B is not supported"),
        (None, "lora_magnitude_vector", "lora_magnitude_vector: DoRA is not supported"),
        (None, "lora_B.bias", "lora_B.bias: a bias on lora_B is not supported"),
    ],
    ids=["zero-rank", "text-alpha", "no-regex", "use-dora", "lora-bias", "dora-key", "bias-key"],
)
def test_a_lora_the_per_row_forward_cannot_serve_is_refused_cleanly(
    runtime_server: Any,
    reference_pipeline: Any,
    metadata: dict[str, Any] | None,
    extra_key: str | None,
    message: str,
) -> None:
    """Metadata that gives no scale (a zero rank, an alpha that is text, a pattern that is no
    regex) once failed as INTERNAL; DoRA and lora_B biases were served without their extra
    part. Each is INVALID_ARGUMENT naming what is wrong, and nothing is loaded."""
    weights = lora_weights(reference_pipeline.transformer, {TO_Q: 4}, 3)
    out_features = weights[TO_Q][1].shape[0]
    extra = {f"{TO_Q}.{extra_key}": torch.ones(out_features)} if extra_key else {}
    save_peft_lora(runtime_server.directory, "unservable", weights, metadata, extra)
    client = runtime_server.client(retry=NO_RETRY)
    with pytest.raises(grpc.RpcError) as failure:
        client.load_adapter("unservable")
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in failure.value.details()
    assert client.server_info().adapters == ()


@pytest.mark.parametrize(
    "name,code,message",
    [
        ("../ink", grpc.StatusCode.INVALID_ARGUMENT, "is not an adapter name"),
        ("/etc/passwd", grpc.StatusCode.INVALID_ARGUMENT, "is not an adapter name"),
        ("ink.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "no extension"),
        ("", grpc.StatusCode.INVALID_ARGUMENT, "is not an adapter name"),
        ("absent", grpc.StatusCode.NOT_FOUND, "no adapter 'absent'"),
        ("escape", grpc.StatusCode.INVALID_ARGUMENT, "outside the adapter directory"),
        ("broken", grpc.StatusCode.INVALID_ARGUMENT, "not a readable safetensors file"),
    ],
)
def test_bad_names_and_files_are_refused_and_change_nothing(
    runtime_server: Any, tmp_path: Path, name: str, code: grpc.StatusCode, message: str
) -> None:
    (tmp_path / "outside.safetensors").write_bytes(
        (runtime_server.directory / "ink.safetensors").read_bytes()
    )
    (runtime_server.directory / "escape.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (runtime_server.directory / "broken.safetensors").write_bytes(
        b"\x10\x00\x00\x00not safetensors"
    )
    client = runtime_server.client(retry=NO_RETRY)
    client.load_adapter("ink")
    before = [(a.name, a.loaded) for a in client.list_adapters()]
    with pytest.raises(grpc.RpcError) as failure:
        client.load_adapter(name)
    assert failure.value.code() == code
    assert failure.value.details().startswith("name:") and message in failure.value.details()
    assert [(a.name, a.loaded) for a in client.list_adapters()] == before
    assert client.generate("still fine", seed=1, adapters=[Adapter("ink")]).images


def test_a_lora_for_another_model_is_refused_cleanly(runtime_server: Any) -> None:
    from safetensors.torch import save_file

    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 999),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4),
        },
        str(runtime_server.directory / "other.safetensors"),
    )
    client = runtime_server.client(retry=NO_RETRY)
    with pytest.raises(grpc.RpcError) as failure:
        client.load_adapter("other")
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "do not fit" in failure.value.details()
    assert client.server_info().adapters == ()


def test_the_least_recently_used_idle_adapter_is_evicted(runtime_server: Any) -> None:
    client = runtime_server.client(retry=NO_RETRY)
    client.load_adapter("ink")
    client.load_adapter("neon")
    client.generate("uses ink", seed=1, adapters=[Adapter("ink")])  # ink is now the most recent
    client.load_adapter("sepia")  # max 2 loaded: neon goes
    assert {a.name for a in client.server_info().adapters} == {"ink", "sepia"}
    metrics = runtime_server.metrics()
    assert metrics["imagegen_adapter_evictions_total"] == 1
    assert metrics["imagegen_loaded_adapters"] == 2


def test_adapters_held_by_queued_requests_are_never_evicted(runtime_server: Any) -> None:
    client = runtime_server.client(retry=NO_RETRY)
    client.load_adapter("ink")
    client.load_adapter("neon")
    runtime_server.batcher.set_step_budget(0)
    waiting = [
        StreamWatcher(client, f"holds {name}", seed=1, adapters=[Adapter(name)])
        for name in ("ink", "neon")
    ]
    for watcher in waiting:
        watcher.queued()
    with pytest.raises(grpc.RpcError) as failure:
        client.load_adapter("sepia")
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(failure.value.trailing_metadata()).get("retry-after-ms") == "1000"
    runtime_server.batcher.set_step_budget(None)
    for watcher in waiting:
        watcher.completed()
    client.load_adapter("sepia")  # idle now: neon (least recently used) makes room


def test_unload_waits_for_the_requests_that_use_it(runtime_server: Any) -> None:
    client = runtime_server.client(retry=NO_RETRY)
    client.load_adapter("ink")
    runtime_server.batcher.set_step_budget(0)
    user = StreamWatcher(client, "uses ink", seed=1, adapters=[Adapter("ink")], output_format=NPY)
    user.queued()
    unloaded = threading.Event()
    threading.Thread(
        target=lambda: (client.unload_adapter("ink"), unloaded.set()), daemon=True
    ).start()
    # The unload RPC runs concurrently: wait, through the API, until the server has begun it.
    for _ in range(10_000):
        if any(a.name == "ink" and a.unloading for a in client.list_adapters()):
            break
    else:
        raise AssertionError("the unload never began")
    # New requests can no longer pick it while it drains...
    with pytest.raises(grpc.RpcError) as failure:
        client.generate("too late", seed=2, adapters=[Adapter("ink")])
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    assert not unloaded.is_set()
    runtime_server.batcher.set_step_budget(None)
    result = user.completed().result  # ...and the holder still ran with it.
    assert unloaded.wait(60)
    assert client.server_info().adapters == ()
    client.load_adapter("ink")
    again = client.generate("uses ink", seed=1, adapters=[Adapter("ink")], output_format=NPY)
    assert_same_image(pixels(result), pixels(again))


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage a Python object in this process still holds (the server
    runs in-process): what a leaked adapter's LoRA weights would add to."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            try:
                address = storage.data_ptr()
            except RuntimeError:  # a fake tensor left by torch.compile's tracing: no memory
                continue
            storages[address] = storage.nbytes()
    return sum(storages.values())


# Leak bounds of the cycle test, from what the objects weigh and the noise measured on the shared
# 2-core machine (50 cycles with traffic): live tensor bytes grew by 0 B, RSS by 6.2 MB. The
# adapters cycled weigh 28 KB (sepia) and 88 KB (pastel) as tensors, so one adapter left behind
# in 50 cycles already passes the tensor bound; RSS, which an adapter cannot move past its own
# noise, keeps a bound 4x that noise for leaks outside tensors (a request's state, say).
TENSOR_GROWTH_BOUND_B = 16 * 1024
RSS_GROWTH_BOUND_MB = 24


def test_load_unload_cycles_under_traffic_fail_nothing_and_leak_nothing(
    runtime_server: Any,
) -> None:
    client = runtime_server.client(retry=NO_RETRY)
    client.load_adapter("ink")
    process = psutil.Process()
    for name in ("pastel", "sepia"):  # one cycle of each first: allocator caches settle
        client.load_adapter(name)
        assert client.generate("cycled", seed=0, adapters=[Adapter(name)], steps=2).images
        client.unload_adapter(name)
    for adapters in ([Adapter("ink")], []):
        assert client.generate("traffic", seed=0, adapters=adapters, steps=2).images
    params_before = runtime_server.metrics()["imagegen_adapter_parameters"]
    tensors_before = live_tensor_bytes()
    rss_before = process.memory_info().rss
    stop = threading.Event()
    failures: list[BaseException] = []
    served = [0]

    def traffic() -> None:
        while not stop.is_set():
            try:
                for adapters in ([Adapter("ink")], []):
                    assert client.generate(
                        "traffic", seed=served[0], adapters=adapters, steps=2
                    ).images
                    served[0] += 1
            except BaseException as error:
                failures.append(error)
                return

    threads = [threading.Thread(target=traffic, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    for cycle in range(50):
        name = ("pastel", "sepia")[cycle % 2]
        client.load_adapter(name)
        assert client.generate("cycled", seed=cycle, adapters=[Adapter(name)], steps=2).images
        client.unload_adapter(name)
    stop.set()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a traffic call hung"
    assert not failures, failures[0]
    assert served[0] > 0
    assert runtime_server.metrics()["imagegen_adapter_parameters"] == params_before
    tensor_growth = live_tensor_bytes() - tensors_before
    growth_mb = (process.memory_info().rss - rss_before) / 2**20
    assert tensor_growth < TENSOR_GROWTH_BOUND_B, f"live tensors grew {tensor_growth} B"
    assert growth_mb < RSS_GROWTH_BOUND_MB, f"RSS grew {growth_mb:.1f} MB over 50 cycles"

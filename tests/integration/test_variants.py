"""Variants: named LoRA + scheduler + defaults configurations, picked per request, whose rows
share transformer calls; each row equals the diffusers pipeline configured as its variant."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import openai
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from imagegen_client import Adapter, OutputFormat, RetryPolicy
from imagegen_server.engine.sampling import LIGHTNING_SCHEDULER_OVERRIDES
from PIL import Image
from support import StreamWatcher, assert_same_image, pixels, variants_config
from support import pipeline_image as reference
from test_adapters import pipeline_with

NPY = OutputFormat.NPY
NEGATIVE = "blurry"


@pytest.fixture(scope="module")
def variant_server(tiny_model: Path) -> Any:
    from support import start_server

    running = start_server(
        tiny_model,
        adapter_dir=str(tiny_model / "adapters"),
        preload_adapters=["neon"],
        variants=variants_config(tiny_model / "adapters"),
        default_steps=None,  # each variant has its own
    )
    yield running
    running.stop()


def variant_pipeline(
    model: Path, loras: dict[str, float], lightning: bool = False
) -> QwenImagePipeline:
    """QwenImagePipeline configured as a variant the documented way: its LoRAs through
    load_lora_weights / set_adapters with the same scales, its scheduler from_config with the
    Lightning overrides."""
    pipeline = pipeline_with(model, loras)
    if lightning:
        pipeline.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            {**pipeline.scheduler.config, **LIGHTNING_SCHEDULER_OVERRIDES}
        )
    return pipeline


def test_rows_of_three_variants_share_a_batch_and_each_equals_its_pipeline(
    variant_server: Any, tiny_model: Path
) -> None:
    client = variant_server.client()
    before = variant_server.metrics()
    variant_server.batcher.set_step_budget(0)
    # base and soft leave steps and guidance to their variant; fast sends a guidance so that
    # all three rows have CFG on (one batch key), and a request adapter on top of its LoRA.
    requests: list[dict[str, Any]] = [
        {"variant": "base"},
        {"variant": "fast", "guidance_scale": 2.0, "adapters": [Adapter("neon", 0.7)]},
        {},  # the default variant: soft
    ]
    watchers = [
        StreamWatcher(
            client,
            f"a fox {seed}",
            seed=seed,
            negative_prompt=NEGATIVE,
            output_format=NPY,
            **options,
        )
        for seed, options in enumerate(requests)
    ]
    for watcher in watchers:
        watcher.queued()
    variant_server.batcher.set_step_budget(None)
    results = [watcher.completed().result for watcher in watchers]
    assert [result.batch_size for result in results] == [3, 3, 3]  # one transformer call
    assert [result.variant for result in results] == ["base", "fast", "soft"]
    expected = [
        (variant_pipeline(tiny_model, {}), 4, 4.0),
        (variant_pipeline(tiny_model, {"ink": 1.0, "neon": 0.7}, lightning=True), 2, 2.0),
        (variant_pipeline(tiny_model, {"pastel": 0.5}), 3, 3.0),
    ]
    for seed, (result, (pipeline, steps, guidance)) in enumerate(
        zip(results, expected, strict=True)
    ):
        alone = reference(
            pipeline,
            f"a fox {seed}",
            seed,
            steps=steps,
            guidance=guidance,
            negative_prompt=NEGATIVE,
        )
        assert_same_image(pixels(result), alone)
    after = variant_server.metrics()
    for name, steps in (("base", 4), ("fast", 2), ("soft", 3)):
        label = f'{{variant="{name}"}}'
        assert after[f"imagegen_variant_requests_total{label}"] == (
            before[f"imagegen_variant_requests_total{label}"] + 1
        )
        assert after[f"imagegen_variant_images_total{label}"] == (
            before[f"imagegen_variant_images_total{label}"] + 1
        )
        assert after[f"imagegen_variant_rows_total{label}"] == (
            before[f"imagegen_variant_rows_total{label}"] + steps
        )


def test_the_lightning_variant_differs_from_the_same_lora_on_the_default_schedule(
    variant_server: Any, tiny_model: Path
) -> None:
    """The schedule really is the variant's: the same LoRA on the shipped scheduler differs."""
    result = variant_server.client().generate("a hen", seed=9, variant="fast", output_format=NPY)
    shipped = reference(variant_pipeline(tiny_model, {"ink": 1.0}), "a hen", 9, steps=2)
    assert float(np.abs(pixels(result) - shipped).max()) > 1e-3
    lightning = variant_pipeline(tiny_model, {"ink": 1.0}, lightning=True)
    assert_same_image(pixels(result), reference(lightning, "a hen", 9, steps=2))


def test_server_info_lists_the_variants_with_their_defaults(
    variant_server: Any, tiny_model: Path
) -> None:
    info = variant_server.client().server_info()
    by_name = {variant.name: variant for variant in info.variants}
    assert list(by_name) == ["base", "fast", "soft"]
    base, fast, soft = by_name["base"], by_name["fast"], by_name["soft"]
    assert (base.default_steps, base.default_guidance_scale, base.min_steps, base.max_steps) == (
        4,
        4.0,
        2,
        8,
    )
    assert base.loras == () and base.scheduler_preset == "default" and not base.is_default
    assert [(lora.name, lora.scale) for lora in fast.loras] == [("ink.safetensors", 1.0)]
    assert fast.scheduler_preset == "lightning" and (fast.min_steps, fast.max_steps) == (2, 3)
    assert [(lora.name, lora.scale) for lora in soft.loras] == [("pastel", 0.5)]
    # No min_steps given: the fewest the shipped schedule allows (its terminal stretch needs 2).
    assert soft.is_default and (soft.min_steps, soft.max_steps) == (2, 6)
    assert info.limits.default_steps == 3  # the default variant's
    # The variants' LoRAs are not adapters a request may name.
    assert [adapter.name for adapter in info.adapters] == ["neon"]


@pytest.mark.parametrize(
    "options,code,field,detail",
    [
        ({"variant": "turbo"}, grpc.StatusCode.NOT_FOUND, "variant", "base, fast, soft"),
        (
            {"variant": "fast", "steps": 6},
            grpc.StatusCode.INVALID_ARGUMENT,
            "num_inference_steps",
            "6 outside [2, 3], the range of variant 'fast'",
        ),
        (
            {"steps": 7},  # the default variant's range, not the server's max_steps (16)
            grpc.StatusCode.INVALID_ARGUMENT,
            "num_inference_steps",
            "7 outside [2, 6], the range of variant 'soft'",
        ),
        (
            {"variant": "base", "steps": 1},
            grpc.StatusCode.INVALID_ARGUMENT,
            "num_inference_steps",
            "1 outside [2, 8]",
        ),
    ],
)
def test_bad_variant_requests_get_the_right_status_and_the_server_stays_serving(
    variant_server: Any, options: dict[str, Any], code: grpc.StatusCode, field: str, detail: str
) -> None:
    client = variant_server.client(retry=RetryPolicy(max_attempts=1))
    with pytest.raises(grpc.RpcError) as caught:
        client.generate("a fox", **options)
    assert caught.value.code() == code
    assert field in caught.value.details() and detail in caught.value.details()
    assert client.health() == "SERVING"


def test_a_server_without_variants_refuses_a_variant_and_reports_none(server: Any) -> None:
    client = server.client(retry=RetryPolicy(max_attempts=1))
    assert client.server_info().variants == ()
    assert client.generate("a fox", seed=1, steps=2).variant == ""
    with pytest.raises(grpc.RpcError) as caught:
        client.generate("a fox", variant="base")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "variant" in caught.value.details()


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Any:
    from imagegen_server.engine.engine import Engine
    from imagegen_server.engine.model import load_model

    return Engine(load_model(str(tiny_model), device="cpu", dtype="float32"), 0, 512)


@pytest.mark.parametrize(
    "entry,message",
    [
        (
            {"name": "broken", "loras": ["{dir}/broken.safetensors"]},
            "variants[1] ('broken'): loras '{dir}/broken.safetensors': not a LoRA for this model",
        ),
        (
            {"name": "one", "min_steps": 1, "default_steps": 2},
            "variants[1] ('one'): min_steps is below 2, the fewest steps its scheduler (default)",
        ),
    ],
)
def test_a_variant_the_model_cannot_run_stops_start_up_naming_the_entry(
    engine: Any, tmp_path: Path, entry: dict[str, Any], message: str
) -> None:
    """What only the loaded model can tell: a file that is no LoRA for this transformer, a step
    minimum below what the variant's schedule allows."""
    from imagegen_server.base.variants import VariantConfig

    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    entry = {
        key: [lora.format(dir=tmp_path) for lora in value] if key == "loras" else value
        for key, value in entry.items()
    }
    configs = [VariantConfig(name="fine"), VariantConfig.model_validate(entry)]
    with pytest.raises(ValueError, match=__import__("re").escape(message.format(dir=tmp_path))):
        engine.variants.load(configs, None, engine.adapters, 16, 16)


def test_image_to_image_as_a_variant_equals_the_img2img_pipeline_configured_as_it(
    variant_server: Any, tiny_model: Path
) -> None:
    """An init image runs the tail of its variant's schedule, with its variant's LoRA."""
    from diffusers import QwenImageImg2ImgPipeline
    from support import png

    y, x = np.mgrid[0:64, 0:64]
    picture = Image.fromarray((np.stack([x / 64, y / 64, x * y / 4096], -1) * 255).astype("uint8"))
    result = variant_server.client().generate(
        "a boat on a lake",
        variant="fast",
        init_image=png(picture),
        strength=0.5,
        steps=3,
        seed=4,
        output_format=NPY,
    )
    pipeline = QwenImageImg2ImgPipeline.from_pretrained(tiny_model, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_lora_weights(str(tiny_model / "adapters/ink.safetensors"), adapter_name="ink")
    pipeline.set_adapters(["ink"], adapter_weights=[1.0])
    pipeline.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        {**pipeline.scheduler.config, **LIGHTNING_SCHEDULER_OVERRIDES}
    )
    expected = reference(pipeline, "a boat on a lake", 4, steps=3, image=picture, strength=0.5)
    assert_same_image(pixels(result), expected)


def test_a_lora_file_two_variants_share_is_loaded_once(engine: Any, tiny_model: Path) -> None:
    from imagegen_server.base.variants import VariantConfig

    adapters = tiny_model / "adapters"
    configs = [
        VariantConfig.model_validate({"name": "a", "loras": [f"{adapters}/ink.safetensors"]}),
        VariantConfig.model_validate({"name": "b", "loras": ["ink@0.5", "neon"]}),
    ]
    described = engine.variants.load(configs, adapters, engine.adapters, 16, 16)
    assert [(v.name, v.loras, v.is_default) for v in described] == [
        ("a", (("ink.safetensors", 1.0),), True),
        ("b", (("ink", 0.5), ("neon", 1.0)), False),
    ]
    ink = engine.variants.loras("a")[0].name
    assert [spec.name for spec in engine.variants.loras("b")] == [ink, engine.adapters.names[-1]]
    assert len(engine.variants.all_loras()) == 2  # what the memory probe puts on every row


def test_an_openai_client_picks_a_variant_as_a_model(tiny_model: Path) -> None:
    from support import start_server

    server = start_server(
        tiny_model,
        http_port=0,
        adapter_dir=str(tiny_model / "adapters"),
        variants=variants_config(tiny_model / "adapters"),
        default_steps=None,
    )
    try:
        api = openai.OpenAI(
            base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key="-", max_retries=0
        )
        served = [model.id for model in api.models.list().data]
        assert served[1:] == ["base", "fast", "soft"]  # after the model itself
        by_http = api.images.generate(
            prompt="a fox", model="fast", size="64x64", extra_body={"seed": 3}
        )
        by_grpc = server.client().generate("a fox", variant="fast", width=64, height=64, seed=3)
        assert by_http.data is not None and by_http.data[0].b64_json is not None
        sent = Image.open(io.BytesIO(base64.b64decode(by_http.data[0].b64_json)))
        assert np.array_equal(np.asarray(sent), np.asarray(by_grpc.images[0].to_pil()))
        with pytest.raises(openai.NotFoundError) as unknown:
            api.images.generate(prompt="x", model="turbo", size="64x64")
        assert unknown.value.body["param"] == "model" and "fast" in unknown.value.message
        with pytest.raises(openai.BadRequestError) as contradiction:
            api.images.generate(prompt="x", model="fast", extra_body={"variant": "base"})
        assert contradiction.value.body["param"] == "variant"
    finally:
        server.stop()

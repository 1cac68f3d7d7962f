"""Instruction editing with reference images (Qwen-Image-Edit and Edit-Plus): the server's
image equals diffusers' edit pipelines, is the same alone and in any batch, and bad references
are refused naming the field.

Every reference is VAE-encoded at about one megapixel, as the pipelines do, so each adds about
4,000 tokens to its row: the tests keep to 2 steps and 64-pixel targets.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions
from imagegen_client import AsyncImageGenClient, OutputFormat
from imagegen_server.base.references import VAE_IMAGE_AREA
from imagegen_server.base.references import calculate_dimensions as served_dimensions
from imagegen_server.engine.edit_model import load_processor
from PIL import Image
from support import ALL_ROWS, StreamWatcher, assert_same_image, pixels

NPY = OutputFormat.NPY
STEPS = 2


def picture(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour fields with structure (a reference the VAE sees as an image)."""
    y, x = np.mgrid[0:height, 0:width]
    phase = seed * 0.7
    rgb = np.stack(
        [
            0.5 + 0.5 * np.sin(x / 7 + phase),
            0.5 + 0.5 * np.cos(y / 5 - phase),
            ((x - width / 2) ** 2 + (y - height / 2) ** 2 < (width / 3) ** 2) * (seed % 2),
        ],
        axis=-1,
    )
    return Image.fromarray((rgb * 255).astype(np.uint8))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def diffusers_pipeline(cls: Any, directory: Path) -> Any:
    pipeline = cls.from_pretrained(
        directory, processor=load_processor(str(directory)), dtype=torch.float32
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def diffusers_edit(pipeline: Any, references: list[Image.Image], **options: Any) -> np.ndarray:
    """The pipeline's own image, as float32 HxWx3 in [0, 1]."""
    image = references[0] if isinstance(pipeline, QwenImageEditPipeline) else references
    output = pipeline(
        image=image,
        prompt=options["prompt"],
        negative_prompt=options.get("negative_prompt") or None,
        true_cfg_scale=options.get("guidance_scale", 1.0),
        num_inference_steps=STEPS,
        width=options["width"],
        height=options["height"],
        generator=torch.Generator("cpu").manual_seed(options["seed"]),
        output_type="np",
    )
    return np.asarray(output.images[0], dtype=np.float32)


def served_edit(client: Any, references: list[Image.Image], **options: Any) -> np.ndarray:
    result = client.edit_with_references(
        options.pop("prompt"),
        [png(image) for image in references],
        steps=STEPS,
        output_format=NPY,
        **options,
    )
    return pixels(result)


@pytest.fixture(scope="module")
def edit_plus_pipeline(tiny_edit_models: dict[str, Path]) -> Any:
    return diffusers_pipeline(QwenImageEditPlusPipeline, tiny_edit_models["edit-plus"])


CASES = {
    # references (width, height, seed), target (width, height), CFG
    "one reference": ([(48, 64, 1)], (64, 64), None),
    "two references, true CFG, non-square": ([(64, 48, 2), (40, 40, 3)], (64, 48), 4.0),
    "three references": ([(48, 48, 4), (64, 32, 5), (32, 48, 6)], (48, 64), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_edit_plus_equals_the_diffusers_pipeline(
    edit_plus_server: Any, edit_plus_pipeline: Any, case: str
) -> None:
    shapes, (width, height), guidance = CASES[case]
    references = [picture(w, h, seed) for w, h, seed in shapes]
    options: dict[str, Any] = {"prompt": "put picture 1 on picture 2", "width": width}
    options.update(height=height, seed=7)
    if guidance:
        options.update(guidance_scale=guidance, negative_prompt="blurry")
    expected = diffusers_edit(edit_plus_pipeline, references, **options)
    served = served_edit(edit_plus_server.client(), references, **options)
    assert served.shape == (height, width, 3)
    assert_same_image(served, expected)


@pytest.mark.parametrize("guidance", [None, 3.0])
def test_edit_equals_the_diffusers_pipeline(
    server_factory: Any, tiny_edit_models: dict[str, Path], guidance: float | None
) -> None:
    server = server_factory(model=tiny_edit_models["edit"])
    pipeline = diffusers_pipeline(QwenImageEditPipeline, tiny_edit_models["edit"])
    references = [picture(80, 48, 9)]
    options: dict[str, Any] = {"prompt": "make the sky red", "width": 64, "height": 32}
    options.update(seed=3)
    if guidance:
        options.update(guidance_scale=guidance, negative_prompt="dark")
    expected = diffusers_edit(pipeline, references, **options)
    assert_same_image(served_edit(server.client(), references, **options), expected)
    info = server.client().server_info()
    assert (info.pipeline, info.limits.max_reference_images) == ("edit", 1)


def test_sizes_follow_the_pipelines() -> None:
    for width, height in ((1, 1), (48, 64), (1920, 1080), (333, 777), (3000, 200)):
        ratio = width / height
        assert served_dimensions(VAE_IMAGE_AREA, ratio) == calculate_dimensions(
            VAE_IMAGE_AREA, ratio
        )


def test_edit_rows_are_the_same_alone_in_a_batch_and_joining_mid_way(
    server_factory: Any,
    tiny_edit_models: dict[str, Path],
) -> None:
    server = server_factory(model=tiny_edit_models["edit-plus"], max_batch_size=8, **ALL_ROWS)
    client = server.client()
    mine = [png(picture(64, 48, 1)), png(picture(40, 40, 2))]
    theirs = [png(picture(64, 48, 3)), png(picture(40, 40, 4))]  # same shapes, other pictures
    common = {"steps": 4, "output_format": NPY, "width": 64, "height": 48}
    alone = pixels(client.edit_with_references("swap them", mine, seed=5, **common))

    server.batcher.set_step_budget(0)
    together = [
        StreamWatcher(client, "swap them", reference_images=mine, seed=5, **common),
        StreamWatcher(
            client, "other", reference_images=theirs, seed=6, guidance_scale=1.0, **common
        ),
    ]
    for watcher in together:
        watcher.queued()
    server.batcher.set_step_budget(None)
    batched = together[0].completed().result
    assert batched.batch_size == 2
    assert_same_image(pixels(batched), alone)

    server.batcher.set_step_budget(0)
    running = StreamWatcher(client, "other", reference_images=theirs, seed=6, **common)
    running.queued()
    server.batcher.set_step_budget(2)
    running.step(2)
    joiner = StreamWatcher(client, "swap them", reference_images=mine, seed=5, **common)
    joiner.queued()
    server.batcher.set_step_budget(None)
    joined = joiner.completed().result
    running.completed()
    assert joined.batch_size == 2
    assert_same_image(pixels(joined), alone)


BAD = {
    "too many": ([png(picture(32, 32, i)) for i in range(4)], "reference_images", "4 given"),
    "undecodable": ([png(picture(32, 32, 1)), b"not an image"], "reference_images[1]", "decodable"),
    "oversized": ([png(Image.new("RGB", (5000, 4000)))], "reference_images[0]", "allowed at most"),
    "default size over the limits": (
        [png(picture(64, 64, 1))],
        "reference_images",
        "gives a 1024x1024 output",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_references_are_refused_naming_the_field(edit_plus_server: Any, case: str) -> None:
    references, field, message = BAD[case]
    client = edit_plus_server.client(max_message_bytes=64 << 20)
    size = {} if case == "default size over the limits" else {"width": 64, "height": 64}
    with pytest.raises(grpc.RpcError) as failure:
        client.edit_with_references("edit", references, steps=STEPS, **size)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.details().startswith(f"{field}:"), failure.value.details()
    assert message in failure.value.details(), failure.value.details()
    assert client.health() == "SERVING"


def test_the_async_client_edits_with_references(edit_plus_server: Any) -> None:
    async def edit() -> tuple[Any, grpc.StatusCode]:
        async with AsyncImageGenClient(edit_plus_server.target) as client:
            result = await client.edit_with_references(
                "make it blue", [png(picture(48, 48, 1))], steps=STEPS, width=32, height=32
            )
            try:
                await client.edit_with_references("x", [png(picture(32, 32, 1))] * 4)
            except grpc.aio.AioRpcError as error:
                return result, error.code()
            raise AssertionError("four references were accepted")

    result, refused = asyncio.run(edit())
    assert (result.images[0].width, result.images[0].height) == (32, 32)
    assert refused == grpc.StatusCode.INVALID_ARGUMENT


def test_an_edit_model_needs_references_and_refuses_init_images(edit_plus_server: Any) -> None:
    client = edit_plus_server.client()
    for options, field in (
        ({}, "reference_images"),
        ({"init_image": png(picture(64, 64, 1))}, "init_image"),
    ):
        with pytest.raises(grpc.RpcError) as failure:
            client.generate("edit", steps=STEPS, **options)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert failure.value.details().startswith(f"{field}:"), failure.value.details()
    info = client.server_info()
    assert (info.pipeline, info.limits.max_reference_images) == ("edit-plus", 3)


def test_references_to_a_text_to_image_model_are_refused(server: Any) -> None:
    client = server.client()
    with pytest.raises(grpc.RpcError) as failure:
        client.edit_with_references("edit", [png(picture(32, 32, 1))], steps=STEPS)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.details().startswith("reference_images:"), failure.value.details()
    assert "text-to-image" in failure.value.details()
    info = client.server_info()
    assert (info.pipeline, info.limits.max_reference_images) == ("text-to-image", 0)
    assert client.health() == "SERVING"


def test_edit_prompts_are_cached_by_text_and_references(edit_plus_server: Any) -> None:
    client = edit_plus_server.client()
    first, second = [png(picture(48, 48, 1))], [png(picture(48, 48, 2))]

    def counts() -> tuple[float, float]:
        metrics = edit_plus_server.metrics()
        return metrics["imagegen_prompt_cache_hits_total"], metrics[
            "imagegen_prompt_cache_misses_total"
        ]

    options = {"steps": STEPS, "width": 32, "height": 32, "seed": 1}
    client.edit_with_references("make it blue", first, **options)
    hits, misses = counts()
    client.edit_with_references("make it blue", first, **options)
    assert counts() == (hits + 1, misses)  # same text, same pictures: cached
    client.edit_with_references("make it blue", second, **options)
    assert counts() == (hits + 1, misses + 1)  # same text, other pictures: encoded again


def test_the_output_size_defaults_to_the_last_references_at_one_megapixel(
    server_factory: Any, tiny_edit_models: dict[str, Path]
) -> None:
    server = server_factory(
        model=tiny_edit_models["edit-plus"], max_width=2048, max_height=2048, max_pixels=2 << 20
    )
    references = [png(picture(48, 64, 1)), png(picture(64, 48, 2))]
    result = server.client().edit_with_references("widen it", references, steps=STEPS, seed=1)
    width, height = calculate_dimensions(VAE_IMAGE_AREA, 64 / 48)  # the last reference's
    image = result.images[0]
    assert (image.width, image.height) == (width // 16 * 16, height // 16 * 16) == (1184, 896)


def test_a_checkpoint_of_another_pipeline_is_refused_naming_it(tmp_path: Path) -> None:
    from imagegen_server.engine.edit_model import pipeline_kind

    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ValueError, match="holds a 'FluxPipeline'; this server serves"):
        pipeline_kind(str(tmp_path))


@pytest.mark.parametrize("kind", ["edit", "edit-plus"])
def test_an_edit_rows_vision_tokens_are_known_before_it_runs(
    tiny_edit_models: dict[str, Path], kind: str
) -> None:
    """What the row limit counts (`text_tokens`) is what the encoder makes of the pictures."""
    from imagegen_server.base.engine_api import PromptCacheStats
    from imagegen_server.base.references import ReferenceImages
    from imagegen_server.engine.model import load_model
    from imagegen_server.engine.prompts import PromptTokenizer
    from imagegen_server.engine.references import ReferenceEncoder

    model = load_model(str(tiny_edit_models[kind]), device="cpu", dtype="float32")
    encoder = ReferenceEncoder(model, 4, PromptCacheStats())
    pictures = [picture(64, 48, 1), picture(40, 40, 2)][: 1 if kind == "edit" else 2]
    references = ReferenceImages(tuple(pictures), kind)
    states = encoder.encode_prompts([("put it on the left", references)])[0]
    text = PromptTokenizer(model.pipeline).count("put it on the left")
    assert states.shape[0] == text + encoder.text_tokens(references.vae_sizes)

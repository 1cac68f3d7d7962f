"""Images through the real server equal QwenImagePipeline's, whatever the batch around them."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from imagegen_client import OutputFormat
from PIL import Image
from support import ALL_ROWS, StreamWatcher, assert_same_image, pipeline_image, pixels


@pytest.mark.parametrize("width,height", [(64, 64), (96, 48)])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_server_image_equals_the_diffusers_pipeline(
    server: Any, reference_pipeline: Any, width: int, height: int, guidance: float
) -> None:
    negative = "blurry, low quality" if guidance > 1 else ""
    result = server.client().generate(
        "a lighthouse on a cliff at dusk",
        negative_prompt=negative,
        guidance_scale=guidance,
        width=width,
        height=height,
        steps=4,
        seed=1234,
        output_format=OutputFormat.NPY,
    )
    expected = pipeline_image(
        reference_pipeline,
        "a lighthouse on a cliff at dusk",
        1234,
        width=width,
        height=height,
        negative_prompt=negative if guidance > 1 else None,
        guidance=guidance,
    )
    assert pixels(result).shape == (height, width, 3)
    assert_same_image(pixels(result), expected)


def test_every_request_gives_the_same_image_alone_and_inside_a_batch_of_four(
    server_factory: Any,
) -> None:
    """Every row of one transformer batch, prompts of 1 to 56 tokens among them, against its
    image alone (the `all` policy: the four must really share each step)."""
    server = server_factory(step_budget=0, **ALL_ROWS)
    client = server.client()
    prompts = [
        "a red fox in the snow",
        "x",
        "a much longer prompt about an old harbour town at night",
        "山水画",
    ]
    watchers = [
        StreamWatcher(client, prompt, seed=7 + i * 100, output_format=OutputFormat.NPY)
        for i, prompt in enumerate(prompts)
    ]
    for watcher in watchers:
        watcher.queued()
    server.batcher.set_step_budget(None)
    batched = [watcher.completed().result for watcher in watchers]
    assert [result.batch_size for result in batched] == [4, 4, 4, 4]
    for index, (prompt, together) in enumerate(zip(prompts, batched, strict=True)):
        alone = client.generate(prompt, seed=7 + index * 100, output_format=OutputFormat.NPY)
        assert alone.batch_size == 1
        assert_same_image(pixels(together), pixels(alone))


def test_num_images_uses_consecutive_seeds(server: Any) -> None:
    client = server.client()
    together = client.generate(
        "three lanterns", seed=41, num_images=3, output_format=OutputFormat.NPY
    )
    assert [image.seed for image in together.images] == [41, 42, 43]
    for index, seed in enumerate((41, 42, 43)):
        single = client.generate("three lanterns", seed=seed, output_format=OutputFormat.NPY)
        assert_same_image(pixels(together, index), pixels(single))
    assert not np.array_equal(pixels(together, 0), pixels(together, 1))


@pytest.mark.parametrize(
    "output_format,mime,pil_format",
    [
        (OutputFormat.PNG, "image/png", "PNG"),
        (OutputFormat.JPEG, "image/jpeg", "JPEG"),
        (OutputFormat.WEBP, "image/webp", "WEBP"),
    ],
)
def test_encoded_images_decode_to_the_requested_size(
    server: Any, output_format: OutputFormat, mime: str, pil_format: str
) -> None:
    result = server.client().generate(
        "a teapot", width=96, height=64, seed=3, output_format=output_format
    )
    image = result.images[0]
    assert image.mime_type == mime
    decoded = Image.open(io.BytesIO(image.data))
    assert decoded.format == pil_format and decoded.size == (96, 64) and decoded.mode == "RGB"


def test_png_is_the_lossless_8_bit_rounding_of_the_float_image(server: Any) -> None:
    client = server.client()
    as_float = pixels(client.generate("a teapot", seed=5, output_format=OutputFormat.NPY))
    as_png = np.asarray(Image.open(io.BytesIO(client.generate("a teapot", seed=5).images[0].data)))
    # Rounding can flip where two float images differ by ~1e-7, so allow one level on a few pixels.
    assert np.abs(as_png.astype(int) - np.round(as_float * 255).astype(int)).max() <= 1


def test_a_random_seed_is_reported_and_reproduces_the_image(server: Any) -> None:
    client = server.client()
    first = client.generate("a kite", output_format=OutputFormat.NPY)
    again = client.generate("a kite", seed=first.images[0].seed, output_format=OutputFormat.NPY)
    assert_same_image(pixels(again), pixels(first))


def test_a_negative_prompt_keeps_its_tokens_past_the_prompt_limit(
    server_factory: Any, reference_pipeline: Any
) -> None:
    """Negative prompts are validated against max_negative_prompt_tokens, not
    max_prompt_tokens: two that differ only past the prompt's limit give their own images."""
    from imagegen_server.engine.prompts import PromptTokenizer

    count = PromptTokenizer(reference_pipeline).count
    prompt_limit = count("a fox") + 4
    shared = "blurry, low quality, watermark, text, jpeg artifacts, extra "
    assert count(shared) > prompt_limit  # the negatives below differ only past it
    client = server_factory(max_prompt_tokens=prompt_limit).client()
    images = []
    for negative in (shared + "limbs", shared + "fingers, deformed"):
        result = client.generate(
            "a fox",
            negative_prompt=negative,
            guidance_scale=4.0,
            seed=5,
            output_format=OutputFormat.NPY,
        )
        images.append(pixels(result))
        expected = pipeline_image(
            reference_pipeline, "a fox", 5, negative_prompt=negative, guidance=4.0
        )
        assert_same_image(images[-1], expected)
    assert float(np.abs(images[0] - images[1]).max()) > 1e-3


def test_vae_calls_take_as_many_images_as_the_probe_fits_with_the_same_pixels(
    tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU the memory probe limits how many images one VAE call takes (a 1024x1024 decode
    costs gigabytes each): five edits admitted together encode as 3 + 2 and their finished rows
    decode as 2 + 2 + 1, to the same pixels as one call each."""
    import dataclasses

    from imagegen_server.base.engine_api import EngineRequest
    from imagegen_server.base.types import InitImage
    from imagegen_server.engine.engine import Engine
    from imagegen_server.engine.memory import MemoryBudget, RowCost
    from imagegen_server.engine.model import load_model
    from support import engine_params

    engine = Engine(load_model(str(tiny_model)), prompt_cache_size=8, max_prompt_tokens=512)
    calls: dict[str, list[int]] = {"encode": [], "decode": []}

    def counted(kind: str, call: Any) -> Any:
        def counting(tensor: torch.Tensor, *args: Any) -> Any:
            calls[kind].append(len(tensor))
            return call(tensor, *args)

        return counting

    monkeypatch.setattr(engine.decoder, "images", counted("decode", engine.decoder.images))
    monkeypatch.setattr(
        engine.init_images, "posteriors", counted("encode", engine.init_images.posteriors)
    )
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))

    def run(group: str) -> dict[str, np.ndarray]:
        requests = [
            EngineRequest(
                f"{group}{i}",
                dataclasses.replace(
                    engine_params(f"r{i}", i),
                    init_image=InitImage(picture, 0.75, None),
                    steps=3,  # 0.75 of the 4-step schedule
                    schedule_steps=4,
                ),
            )
            for i in range(5)
        ]
        engine.add(group, requests)
        finished = {}
        while engine.has_work():
            finished.update(
                {f.request_id[1:]: f.images[0].pixels for f in engine.step(group).finished}
            )
        return finished

    together = run("a")
    assert calls == {"encode": [5], "decode": [5]}
    per_image = RowCost(engine.image_tokens(64, 64), fixed_bytes=0, per_row_bytes=1000)
    encode_cost = dataclasses.replace(per_image, per_row_bytes=800)
    budget = MemoryBudget(2500, 0.0, (), {"decode": (per_image,), "encode": (encode_cost,)})
    engine.limit_vae_calls(budget, cap=8)
    chunked = run("b")
    assert calls == {"encode": [5, 3, 2], "decode": [5, 2, 2, 1]}
    assert sorted(chunked) == sorted(together)
    for name, image in chunked.items():
        assert_same_image(image, together[name])

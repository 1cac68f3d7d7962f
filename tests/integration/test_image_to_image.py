"""Image-to-image and inpainting through the same batcher as text-to-image."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from imagegen_client import OutputFormat, Step
from PIL import Image
from support import ALL_ROWS, StreamWatcher, assert_same_image, pipeline_image, pixels, png

NPY = OutputFormat.NPY
PROMPT = "a boat on a lake"  # what the diffusers references are called with


# 0.6 of 10 steps: the float32 that carries 0.6 (0.60000002) would run 7 steps where diffusers
# runs 6, unless read back as the decimal sent.
@pytest.mark.parametrize("strength,steps", [(0.5, 8), (0.9, 8), (0.6, 10)])
def test_image_to_image_equals_the_diffusers_pipeline(
    server: Any, img2img: Any, picture: Image.Image, strength: float, steps: int
) -> None:
    result = server.client().generate(
        "a boat on a lake",
        init_image=png(picture),
        strength=strength,
        width=64,
        height=64,
        steps=steps,
        seed=11,
        output_format=NPY,
    )
    expected = pipeline_image(img2img, PROMPT, 11, steps=steps, image=picture, strength=strength)
    assert_same_image(pixels(result), expected)


@pytest.mark.parametrize("strength", [0.5, 0.9])
def test_inpainting_equals_the_diffusers_pipeline(
    server: Any, inpaint: Any, picture: Image.Image, mask: Image.Image, strength: float
) -> None:
    result = server.client().generate(
        "a boat on a lake",
        init_image=png(picture),
        mask_image=png(mask),
        strength=strength,
        width=64,
        height=64,
        steps=8,
        seed=11,
        output_format=NPY,
    )
    expected = pipeline_image(
        inpaint, PROMPT, 11, steps=8, image=picture, mask_image=mask, strength=strength
    )
    assert_same_image(pixels(result), expected)


def test_an_edit_is_encoded_alike_before_and_after_a_tiled_decode(
    server_factory: Any, img2img: Any, picture: Image.Image
) -> None:
    """The VAE has one tiling flag for encode and decode: a large text-to-image decode in tiles
    must not make the next, smaller edit's encode tiled too."""
    server = server_factory(vae_tiling_min_pixels=300 * 300, max_width=320, max_height=320)
    client = server.client()
    edit = {"init_image": png(picture), "strength": 0.6, "width": 288, "height": 288}
    before = pixels(client.generate("a boat on a lake", steps=4, seed=3, output_format=NPY, **edit))
    client.generate("a fox", width=320, height=320, steps=2, seed=1)  # decoded in tiles
    after = pixels(client.generate("a boat on a lake", steps=4, seed=3, output_format=NPY, **edit))
    assert_same_image(after, before)
    expected = pipeline_image(
        img2img, PROMPT, 3, width=288, height=288, steps=4, image=picture, strength=0.6
    )
    assert_same_image(before, expected)  # below the threshold: untiled, as diffusers encodes


def test_inpainting_keeps_the_unmasked_region_and_changes_the_masked_one(
    server: Any, inpaint: Any, picture: Image.Image, mask: Image.Image
) -> None:
    """The unmasked latents end exactly as the init image's; in pixels the tiny random VAE's
    mid-block attention mixes every latent into every pixel, so "unchanged" is stated as a
    tolerance against the init image's VAE round trip (a trained VAE decodes far more locally)."""
    client = server.client()
    common = {
        "init_image": png(picture),
        "strength": 1.0,
        "width": 64,
        "height": 64,
        "steps": 8,
        "seed": 5,
        "output_format": NPY,
    }
    inpainted = pixels(client.generate("a boat on a lake", mask_image=png(mask), **common))
    regenerated = pixels(client.generate("a boat on a lake", **common))  # no mask: all of it
    vae = inpaint.vae
    with torch.no_grad():  # the round trip with the same posterior sample (the seed's first draw)
        source = inpaint.image_processor.preprocess(picture, height=64, width=64).unsqueeze(2)
        latents = vae.encode(source).latent_dist.sample(torch.Generator("cpu").manual_seed(5))
        decoded = vae.decode(latents, return_dict=False)[0][:, :, 0]
        round_trip = inpaint.image_processor.postprocess(decoded, output_type="np")[0]
    keep = np.asarray(mask.resize((64, 64)), dtype=np.float32) < 128
    core = keep.copy()
    core[8:56, 8:56] = False  # away from the mask's edge

    def distance(image: np.ndarray, region: np.ndarray) -> float:
        return float(np.abs(image - round_trip).max(axis=-1)[region].mean())

    stated_tolerance = 0.03  # mean absolute difference, pixels in [0, 1]
    assert distance(inpainted, core) <= stated_tolerance
    assert distance(inpainted, core) < 0.5 * distance(regenerated, core)
    assert distance(inpainted, ~keep) > 2 * distance(inpainted, core)


def test_the_least_strength_runs_one_step(server: Any, picture: Image.Image) -> None:
    # The documented minimum, 1e-6, reaches the server as the float32 9.99999997e-07.
    watcher = StreamWatcher(
        server.client(),
        "faint",
        seed=1,
        steps=8,
        width=64,
        height=64,
        init_image=png(picture),
        strength=1e-6,
        output_format=NPY,
    )
    assert np.isfinite(pixels(watcher.completed().result)).all()
    assert [e.step for e in watcher.seen if isinstance(e, Step)] == [1]


def test_edits_share_batches_with_text_to_image_rows(
    server_factory: Any, picture: Image.Image, mask: Image.Image
) -> None:
    server = server_factory(step_budget=0, **ALL_ROWS)
    client = server.client()
    requests = [
        {"prompt": "text only", "seed": 1},
        {"prompt": "img2img", "seed": 2, "init_image": png(picture), "strength": 0.75},
        {
            "prompt": "inpaint",
            "seed": 3,
            "init_image": png(picture),
            "mask_image": png(mask),
            "strength": 1.0,
        },
    ]
    watchers = [
        StreamWatcher(
            client,
            r["prompt"],
            width=64,
            height=64,
            steps=8,
            output_format=NPY,
            **{k: v for k, v in r.items() if k != "prompt"},
        )
        for r in requests
    ]
    for watcher in watchers:
        watcher.queued()
    server.batcher.set_step_budget(None)
    batched = [watcher.completed().result for watcher in watchers]
    assert [result.batch_size for result in batched] == [3, 3, 3]  # one transformer batch
    steps = [max(e.step for e in w.seen if isinstance(e, Step)) for w in watchers]
    assert steps == [8, 6, 8]  # strength 0.75 of 8 steps runs the last 6
    for request, together in zip(requests, batched, strict=True):
        alone = client.generate(
            request["prompt"],
            width=64,
            height=64,
            steps=8,
            output_format=NPY,
            **{k: v for k, v in request.items() if k != "prompt"},
        )
        assert_same_image(pixels(together), pixels(alone))


def test_edits_stream_previews_and_default_to_the_init_images_size(
    server: Any, picture: Image.Image
) -> None:
    events = list(
        server.client().stream(
            "a boat",
            init_image=png(picture),
            strength=1.0,
            steps=6,
            preview_every_n_steps=2,
            seed=1,
        )
    )
    previews = [event.step for event in events if isinstance(event, Step) and event.previews]
    assert previews == [2, 4]
    image = events[-1].result.images[0]  # type: ignore[union-attr]
    assert (image.width, image.height) == (96, 80)  # 96x80 is already a multiple of 16
    with Image.open(io.BytesIO(image.data)) as decoded:
        assert decoded.size == (96, 80)


def test_cancelling_an_edit_mid_run_leaves_the_others_unchanged(
    server_factory: Any, picture: Image.Image
) -> None:
    server = server_factory(step_budget=0)
    client = server.client()
    keeper = StreamWatcher(
        client, "keeper", seed=1, steps=8, output_format=NPY, width=64, height=64
    )
    leaver = client.stream(
        "leaver", seed=2, steps=8, init_image=png(picture), strength=1.0, width=64, height=64
    )
    keeper.queued()
    next(leaver)
    server.batcher.set_step_budget(3)
    keeper.step(3)
    leaver.close()
    server.batcher.set_step_budget(None)
    kept = keeper.completed().result
    assert_same_image(
        pixels(kept),
        pixels(client.generate("keeper", seed=1, steps=8, output_format=NPY, width=64, height=64)),
    )


def bad(**fields: Any) -> pb.GenerateRequest:
    """A request with `fields` over a valid 64x64 one (a width or height of 0 is unset)."""
    return pb.GenerateRequest(
        **{"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 4, **fields}
    )


@pytest.fixture(scope="module")
def tiny_png(picture: Image.Image) -> bytes:
    return png(picture)


@pytest.mark.parametrize(
    "fields,field,message",
    [
        (
            {"init_image": b"\x89PNG not really"},
            "init_image",
            "not a decodable PNG, JPEG or WebP image",
        ),
        ({"init_image": "gif"}, "init_image", "GIF images are not accepted"),
        ({"init_image": "huge"}, "init_image", "pixels; allowed at most"),
        # Past Pillow's own decompression-bomb limit: still the server's limit in the message.
        ({"init_image": "bomb"}, "init_image", "allowed at most 16777216 pixels"),
        # An upload cut inside a PNG of several IDAT chunks: Pillow raises SyntaxError.
        ({"init_image": "cut"}, "init_image", "not a decodable PNG, JPEG or WebP image"),
        ({"init_image": "ok", "mask_image": "cut"}, "mask_image", "not a decodable"),
        ({"init_image": "ok", "mask_image": b"garbage"}, "mask_image", "not a decodable"),
        ({"init_image": "ok", "mask_image": "square"}, "mask_image", "aspect ratio"),
        ({"mask_image": "ok"}, "mask_image", "needs init_image"),
        ({"strength": 0.5}, "strength", "needs init_image"),
        ({"init_image": "ok", "strength": 1.5}, "strength", "outside [1e-06, 1]"),
        ({"init_image": "ok", "strength": 0.0}, "strength", "outside [1e-06, 1]"),
        # So small that the schedule's cut would run no step at all.
        ({"init_image": "ok", "strength": 1e-20}, "strength", "outside [1e-06, 1]"),
        # No size sent: the output size comes from the image, so the error names the image.
        (
            {"init_image": "tall", "width": 0, "height": 0},
            "init_image",
            "64x400 gives a 64x400 output, and height: 400 outside [32, 256]",
        ),
        (
            {"init_image": "small", "width": 0, "height": 0},
            "init_image",
            "20x20 gives a 16x16 output, and width: 16 outside [32, 256]",
        ),
        ({"init_image": "tall", "height": 400}, "height", "400 outside [32, 256]"),
        # One side sent: its own faults name it, the other side's name the image.
        ({"init_image": "tall", "width": 100, "height": 0}, "width", "100 is not a multiple"),
        ({"init_image": "tall", "width": 64, "height": 0}, "init_image", "height: 400 outside"),
    ],
)
def test_bad_init_images_and_masks_are_refused_naming_the_field(
    server: Any, picture: Image.Image, fields: dict[str, Any], field: str, message: str
) -> None:
    samples = {
        "ok": png(picture),
        "gif": _encoded(picture, "GIF"),
        "huge": png(Image.new("RGB", (5000, 4000))),
        "square": png(Image.new("L", (64, 64), 255)),
        "tall": png(Image.new("RGB", (64, 400))),
        "small": png(Image.new("RGB", (20, 20))),
        "bomb": _png_header_only(100_000, 100_000),
        "cut": _cut_inside_second_idat(png(_noise(256, 256))),
    }
    resolved = {
        key: samples.get(value, value) if isinstance(value, str) else value
        for key, value in fields.items()
    }
    request = bad(**resolved)
    with (
        grpc.insecure_channel(
            server.target, options=[("grpc.max_send_message_length", 64 << 20)]
        ) as channel,
        pytest.raises(grpc.RpcError) as failure,
    ):
        pb_grpc.ImageGenerationStub(channel).Generate(request, timeout=60)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.details().startswith(f"{field}:"), failure.value.details()
    assert message in failure.value.details(), failure.value.details()


def _encoded(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def _noise(width: int, height: int) -> Image.Image:
    values = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(values)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` RGB pixels and holds almost none."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + _png_chunk(b"IEND", b"")
    )


def _cut_inside_second_idat(data: bytes) -> bytes:
    """`data` (a PNG of several IDAT chunks) cut off just after the second IDAT's length."""
    first = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[first : first + 4])
    second = first + 12 + length
    assert data[second + 4 : second + 8] == b"IDAT", "the PNG has one IDAT chunk"
    return data[: second + 4]

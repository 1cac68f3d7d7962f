"""The GenerateRequest that `generate` and `stream` send, from keyword options."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from imagegen.v1 import imagegen_pb2 as pb

from .types import Adapter, OutputFormat


def build_request(
    prompt: str,
    *,
    negative_prompt: str = "",
    width: int = 0,
    height: int = 0,
    steps: int = 0,
    guidance_scale: float | None = None,
    seed: int | None = None,
    num_images: int = 1,
    output_format: OutputFormat = OutputFormat.PNG,
    output_quality: int = 0,
    adapters: Sequence[Adapter] = (),
    priority: int = 0,
    request_id: str = "",
    idempotency_key: str = "",
    preview_every_n_steps: int = 0,
    init_image: bytes | str | Path | None = None,
    strength: float | None = None,
    mask_image: bytes | str | Path | None = None,
    variant: str = "",
    reference_images: Sequence[bytes | str | Path] = (),
) -> pb.GenerateRequest:
    """A GenerateRequest; 0 means "the server's default" for sizes, steps, quality, priority.

    `init_image` (bytes or a file path) turns it into image-to-image with `strength`, and
    `mask_image` (white = regenerate) into inpainting. `reference_images` (bytes or file paths,
    "Picture 1" first) make it an instruction edit, for a server whose model is Qwen-Image-Edit
    (one) or Edit-Plus (up to three); without a size the output takes about one megapixel at
    the last reference's aspect ratio. `variant` picks one of the variants the server lists
    (`ServerInfo.variants`); "" = its default. With an `idempotency_key` the call is safe to
    repeat: a repeat joins the request in flight or gets its images again, and the request runs
    on if the connection drops (README, "Safe retries and cancel").
    """
    request = pb.GenerateRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        num_inference_steps=steps,
        num_images=num_images,
        output_format=int(output_format),  # type: ignore[arg-type]
        output_quality=output_quality,
        priority=priority,
        request_id=request_id,
        idempotency_key=idempotency_key,
        preview_every_n_steps=preview_every_n_steps,
        init_image=_image_bytes(init_image),
        mask_image=_image_bytes(mask_image),
        variant=variant,
        reference_images=[_image_bytes(image) for image in reference_images],
    )
    if strength is not None:
        request.strength = strength
    if guidance_scale is not None:
        request.guidance_scale = guidance_scale
    if seed is not None:
        request.seed = seed
    for adapter in adapters:
        request.adapters.add(name=adapter.name, scale=adapter.scale)
    return request


def _image_bytes(source: bytes | str | Path | None) -> bytes:
    if source is None:
        return b""
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def cancel_request(idempotency_key: str = "", request_id: str = "") -> pb.CancelGenerationRequest:
    """A CancelGenerationRequest naming the request by one of its ids.

    Raises:
        ValueError: neither or both ids given.
    """
    if bool(idempotency_key) == bool(request_id):
        raise ValueError("give exactly one of idempotency_key or request_id")
    if idempotency_key:
        return pb.CancelGenerationRequest(idempotency_key=idempotency_key)
    return pb.CancelGenerationRequest(request_id=request_id)

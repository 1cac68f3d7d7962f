"""GenerateRequest.reference_images -> ReferenceImages: counted against the model's limit,
decoded and checked like init images, each error naming `reference_images[i]`."""

from __future__ import annotations

import hashlib

from imagegen.v1 import imagegen_pb2 as pb

from ..base.errors import InvalidArgument
from ..base.limits import RequestLimits
from ..base.references import ReferenceImages
from .codec import decode_image

FIELD = "reference_images"


def decode_references(request: pb.GenerateRequest, limits: RequestLimits) -> ReferenceImages | None:
    """The request's reference images, decoded (CPU work: call it off the event loop); None
    when it sends none.

    Raises:
        InvalidArgument: naming reference_images (the count, or a model that takes none) or
            reference_images[i] (an image that does not decode or is over the pixel limit).
    """
    sent = list(request.reference_images)
    if not sent:
        return None
    allowed = limits.max_reference_images
    if not allowed:
        raise InvalidArgument(
            FIELD,
            f"{len(sent)} given, but this server's model is text-to-image and takes none"
            " (GetServerInfo: limits.max_reference_images = 0); serve a Qwen-Image-Edit model",
        )
    if len(sent) > allowed:
        raise InvalidArgument(FIELD, f"{len(sent)} given; allowed 1 to {allowed} for this model")
    images = tuple(
        decode_image(data, f"{FIELD}[{index}]", limits.max_init_image_pixels).convert("RGB")
        for index, data in enumerate(sent)
    )
    digest = hashlib.sha256()
    for data in sent:  # length-prefixed: two images never read as one
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return ReferenceImages(images, digest.hexdigest())


def check_edit_inputs(
    request: pb.GenerateRequest, limits: RequestLimits, has_references: bool
) -> None:
    """An edit model needs references and takes no init image; references need an edit model
    (checked when decoding).

    Raises:
        InvalidArgument: naming reference_images or init_image.
    """
    allowed = limits.max_reference_images
    if not allowed:
        return
    if request.init_image:
        raise InvalidArgument(
            "init_image",
            "this server's model edits from reference_images; init_image (SDEdit) is for"
            " text-to-image models",
        )
    if not has_references:
        raise InvalidArgument(FIELD, f"none given; this edit model takes 1 to {allowed}")

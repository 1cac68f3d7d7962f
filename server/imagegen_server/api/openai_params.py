"""OpenAI images request bodies -> the `GenerateRequest` the gRPC API takes.

The HTTP API validates nothing itself beyond the OpenAI shape: it fills a `GenerateRequest` and
the same `RequestValidator` as gRPC checks every range. This module owns only what OpenAI names
differently (`n`, `size`, `output_compression`, `image`, `mask`), what it has that we do not serve
(`response_format: url`), and our extension fields (`seed`, `num_inference_steps`, ...), which the
`openai` SDK sends through `extra_body`.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from imagegen.v1 import imagegen_pb2 as pb

from ..base.errors import InvalidArgument, NotFound
from ..base.limits import RequestLimits
from .codec import decode_image

MAX_PARTIAL_IMAGES = 3  # OpenAI's range for partial_images is 0-3
SIZE_PATTERN = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")
OUTPUT_FORMATS = {
    "png": pb.OUTPUT_FORMAT_PNG,
    "jpeg": pb.OUTPUT_FORMAT_JPEG,
    "webp": pb.OUTPUT_FORMAT_WEBP,
}
# Each field's JSON type. Multipart forms carry text, which is read as this type.
FIELD_TYPES: dict[str, type] = {
    "prompt": str,
    "model": str,
    "n": int,
    "size": str,
    "response_format": str,
    "output_format": str,
    "output_compression": int,
    "user": str,
    "stream": bool,
    "partial_images": int,
    # OpenAI fields that only choose among OpenAI's own models' behaviour: accepted, unused.
    "quality": str,
    "style": str,
    "background": str,
    "moderation": str,
    "input_fidelity": str,
    # Extensions (extra_body in the openai SDK).
    "seed": int,
    "num_inference_steps": int,
    "guidance_scale": float,
    "negative_prompt": str,
    "adapters": list,
    "priority": int,
    "strength": float,
    "variant": str,
}
IGNORED = frozenset({"quality", "style", "moderation", "input_fidelity", "user"})
# A validator's field name -> the OpenAI name a client sent it as (for the error's `param`).
OPENAI_FIELD_NAMES = {
    "width": "size",
    "height": "size",
    "num_images": "n",
    "output_quality": "output_compression",
    "init_image": "image",
    "mask_image": "mask",
}


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    """One images request in our terms, and how the caller wants its answer."""

    message: pb.GenerateRequest  # the fields as gRPC carries them, validated by RequestValidator
    stream: bool  # server-sent events instead of one JSON body
    partial_images: int  # previews sent while streaming, 0-3
    output_format: str  # png, jpeg or webp: echoed in the response


def parse_json_body(body: bytes) -> dict[str, Any]:
    """Raises InvalidArgument when the body is not a JSON object."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidArgument("body", f"not valid JSON ({error})") from error
    if not isinstance(value, dict):
        raise InvalidArgument("body", "expected a JSON object")
    return value


def form_fields(form: Mapping[str, str]) -> dict[str, Any]:
    """A multipart form's text fields read as their JSON types (`n=2` is the integer 2)."""
    fields: dict[str, Any] = {}
    for name, text in form.items():
        kind = FIELD_TYPES.get(name)
        fields[name] = text if kind in (None, str) else _form_value(name, text, kind)
    return fields


def images_request(
    sent: Mapping[str, Any],
    served_model: str,
    limits: RequestLimits,
    variants: Sequence[str] = (),
) -> OpenAIRequest:
    """Builds the GenerateRequest of a generations or edits body (images are set by the caller).
    `model` is the served model (its default variant) or one of its `variants` by name.

    Raises:
        InvalidArgument: an unknown field, a wrong type, or a value we do not serve, naming it.
        NotFound: `model` names neither the served model nor one of its variants.
    """
    for name, value in sent.items():
        _check_type(name, value)
    fields = {name: value for name, value in sent.items() if value is not None}  # null = default
    _check_zeros(fields, limits)
    message = pb.GenerateRequest(prompt=fields.get("prompt", ""))
    message.variant = _variant(fields, served_model, variants)
    _check_response_format(fields.get("response_format"))
    if fields.get("background") == "transparent":
        raise InvalidArgument("background", "transparent is not served; use opaque or auto")
    message.num_images = fields.get("n", 0)
    message.width, message.height = parse_size(fields.get("size"))
    output_format = fields.get("output_format") or "png"
    if output_format not in OUTPUT_FORMATS:
        raise InvalidArgument("output_format", f"{output_format!r}; allowed png, jpeg, webp")
    message.output_format = OUTPUT_FORMATS[output_format]
    if "output_compression" in fields:
        compression = fields["output_compression"]
        if not 0 <= compression <= 100:
            raise InvalidArgument("output_compression", f"{compression} outside [0, 100]")
        message.output_quality = max(compression, 1)  # the quality Pillow takes is 1-100
    _set_extensions(message, fields)
    partial_images = fields.get("partial_images", 0)
    if not 0 <= partial_images <= MAX_PARTIAL_IMAGES:
        raise InvalidArgument("partial_images", f"{partial_images} outside [0, 3]")
    return OpenAIRequest(message, bool(fields.get("stream")), partial_images, output_format)


def parse_size(size: str | None) -> tuple[int, int]:
    """`WIDTHxHEIGHT` -> (width, height); None or "auto" -> (0, 0), the server's default (or,
    for an edit, the image's own size)."""
    if size is None or size == "auto":
        return 0, 0
    match = SIZE_PATTERN.fullmatch(size)
    if match is None:
        raise InvalidArgument("size", f"{size!r}; expected WIDTHxHEIGHT (e.g. 1024x1024) or auto")
    return int(match[1]), int(match[2])


def openai_field(field: str) -> str:
    """The name a client sent a validator's field under (`num_images` -> `n`)."""
    if "." in field or "[" in field:  # adapters[0].name: sent under that name
        return field
    return OPENAI_FIELD_NAMES.get(field, field)


def openai_mask(data: bytes, max_pixels: int) -> bytes:
    """An OpenAI mask (a PNG whose transparent pixels mark what to edit) as the white-means-edit
    greyscale mask the engine takes, as PNG. A mask without alpha passes as it is: white marks
    what to edit, as in diffusers. CPU work: call it off the event loop.

    Raises:
        InvalidArgument: naming `mask`.
    """
    image = decode_image(data, "mask", max_pixels)
    if "transparency" in image.info:  # a palette or greyscale PNG with a transparent colour
        image = image.convert("RGBA")
    if "A" not in image.getbands():
        return data
    alpha = image.getchannel("A")
    edit = alpha.point(lambda value: 255 - value)
    buffer = io.BytesIO()
    edit.save(buffer, format="PNG")
    return buffer.getvalue()


def _set_extensions(message: pb.GenerateRequest, fields: Mapping[str, Any]) -> None:
    """Our fields that OpenAI has no name for; the validator checks their ranges."""
    for name in ("seed", "guidance_scale", "strength"):
        if name in fields:
            setattr(message, name, fields[name])
    message.num_inference_steps = fields.get("num_inference_steps", 0)
    message.priority = fields.get("priority", 0)
    message.negative_prompt = fields.get("negative_prompt", "")
    for index, adapter in enumerate(fields.get("adapters", [])):
        message.adapters.append(_adapter(index, adapter))


def _adapter(index: int, value: Any) -> pb.AdapterRef:
    """An adapter as a name, or as {"name": ..., "scale": ...}."""
    field = f"adapters[{index}]"
    if isinstance(value, str):
        return pb.AdapterRef(name=value)
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise InvalidArgument(field, 'expected a name or {"name": ..., "scale": ...}')
    unknown = set(value) - {"name", "scale"}
    if unknown:
        raise InvalidArgument(field, f"unknown keys {sorted(unknown)}; allowed name, scale")
    scale = value.get("scale")
    if scale is None:
        return pb.AdapterRef(name=value["name"])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise InvalidArgument(f"{field}.scale", "expected a number")
    return pb.AdapterRef(name=value["name"], scale=scale)


def _check_zeros(fields: Mapping[str, Any], limits: RequestLimits) -> None:
    """In protobuf 0 means "the default"; sent over HTTP it is a value out of range."""
    ranges = {
        "n": (1, limits.max_num_images),
        "num_inference_steps": (limits.min_steps, limits.max_steps),
        "priority": (1, limits.priority_levels),
    }
    for name, (low, high) in ranges.items():
        if fields.get(name) == 0:
            raise InvalidArgument(name, f"0 outside [{low}, {high}]")


def _variant(fields: Mapping[str, Any], served_model: str, variants: Sequence[str]) -> str:
    """The variant the body asks for ("" = the default): by `model`, as OpenAI clients choose
    among models, or by our `variant` extension (checked by the validator, NOT_FOUND if
    unknown)."""
    model: str | None = fields.get("model")
    if model is not None and model != served_model and model not in variants:
        served = ", ".join([served_model, *variants])
        raise NotFound(
            f"model: {model!r} is not served here (served: {served}); GET /v1/models lists them",
            "model",
        )
    by_model = model if model is not None and model in variants else ""
    variant: str = fields.get("variant", "")
    if variant and by_model and variant != by_model:
        raise InvalidArgument("variant", f"{variant!r} contradicts model {model!r}; send one")
    return variant or by_model


def _check_response_format(response_format: str | None) -> None:
    if response_format in (None, "b64_json"):
        return
    if response_format == "url":
        raise InvalidArgument(
            "response_format", "url is not served (this server keeps no images); use b64_json"
        )
    raise InvalidArgument("response_format", f"{response_format!r}; allowed b64_json")


def _check_type(name: str, value: Any) -> None:
    kind = FIELD_TYPES.get(name)
    if kind is None:
        raise InvalidArgument(name, f"unknown field; allowed {', '.join(sorted(FIELD_TYPES))}")
    if value is None:
        return  # an explicit null is the default, as in OpenAI's API
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidArgument(name, f"expected {_KIND_NAMES[kind]}, got {type(value).__name__}")


_KIND_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "a list",
}


def _form_value(name: str, text: str, kind: type) -> Any:
    if kind is bool and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return json.loads(text) if kind is list else kind(text)
    except ValueError as error:
        raise InvalidArgument(name, f"{text!r} is not {_KIND_NAMES[kind]}") from error

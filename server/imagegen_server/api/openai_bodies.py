"""What the HTTP API answers, in the shapes of OpenAI's images API: image bodies, stream events
and error bodies. `kind` is `image_generation` for generations and `image_edit` for edits."""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Any

from imagegen.v1 import imagegen_pb2 as pb
from starlette.responses import JSONResponse

from ..base.errors import ImageGenError
from .openai_params import OpenAIRequest, openai_field

# OpenAI's error `type` by HTTP status; 5xx are server_error.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
# Fields of OpenAI's stream events that choose among OpenAI's own models' behaviour.
STREAM_CONSTANTS = {"quality": "auto", "background": "opaque"}
# This server does not count tokens; the SDK's event types require the object.
NO_USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}


def images_body(response: pb.GenerateResponse, parsed: OpenAIRequest) -> dict[str, Any]:
    """OpenAI's ImagesResponse; each image also carries its `seed` (our extension)."""
    first = response.images[0]
    return {
        "created": int(time.time()),
        "data": [
            {"b64_json": base64.b64encode(image.data).decode("ascii"), "seed": image.seed}
            for image in response.images
        ],
        "background": "opaque",
        "output_format": parsed.output_format,
        "size": f"{first.width}x{first.height}",
    }


def error_body(error: ImageGenError) -> dict[str, Any]:
    """OpenAI's error object: `param` names the field as the client sent it (the error's own
    `field`, else the field its message starts with, as every error message here does)."""
    field = getattr(error, "field", None) or _leading_field(error.message)
    return {
        "error": {
            "message": error.message,
            "type": ERROR_TYPES.get(error.http_status, "server_error"),
            "param": openai_field(field) if field else None,
            "code": error.status.name.lower(),
        }
    }


def error_response(error: ImageGenError) -> JSONResponse:
    """The error's HTTP status and body; `Retry-After` when the error says when to retry."""
    headers = {}
    retry_after_s = getattr(error, "retry_after_s", None)
    if retry_after_s is not None:  # whole seconds, rounded up (RFC 9110)
        headers["Retry-After"] = str(max(1, int(-(-retry_after_s // 1))))
    return JSONResponse(error_body(error), status_code=error.http_status, headers=headers)


def plain_error(status: int, message: str, code: str) -> JSONResponse:
    """An error that no typed error stands for: an unknown route (404), a wrong method (405),
    a route declared before what it serves (501, gRPC's UNIMPLEMENTED)."""
    error = {
        "message": message,
        "type": ERROR_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        ),
        "param": None,
        "code": code,
    }
    return JSONResponse({"error": error}, status_code=status)


def server_sent(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event: its type, then its JSON on one data line."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def partial_event(kind: str, jpeg: bytes, index: int, size: str) -> bytes:
    """`<kind>.partial_image`: a step preview, numbered from 0."""
    return server_sent(
        f"{kind}.partial_image",
        {
            "type": f"{kind}.partial_image",
            "b64_json": base64.b64encode(jpeg).decode("ascii"),
            "created_at": int(time.time()),
            "size": size,
            "output_format": "jpeg",  # previews are JPEG whatever the image's format
            "partial_image_index": index,
            **STREAM_CONSTANTS,
        },
    )


def completed_event(kind: str, image: pb.Image, size: str, output_format: str) -> bytes:
    """`<kind>.completed`: one finished image, with its `seed` (our extension)."""
    return server_sent(
        f"{kind}.completed",
        {
            "type": f"{kind}.completed",
            "b64_json": base64.b64encode(image.data).decode("ascii"),
            "created_at": int(time.time()),
            "size": size,
            "output_format": output_format,
            "usage": NO_USAGE,
            "seed": image.seed,
            **STREAM_CONSTANTS,
        },
    )


# "field: problem", the convention of every error message; the field may be indexed or dotted.
_LEADING_FIELD = re.compile(r"([a-z_][a-z0-9_]*(?:\[\d+\])?(?:\.[a-z_][a-z0-9_]*)*): ")


def _leading_field(message: str) -> str | None:
    match = _LEADING_FIELD.match(message)
    return match.group(1) if match else None

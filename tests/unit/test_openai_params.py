"""OpenAI images bodies -> GenerateRequest, and the one HTTP status table: no server needed."""

from __future__ import annotations

from typing import Any

import pytest
from imagegen.v1 import imagegen_pb2 as pb
from imagegen_server.api.http_api import with_partial_images
from imagegen_server.api.openai_params import (
    form_fields,
    images_request,
    openai_field,
    parse_size,
)
from imagegen_server.base.errors import (
    HTTP_STATUS,
    InvalidArgument,
    NotFound,
    RateLimited,
    RequestTooLarge,
    Status,
)
from support import engine_params

MODEL = "Qwen/Qwen-Image"


class Limits:
    """The three ranges images_request reads."""

    max_num_images = 4
    min_steps, max_steps = 2, 50
    priority_levels = 3


def request(**fields: Any) -> Any:
    return images_request({"prompt": "a fox", **fields}, MODEL, Limits())  # type: ignore[arg-type]


def refused(field: str, **fields: Any) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as failure:
        request(**fields)
    assert failure.value.field == field, failure.value.message
    return failure.value


def test_every_status_has_one_http_status_and_too_large_is_413() -> None:
    assert set(HTTP_STATUS) == set(Status)
    assert len(set(HTTP_STATUS.values())) == len(Status)
    assert RequestTooLarge("big").http_status == 413
    assert RequestTooLarge("big").status is Status.RESOURCE_EXHAUSTED
    assert RateLimited("slow down", 1.5).http_status == 429
    assert NotFound("model: no", "model").http_status == 404


def test_openai_fields_become_the_grpc_fields() -> None:
    parsed = request(
        model=MODEL,
        n=2,
        size="512x256",
        output_format="webp",
        output_compression=80,
        seed=5,
        num_inference_steps=8,
        guidance_scale=4,
        negative_prompt="blur",
        adapters=["ink", {"name": "neon", "scale": 0.5}],
        priority=1,
        stream=True,
        partial_images=2,
        quality="high",
        user="someone",
    )
    message = parsed.message
    assert (message.num_images, message.width, message.height) == (2, 512, 256)
    assert message.output_format == pb.OUTPUT_FORMAT_WEBP and message.output_quality == 80
    assert (message.seed, message.num_inference_steps, message.guidance_scale) == (5, 8, 4.0)
    assert [(a.name, a.HasField("scale")) for a in message.adapters] == [
        ("ink", False),
        ("neon", True),
    ]
    assert (parsed.stream, parsed.partial_images, parsed.output_format) == (True, 2, "webp")


def test_defaults_stay_the_servers_and_null_means_default() -> None:
    message = request(size="auto", n=None, seed=None).message
    assert (message.width, message.height, message.num_images) == (0, 0, 0)
    assert not message.HasField("seed")
    assert parse_size(None) == (0, 0)


@pytest.mark.parametrize(
    "field,fields",
    [
        ("size", {"size": "1024"}),
        ("size", {"size": "0x64"}),
        ("response_format", {"response_format": "url"}),
        ("output_format", {"output_format": "gif"}),
        ("output_compression", {"output_compression": 101}),
        ("partial_images", {"partial_images": 4}),
        ("n", {"n": 0}),
        ("n", {"n": "2"}),
        ("n", {"n": True}),
        ("num_inference_steps", {"num_inference_steps": 0}),
        ("stream", {"stream": "yes"}),
        ("adapters[0]", {"adapters": [{"name": "ink", "weight": 1}]}),
        ("adapters[0].scale", {"adapters": [{"name": "ink", "scale": "1"}]}),
        ("steps", {"steps": 4}),
        ("background", {"background": "transparent"}),
    ],
)
def test_bad_fields_are_refused_naming_them(field: str, fields: dict[str, Any]) -> None:
    refused(field, **fields)


def test_another_model_is_not_found_naming_model() -> None:
    with pytest.raises(NotFound) as failure:
        request(model="dall-e-3")
    assert failure.value.field == "model"


def test_form_fields_are_read_as_their_json_types() -> None:
    fields = form_fields(
        {"prompt": "42", "n": "2", "stream": "true", "guidance_scale": "3.5", "adapters": '["a"]'}
    )
    assert fields == {
        "prompt": "42",
        "n": 2,
        "stream": True,
        "guidance_scale": 3.5,
        "adapters": ["a"],
    }
    with pytest.raises(InvalidArgument) as failure:
        form_fields({"n": "two"})
    assert failure.value.field == "n"


def test_validator_fields_are_named_as_the_client_sent_them() -> None:
    assert [openai_field(name) for name in ("width", "num_images", "init_image", "seed")] == [
        "size",
        "n",
        "image",
        "seed",
    ]
    assert openai_field("adapters[1].name") == "adapters[1].name"


@pytest.mark.parametrize(
    "steps,partials,every", [(4, 2, 1), (8, 2, 2), (30, 3, 7), (2, 3, 1), (8, 0, 0)]
)
def test_partial_images_are_spread_over_the_steps(steps: int, partials: int, every: int) -> None:
    params = engine_params("spread", steps=steps)
    assert with_partial_images(params, partials).preview_every_n_steps == every

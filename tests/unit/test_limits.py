"""Request limits are listed once (base/limits.py) and GetServerInfo reports every one of them."""

from __future__ import annotations

import dataclasses

import pytest
from imagegen.v1 import imagegen_pb2 as pb
from imagegen_server.base.config import load_settings
from imagegen_server.base.limits import RequestLimits

# Limits the proto reports that are not a number in RequestLimits.
PROTO_ONLY = {"output_formats"}


def test_every_limit_is_in_the_limits_message_and_back() -> None:
    ours = {field.name for field in dataclasses.fields(RequestLimits)}
    proto = {field.name for field in pb.Limits.DESCRIPTOR.fields} - PROTO_ONLY
    assert ours - proto == set(), "limits GetServerInfo would not report"
    assert proto - ours == set(), "Limits fields nothing fills"


def test_limits_come_from_the_settings_of_the_same_name() -> None:
    settings = load_settings(model="m", default_output_quality=77, max_steps=40, default_width=512)
    limits = RequestLimits.from_settings(settings, size_multiple=16, min_steps=2)
    assert limits.default_output_quality == 77
    assert limits.max_steps == 40
    assert limits.default_width == 512
    assert (limits.size_multiple, limits.min_steps) == (16, 2)
    assert limits.default_steps == settings.resolved_default_steps


def test_a_size_that_the_model_cannot_make_names_its_setting() -> None:
    settings = load_settings(model="m", default_width=520)
    with pytest.raises(ValueError, match=r"default_width \(520\) must be a multiple of 16"):
        RequestLimits.from_settings(settings, size_multiple=16, min_steps=2)

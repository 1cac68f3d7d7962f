"""The client's typed server descriptions: every proto field has a dataclass field, every value
arrives, and no protobuf object leaks out of the client. No sockets."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from imagegen.v1 import imagegen_pb2 as pb
from imagegen_client import (
    AdapterInfo,
    AsyncImageGenClient,
    BatchingInfo,
    ImageGenClient,
    Limits,
    OutputFormat,
    ResolutionBatchLimit,
    ServerInfo,
)
from imagegen_client.cli import _info

TYPED = [
    (ServerInfo, pb.ServerInfo),
    (Limits, pb.Limits),
    (BatchingInfo, pb.BatchingInfo),
    (ResolutionBatchLimit, pb.ResolutionBatchLimit),
    (AdapterInfo, pb.AdapterInfo),
]


@pytest.mark.parametrize(("typed", "message"), TYPED, ids=[t.__name__ for t, _ in TYPED])
def test_every_message_field_has_a_dataclass_field(typed: type, message: type[Message]) -> None:
    ours = [item.name for item in dataclasses.fields(typed)]
    proto = [item.name for item in message.DESCRIPTOR.fields]
    assert set(proto) - set(ours) == set(), f"{typed.__name__} misses proto fields"
    assert set(ours) - set(proto) == set(), f"{typed.__name__} has fields the proto lacks"
    assert typed.__dataclass_params__.frozen and hasattr(typed, "__slots__")  # type: ignore[attr-defined]


def test_limits_has_the_new_default_output_quality() -> None:
    limits = Limits.from_proto(pb.Limits(default_output_quality=77))
    assert limits.default_output_quality == 77


def test_a_fully_filled_server_info_arrives_field_by_field() -> None:
    message = filled(pb.ServerInfo)
    info = ServerInfo.from_proto(message)
    assert_same(info, message)
    hash(info)  # frozen all the way down: no protobuf container left inside
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.ready = False  # type: ignore[misc]
    assert isinstance(info.limits, Limits) and isinstance(info.batching, BatchingInfo)
    assert isinstance(info.batching.batch_limits[0], ResolutionBatchLimit)
    assert isinstance(info.adapters[0], AdapterInfo)


def test_output_formats_become_the_enum_and_unknown_ones_are_left_out() -> None:
    message = pb.Limits(output_formats=[pb.OUTPUT_FORMAT_PNG, pb.OUTPUT_FORMAT_NPY])
    message.output_formats.append(99)  # a format a newer server offers and this client lacks
    assert Limits.from_proto(message).output_formats == (OutputFormat.PNG, OutputFormat.NPY)


def test_an_empty_server_info_is_all_defaults() -> None:
    """What a server still loading its model sends."""
    info = ServerInfo.from_proto(pb.ServerInfo(server_version="1.0"))
    assert (info.server_version, info.ready, info.model, info.adapters) == ("1.0", False, "", ())
    assert info.limits.max_width == 0 and info.batching.batch_limits == ()


class FakeRpc:
    """Stands in for a stub method: returns `response` (awaitable when `asynchronous`)."""

    def __init__(self, response: Message, asynchronous: bool = False) -> None:
        self.response, self.asynchronous = response, asynchronous
        self.requests: list[Message] = []

    def __call__(self, request: Message, **kwargs: Any) -> Any:
        self.requests.append(request)
        if not self.asynchronous:
            return self.response

        async def respond() -> Message:
            return self.response

        return respond()


def fake_stubs(client: Any, asynchronous: bool = False) -> None:
    info = filled(pb.ServerInfo)
    adapters = pb.ListAdaptersResponse(adapters=[filled(pb.AdapterInfo), pb.AdapterInfo(name="b")])
    client._stub = argparse.Namespace(GetServerInfo=FakeRpc(info, asynchronous))
    client._admin = argparse.Namespace(
        LoadAdapter=FakeRpc(filled(pb.AdapterInfo), asynchronous),
        ListAdapters=FakeRpc(adapters, asynchronous),
        UnloadAdapter=FakeRpc(pb.UnloadAdapterResponse(), asynchronous),
    )


def test_the_blocking_client_returns_dataclasses() -> None:
    with ImageGenClient("127.0.0.1:1") as client:
        fake_stubs(client)
        assert client.server_info() == ServerInfo.from_proto(filled(pb.ServerInfo))
        assert client.load_adapter("ink") == AdapterInfo.from_proto(filled(pb.AdapterInfo))
        assert client._admin.LoadAdapter.requests == [pb.LoadAdapterRequest(name="ink")]
        listed = client.list_adapters()
        assert [type(a) for a in listed] == [AdapterInfo, AdapterInfo] and listed[1].name == "b"
        client.unload_adapter("ink")
        assert client._admin.UnloadAdapter.requests == [pb.UnloadAdapterRequest(name="ink")]


def test_the_async_client_returns_dataclasses() -> None:
    async def calls() -> tuple[ServerInfo, AdapterInfo, list[AdapterInfo]]:
        async with AsyncImageGenClient("127.0.0.1:1") as client:
            fake_stubs(client, asynchronous=True)
            await client.unload_adapter("ink")
            return (
                await client.server_info(),
                await client.load_adapter("ink"),
                await client.list_adapters(),
            )

    info, loaded, listed = asyncio.run(calls())
    assert info == ServerInfo.from_proto(filled(pb.ServerInfo))
    assert loaded == AdapterInfo.from_proto(filled(pb.AdapterInfo))
    assert [a.name for a in listed] == [loaded.name, "b"]


def test_cli_info_prints_the_field_names_and_format_names(
    capsys: pytest.CaptureFixture[str],
) -> None:
    message = filled(pb.ServerInfo)
    client = argparse.Namespace(server_info=lambda: ServerInfo.from_proto(message))
    assert _info(client, argparse.Namespace()) == 0  # type: ignore[arg-type]
    printed = json.loads(capsys.readouterr().out)
    assert printed["limits"]["default_output_quality"] == message.limits.default_output_quality
    assert printed["limits"]["output_formats"] == ["jpeg", "jpeg"]
    assert printed["batching"]["batch_limits"][0]["max_batch_size"] > 0
    assert printed["adapters"][0]["name"] == message.adapters[0].name


def filled(message_type: type[Message]) -> Any:
    """A message with every field set to a value of its own (repeated fields twice), so that a
    field copied into the wrong place or not at all shows."""
    message = message_type()
    fields: list[FieldDescriptor] = list(message.DESCRIPTOR.fields)
    for number, field in enumerate(fields, start=1):
        values = [_value(field, number), _value(field, number + 100)]
        if field.is_repeated:
            getattr(message, field.name).extend(values)
        elif field.message_type is not None:
            getattr(message, field.name).CopyFrom(values[0])
        else:
            setattr(message, field.name, values[0])
    return message


def _value(field: FieldDescriptor, number: int) -> Any:
    if field.message_type is not None:
        return filled(_message_class(field.message_type))
    if field.enum_type is not None:
        return pb.OUTPUT_FORMAT_JPEG
    if field.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        return True
    if field.cpp_type == FieldDescriptor.CPPTYPE_STRING:
        return f"{field.name}-{number}"
    if field.cpp_type in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
        return number + 0.5
    return number


def _message_class(descriptor: Descriptor) -> type[Message]:
    message_class: type[Message] = getattr(pb, descriptor.name)
    return message_class


def assert_same(typed: Any, message: Message) -> None:
    """Every field of `message` has the same value in `typed`, nested messages included."""
    for field in message.DESCRIPTOR.fields:
        ours, theirs = getattr(typed, field.name), getattr(message, field.name)
        if field.message_type is None:
            expected = tuple(theirs) if field.is_repeated else theirs
            assert ours == expected, field.name
        elif field.is_repeated:
            assert isinstance(ours, tuple) and len(ours) == len(theirs), field.name
            for item, item_message in zip(ours, theirs, strict=True):
                assert_same(item, item_message)
        else:
            assert_same(ours, theirs)

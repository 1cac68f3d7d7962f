"""Unit tests open no sockets (README, "tests/unit"): every test here runs with Python sockets'
connect and bind and gRPC servers refused, so a test that needs the network fails here and
belongs in tests/integration. (A gRPC channel may be built, as the clients build theirs, but its
calls go to fake stubs.)"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import grpc
import pytest


def _refuse(*_args: Any, **_kwargs: Any) -> Any:
    raise AssertionError("a unit test opened a socket or a gRPC server: move it to integration")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket.socket, "bind", _refuse)
    monkeypatch.setattr(grpc, "server", _refuse)
    monkeypatch.setattr(grpc.aio, "server", _refuse)
    yield

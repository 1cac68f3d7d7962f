"""Serves the HTTP API with uvicorn inside the event loop that runs grpc.aio.

uvicorn's `Server.serve` would install its own signal handlers over the server's drain; its
`startup` / `shutdown` halves are used instead, on a socket bound here like the gRPC port: the
same host, 0 for any free port, no SO_REUSEPORT (a taken port fails the start instead of
sharing it), and the gRPC port's TLS settings (certificate, key, client CA for mutual TLS).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

import uvicorn
from starlette.types import ASGIApp

from ..base.config import Settings

log = logging.getLogger(__name__)


class HttpServer:
    """One uvicorn server on its own port; `start` binds and listens, `stop` lets in-flight
    responses finish within a grace period."""

    def __init__(self, app: ASGIApp, settings: Settings, grace_s: float) -> None:
        tls = settings.tls_cert_file is not None
        self._config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,  # the server's own logging
            access_log=False,
            proxy_headers=False,  # the peer is the rate-limit key: never taken from a header
            server_header=False,
            timeout_graceful_shutdown=int(grace_s) or 1,
            ssl_certfile=settings.tls_cert_file if tls else None,
            ssl_keyfile=settings.tls_key_file if tls else None,
            ssl_ca_certs=settings.tls_client_ca_file,
            ssl_cert_reqs=ssl.CERT_REQUIRED if settings.tls_client_ca_file else ssl.CERT_NONE,
        )
        self._host = settings.host
        self._port = settings.http_port or 0
        self._server = uvicorn.Server(self._config)
        self._ticks: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        """Binds and starts serving; returns the bound port.

        Raises:
            OSError: the port is taken or the address is not local.
        """
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.create_server((self._host, self._port), family=family)
        self.port = int(sock.getsockname()[1])
        self._config.load()
        self._server.lifespan = self._config.lifespan_class(self._config)  # what serve() sets
        await self._server.startup(sockets=[sock])
        # The date header's clock and the exit flag; what uvicorn's own loop would run.
        self._ticks = asyncio.ensure_future(self._server.main_loop())
        return self.port

    async def stop(self, graceful: bool = True) -> None:
        """Stops listening; in-flight requests finish within the grace (or are cut now)."""
        if self._ticks is None:
            return
        self._server.should_exit = True
        self._server.force_exit = not graceful
        await self._ticks
        self._ticks = None
        await self._server.shutdown()

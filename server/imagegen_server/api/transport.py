"""How clients reach the server: ports, TLS / mutual TLS, message sizes, who may call what."""

from __future__ import annotations

from typing import Any

import grpc

from ..base.config import MAX_MESSAGE_BYTES, Settings
from .auth import Guard, RateLimiter, Role, TokenAuthenticator

# Room for the protobuf framing around the pixels.
MESSAGE_OVERHEAD_BYTES = 1 << 20
API_SERVICE = "/imagegen.v1.ImageGeneration/"
ADMIN_SERVICE = "/imagegen.v1.AdapterAdmin/"
HEALTH_SERVICE = "/grpc.health.v1.Health/"
REFLECTION_SERVICES = ("/grpc.reflection.v1alpha.", "/grpc.reflection.v1.")
RATE_LIMITED = frozenset({f"{API_SERVICE}Generate", f"{API_SERVICE}StreamProgress"})
# gRPC binds with SO_REUSEPORT by default: a second server on a taken port would start and
# silently take half the connections, instead of failing to start.
EXCLUSIVE_PORT = ("grpc.so_reuseport", 0)


def max_response_bytes(settings: Settings) -> int:
    """Largest response: the most images at the most pixels as float32 NPY, the widest format,
    within what one gRPC message can be."""
    widest = settings.max_num_images * settings.max_pixels * 3 * 4 + MESSAGE_OVERHEAD_BYTES
    return min(widest, MAX_MESSAGE_BYTES)


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        EXCLUSIVE_PORT,
        ("grpc.max_send_message_length", max_response_bytes(settings)),
        ("grpc.max_receive_message_length", settings.max_request_bytes),
    ]
    if settings.max_connection_age_s > 0:
        # Long-lived connections pin clients to old replicas; a periodic GOAWAY lets
        # round-robin clients find new ones. The grace lets in-flight generations finish.
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.drain_timeout_s * 1000)),
        ]
    return options


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials when a certificate is configured; client certificates required (mutual
    TLS) when a client CA is."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def build_guard(settings: Settings) -> Guard | None:
    """The per-call checks the settings ask for, or None when there are none.

    Raises:
        ValueError: the token file is malformed or holds placeholder tokens.
    """
    authenticator = (
        TokenAuthenticator.from_file(settings.auth_tokens_file)
        if settings.auth_tokens_file
        else None
    )
    limiter = (
        RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst, settings.rate_limit_clients)
        if settings.rate_limit_rps > 0
        else None
    )
    if authenticator is None and limiter is None:
        return None

    def required_role(method: str) -> Role | None:
        if method.startswith(ADMIN_SERVICE):
            return Role.ADMIN
        if method.startswith(HEALTH_SERVICE) and settings.auth_exempt_health:
            return None
        if method.startswith(REFLECTION_SERVICES) and settings.auth_exempt_reflection:
            return None
        return Role.CLIENT

    return Guard(authenticator, required_role, limiter, RATE_LIMITED.__contains__)

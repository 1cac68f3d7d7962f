"""Authentication, authorisation, TLS and mutual TLS, and the rate limit, on a real server."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from imagegen_client import ImageGenClient, RetryPolicy, TlsConfig

CLIENT_TOKEN = "client-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789ab"
NO_RETRY = RetryPolicy(max_attempts=1)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"# test tokens\nclient:{CLIENT_TOKEN}\nadmin:{ADMIN_TOKEN}\n")
    return path


@pytest.fixture(scope="module")
def auth_server(tiny_model: Path, tokens: Path) -> Any:
    from support import start_server

    running = start_server(
        tiny_model, auth_tokens_file=str(tokens), adapter_dir=str(tiny_model / "adapters")
    )
    yield running
    running.stop()


def rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failure:
        call()
    return failure.value


def test_no_or_wrong_token_is_unauthenticated(auth_server: Any) -> None:
    for token in (None, "not-a-known-token-at-all"):
        error = rpc_error(lambda t=token: auth_server.client(token=t, retry=NO_RETRY).generate("x"))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    metrics = auth_server.metrics()
    assert (
        metrics['imagegen_requests_total{code="UNAUTHENTICATED",protocol="grpc",rpc="Generate"}']
        == 2
    )
    anonymous_admin = auth_server.client(retry=NO_RETRY)
    assert rpc_error(anonymous_admin.list_adapters).code() == grpc.StatusCode.UNAUTHENTICATED


def test_client_token_generates_but_may_not_administer(auth_server: Any) -> None:
    client = auth_server.client(token=CLIENT_TOKEN, retry=NO_RETRY)
    assert client.generate("allowed", seed=1).images
    for call in (
        client.list_adapters,
        lambda: client.load_adapter("ink"),
        lambda: client.unload_adapter("ink"),
    ):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "needs the admin role" in error.details()


def test_admin_token_administers_adapters(auth_server: Any) -> None:
    admin = auth_server.client(token=ADMIN_TOKEN, retry=NO_RETRY)
    assert admin.load_adapter("ink").loaded
    assert {a.name for a in admin.list_adapters() if a.loaded} == {"ink"}
    admin.unload_adapter("ink")


def test_health_and_reflection_need_no_token(auth_server: Any) -> None:
    with grpc.insecure_channel(auth_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(
            reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
        )
        assert answer.list_services_response.service


def test_closed_health_and_reflection_need_a_token(server_factory: Any, tokens: Path) -> None:
    server = server_factory(
        auth_tokens_file=str(tokens), auth_exempt_health=False, auth_exempt_reflection=False
    )
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        error = rpc_error(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = health.Check(
            health_pb2.HealthCheckRequest(),
            timeout=10,
            metadata=(("authorization", f"Bearer {CLIENT_TOKEN}"),),
        )
        assert ok.status == health_pb2.HealthCheckResponse.SERVING
        # Watch (a handler that writes rather than yields) is guarded the same way.
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert rpc_error(lambda: next(watch)).code() == grpc.StatusCode.UNAUTHENTICATED
        watch = health.Watch(
            health_pb2.HealthCheckRequest(),
            timeout=10,
            metadata=(("authorization", f"Bearer {CLIENT_TOKEN}"),),
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        error = rpc_error(
            lambda: next(reflection.ServerReflectionInfo(iter([request]), timeout=10))
        )
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    with ImageGenClient(server.target, token=CLIENT_TOKEN, retry=NO_RETRY) as client:
        assert client.health() == "SERVING"  # the client sends its token on health checks too


def test_placeholder_tokens_stop_the_server_from_starting(
    server_factory: Any, tmp_path: Path
) -> None:
    path = tmp_path / "tokens"
    path.write_text("admin:REPLACE-ME-admin-token-please\n")
    with pytest.raises(ValueError, match="placeholder"):
        server_factory(auth_tokens_file=str(path))


def test_rate_limit_trips_with_a_retry_hint_and_recovers(server_factory: Any, tokens: Path) -> None:
    server = server_factory(auth_tokens_file=str(tokens), rate_limit_rps=4, rate_limit_burst=2)
    strict = server.client(token=CLIENT_TOKEN, retry=NO_RETRY)
    strict.generate("one", seed=1, steps=2)
    strict.generate("two", seed=2, steps=2)
    error = rpc_error(lambda: strict.generate("three", seed=3, steps=2))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_after_ms = int(dict(error.trailing_metadata())["retry-after-ms"])
    assert 0 < retry_after_ms <= 250
    # Another client has its own bucket.
    assert (
        server.client(token=ADMIN_TOKEN, retry=NO_RETRY).generate("admin", seed=4, steps=2).images
    )
    # A client that honours the hint gets through once the bucket refills.
    patient = server.client(
        token=CLIENT_TOKEN,
        retry=RetryPolicy(
            max_attempts=5, retryable=frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})
        ),
    )
    assert patient.generate("after the wait", seed=5, steps=2).images


def test_a_retry_wait_longer_than_the_deadline_returns_the_servers_status(
    server_factory: Any, tokens: Path
) -> None:
    # A bucket that refills in 10 s: the hint is longer than the call's 2 s deadline.
    server = server_factory(auth_tokens_file=str(tokens), rate_limit_rps=0.1, rate_limit_burst=1)
    client = server.client(
        token=CLIENT_TOKEN,
        retry=RetryPolicy(
            max_attempts=5, retryable=frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})
        ),
    )
    client.generate("the burst", seed=1, steps=2)
    error = rpc_error(lambda: client.generate("over the limit", seed=2, steps=2, timeout_s=2))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # not a DEADLINE_EXCEEDED of its own


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # signed by another CA
    stranger_key: Path


def _key_and_name(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Name]:
    return ec.generate_private_key(ec.SECP256R1()), x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _certificate(
    subject: x509.Name,
    key: Any,
    issuer: x509.Name,
    issuer_key: Any,
    ca: bool,
    dns: list[str] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in dns]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(
    directory: Path, name: str, certificate: x509.Certificate, key: Any
) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for localhost, a client certificate, and a stranger's."""
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca_name = _key_and_name("imagegen test CA")
    ca_cert = _certificate(ca_name, ca_key, ca_name, ca_key, ca=True)
    ca_path, _ = _write(directory, "ca", ca_cert, ca_key)
    server_key, server_name = _key_and_name("localhost")
    server = _write(
        directory,
        "server",
        _certificate(server_name, server_key, ca_name, ca_key, False, ["localhost"]),
        server_key,
    )
    client_key, client_name = _key_and_name("a client")
    client = _write(
        directory,
        "client",
        _certificate(client_name, client_key, ca_name, ca_key, False),
        client_key,
    )
    other_key, other_name = _key_and_name("another CA")
    stranger_key, stranger_name = _key_and_name("a stranger")
    stranger = _write(
        directory,
        "stranger",
        _certificate(stranger_name, stranger_key, other_name, other_key, False),
        stranger_key,
    )
    return Pki(ca_path, *server, *client, *stranger)


def tls_client(
    server: Any, pki: Pki, cert: Path | None = None, key: Path | None = None
) -> ImageGenClient:
    return server.client(
        tls=TlsConfig.from_files(pki.ca, cert, key, server_name="localhost"),
        retry=NO_RETRY,
        timeout_s=30,
    )


def test_tls_serves_encrypted_clients_and_refuses_plaintext(server_factory: Any, pki: Pki) -> None:
    server = server_factory(
        tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key), health_port=0
    )
    assert tls_client(server, pki).generate("over TLS", seed=1).images
    plain = server.client(retry=NO_RETRY, timeout_s=10)
    assert rpc_error(lambda: plain.generate("plaintext")).code() == grpc.StatusCode.UNAVAILABLE
    # Probes that cannot speak TLS use the plaintext health-only port.
    with grpc.insecure_channel(f"127.0.0.1:{server.server.health_port}") as channel:
        status = (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(), timeout=10)
            .status
        )
        assert status == health_pb2.HealthCheckResponse.SERVING
        from imagegen.v1 import imagegen_pb2, imagegen_pb2_grpc

        stub = imagegen_pb2_grpc.ImageGenerationStub(channel)
        error = rpc_error(
            lambda: stub.GetServerInfo(imagegen_pb2.GetServerInfoRequest(), timeout=10)
        )
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED  # nothing but health there


def test_mutual_tls_needs_a_client_certificate_from_the_ca(server_factory: Any, pki: Pki) -> None:
    server = server_factory(
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_client_ca_file=str(pki.ca),
    )
    assert (
        tls_client(server, pki, pki.client_cert, pki.client_key).generate("mutual", seed=1).images
    )
    for cert, key in ((None, None), (pki.stranger_cert, pki.stranger_key)):
        error = rpc_error(lambda c=cert, k=key: tls_client(server, pki, c, k).generate("refused"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails

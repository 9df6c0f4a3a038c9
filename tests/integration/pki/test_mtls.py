"""Real gRPC over mTLS on 127.0.0.1 with certificates written by ``cleanroom pki init``.

A tiny generic service answers with the caller's SPIFFE ID and the SHA-256 of its certificate
as the server sees them through ``peer_identity``/``peer_certificate_der``. Clients with a good
certificate (ours or a SPIRE-shaped chain) get through; clients with no certificate, one from
another CA, or an expired one are refused in the handshake.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from pki.ca import (
    PkiLayout,
    cert_to_pem,
    init_pki,
    issue_certificate,
    key_to_pem,
    load_ca,
    write_file_atomic,
)
from pki.errors import PKIError
from pki.identity import SpiffeId
from pki.tls import channel_credentials, load_certificates, peer_certificate_der, peer_identity
from pki.tls import server_credentials as make_server_credentials
from tests.harness.net import free_port
from tests.support import svid as svid_factory

METHOD = "/pkitest.Whoami/Get"
TRUST_DOMAIN = "cleanroom.local"


def _whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
    try:
        ident = peer_identity(context)
        der = peer_certificate_der(context)
    except PKIError as e:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
    return f"{ident}|{hashlib.sha256(der).hexdigest()}".encode()


@dataclass(frozen=True)
class Server:
    layout: PkiLayout
    tls_port: int
    plain_port: int


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PKI written by the installed ``cleanroom`` command, as an operator would."""
    out = tmp_path_factory.mktemp("pki") / "pki"
    exe = Path(sys.executable).parent / "cleanroom"
    proc = subprocess.run(
        [str(exe), "pki", "init", "--out", str(out), "--sidecar", "sc-1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 12
    assert all(line.startswith(f"wrote {out}/") for line in lines)
    return out


@pytest.fixture(scope="module")
def server(pki_dir: Path) -> Iterator[Server]:
    layout = PkiLayout(directory=pki_dir, trust_domain=TRUST_DOMAIN)
    broker = layout.cert_and_key("broker")
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    srv.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "pkitest.Whoami", {"Get": grpc.unary_unary_rpc_method_handler(_whoami)}
            ),
        )
    )
    creds = make_server_credentials(
        cert_file=broker.cert, key_file=broker.key, ca_file=layout.ca_cert
    )
    tls_port = srv.add_secure_port(f"127.0.0.1:{free_port()}", creds)
    plain_port = srv.add_insecure_port(f"127.0.0.1:{free_port()}")
    assert tls_port and plain_port
    srv.start()
    try:
        yield Server(layout=layout, tls_port=tls_port, plain_port=plain_port)
    finally:
        srv.stop(grace=None)


def _call(
    port: int,
    creds: grpc.ChannelCredentials | None,
    options: list[tuple[str, str]] | None = None,
) -> bytes:
    target = f"127.0.0.1:{port}"
    channel = (
        grpc.secure_channel(target, creds, options=options or [])
        if creds is not None
        else grpc.insecure_channel(target)
    )
    with channel:
        response: bytes = channel.unary_unary(
            METHOD, request_serializer=None, response_deserializer=None
        )(b"", timeout=10)
        return response


def _party_creds(layout: PkiLayout, name: str = "advertiser") -> grpc.ChannelCredentials:
    pair = layout.cert_and_key("party", name)
    return channel_credentials(cert_file=pair.cert, key_file=pair.key, ca_file=layout.ca_cert)


def _assert_refused(port: int, creds: grpc.ChannelCredentials, **kw: object) -> None:
    with pytest.raises(grpc.RpcError) as e:
        _call(port, creds, **kw)  # type: ignore[arg-type]
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value


def _expected(layout: PkiLayout, ident: SpiffeId, cert_file: Path) -> bytes:
    der = load_certificates(cert_file)[0].public_bytes(serialization.Encoding.DER)
    return f"{ident}|{hashlib.sha256(der).hexdigest()}".encode()


def test_party_client_is_identified(server: Server) -> None:
    layout = server.layout
    for kind, name in (("party", "advertiser"), ("party", "publisher"), ("sidecar", "sc-1")):
        pair = layout.cert_and_key(kind, name)
        creds = channel_credentials(cert_file=pair.cert, key_file=pair.key, ca_file=layout.ca_cert)
        got = _call(server.tls_port, creds)
        assert got == _expected(layout, SpiffeId(TRUST_DOMAIN, kind, name), pair.cert)


def test_operator_client_is_identified(server: Server) -> None:
    pair = server.layout.cert_and_key("operator")
    creds = channel_credentials(
        cert_file=pair.cert, key_file=pair.key, ca_file=server.layout.ca_cert
    )
    got = _call(server.tls_port, creds)
    assert got.startswith(b"spiffe://cleanroom.local/operator|")


def test_client_without_certificate_is_refused(server: Server) -> None:
    assert _call(server.tls_port, _party_creds(server.layout))  # the server is up and fine
    ca_pem = server.layout.ca_cert.read_bytes()
    _assert_refused(server.tls_port, grpc.ssl_channel_credentials(root_certificates=ca_pem))


def test_client_from_another_ca_is_refused(server: Server, tmp_path: Path) -> None:
    assert _call(server.tls_port, _party_creds(server.layout))
    # Same trust domain name and same identity, but a different CA key: the name is no proof.
    other = init_pki(tmp_path / "other", parties=["advertiser"], sidecars=[])
    pair = other.cert_and_key("party", "advertiser")
    creds = channel_credentials(
        cert_file=pair.cert, key_file=pair.key, ca_file=server.layout.ca_cert
    )
    _assert_refused(server.tls_port, creds)


def test_expired_client_is_refused(server: Server, tmp_path: Path) -> None:
    assert _call(server.tls_port, _party_creds(server.layout))
    ca_key, ca_cert = load_ca(server.layout.directory)
    now = dt.datetime.now(dt.UTC)
    key, cert = issue_certificate(
        ca_key=ca_key,
        ca_cert=ca_cert,
        spiffe_id=SpiffeId.party(TRUST_DOMAIN, "advertiser"),
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )
    write_file_atomic(tmp_path / "old.key", key_to_pem(key), mode=0o600)
    write_file_atomic(tmp_path / "old.crt", cert_to_pem(cert), mode=0o644)
    creds = channel_credentials(
        cert_file=tmp_path / "old.crt",
        key_file=tmp_path / "old.key",
        ca_file=server.layout.ca_cert,
    )
    _assert_refused(server.tls_port, creds)


def test_spire_style_svid_chain_is_accepted(server: Server, tmp_path: Path) -> None:
    ca_key, ca_cert = load_ca(server.layout.directory)
    int_key, int_cert = svid_factory.spire_intermediate(
        root_key=ca_key, root_cert=ca_cert, trust_domain=TRUST_DOMAIN
    )
    key, svid = svid_factory.leaf(
        issuer_key=int_key,
        issuer_cert=int_cert,
        uris=[f"spiffe://{TRUST_DOMAIN}/sidecar/spire-agent-7"],
    )
    # SPIRE's svid.pem: the leaf, then the intermediate the peer needs to reach the root.
    (tmp_path / "svid.pem").write_bytes(cert_to_pem(svid) + cert_to_pem(int_cert))
    write_file_atomic(tmp_path / "svid.key", key_to_pem(key), mode=0o600)
    creds = channel_credentials(
        cert_file=tmp_path / "svid.pem",
        key_file=tmp_path / "svid.key",
        ca_file=server.layout.ca_cert,
    )
    got = _call(server.tls_port, creds)
    ident = SpiffeId.sidecar(TRUST_DOMAIN, "spire-agent-7")
    assert got == _expected(server.layout, ident, tmp_path / "svid.pem")


def test_client_refuses_server_from_another_ca(server: Server, tmp_path: Path) -> None:
    other = init_pki(tmp_path / "other", parties=["advertiser"], sidecars=[])
    pair = server.layout.cert_and_key("party", "advertiser")
    creds = channel_credentials(cert_file=pair.cert, key_file=pair.key, ca_file=other.ca_cert)
    _assert_refused(server.tls_port, creds)


def test_client_refuses_server_with_wrong_name(server: Server) -> None:
    assert _call(server.tls_port, _party_creds(server.layout))
    _assert_refused(
        server.tls_port,
        _party_creds(server.layout),
        options=[("grpc.ssl_target_name_override", "not-the-broker.example")],
    )


def test_peer_identity_without_tls_is_unauthenticated(server: Server) -> None:
    with pytest.raises(grpc.RpcError) as e:
        _call(server.plain_port, None)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert e.value.details() == "the peer presented no client certificate"

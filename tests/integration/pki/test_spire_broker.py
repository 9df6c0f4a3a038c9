"""SPIRE-issued X.509-SVIDs against the real broker (``cleanroom broker serve`` in a process).

A SPIRE server of the broker's trust domain is played by a self-signed root and an
intermediate signing CA below it (SPIRE's shape: EC P-256, no CN, the SPIFFE ID as the only
SAN, a URI). Its SVID files are what SPIRE hands out: ``svid.pem`` holds the leaf and then the
intermediate, and the broker's ``ca_file`` is a bundle of the ``cleanroom pki`` CA and the SPIRE
root, as docs/pki.md suggests for mixing the two sources.

(a) A sidecar SVID gets past the handshake, the identity check and the role check and gets an
answer from the attestation service itself; an operator SVID may use the admin service.
(b) A broker whose own certificate is a SPIRE SVID: gRPC's client checks the dialled name
against the certificate's DNS and IP SANs only, never its URI SAN, so the broker's registration
entry carries a DNS name as well (``spire-server entry create -dns ...``). A client dialling the
broker by IP address names it with ``server_name``; without it, or with a name the SVID lacks,
the call fails with gRPC's hostname verification message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from broker.client import (
    DEFAULT_RETRIES,
    BrokerClient,
    FailedPreconditionError,
    PermissionDeniedError,
    UnavailableError,
)
from cleanroom.v1 import admin_pb2, attestation_pb2, attestation_pb2_grpc
from pki.ca import CertKeyPair, PkiLayout, cert_to_pem, key_to_pem, write_file_atomic
from pki.identity import SpiffeId
from pki.tls import channel_credentials
from tests.support import svid as svid_factory
from tests.support.broker import TD, TIMEOUT, BrokerProcess, start_broker, write_config
from tests.support.pki import make_pki

#: An AK name of the right shape (a SHA-256 name) that nobody enrolled.
UNKNOWN_AK = "000b" + "ab" * 32
SIDECAR = SpiffeId.sidecar(TD, "spire-agent-7")
BROKER_ID = str(SpiffeId.broker(TD))
#: The DNS SAN of the SPIRE broker's SVID; nothing resolves it, clients dial 127.0.0.1.
BROKER_DNS = "broker.spire.internal"


# --- a SPIRE server's certificates ----------------------------------------------------------


@dataclass(frozen=True)
class SpireCa:
    """A SPIRE server's root (its trust bundle) and the intermediate that signs its SVIDs."""

    root_key: ec.EllipticCurvePrivateKey
    root_cert: x509.Certificate
    signing_key: ec.EllipticCurvePrivateKey
    signing_cert: x509.Certificate

    @classmethod
    def create(cls, trust_domain: str) -> SpireCa:
        root_key, root_cert = svid_factory.spire_root(trust_domain)
        signing_key, signing_cert = svid_factory.spire_intermediate(
            root_key=root_key, root_cert=root_cert, trust_domain=trust_domain
        )
        return cls(root_key, root_cert, signing_key, signing_cert)

    def write_svid(
        self,
        directory: Path,
        spiffe_id: str,
        *,
        stem: str = "svid",
        with_chain: bool = True,
        dns_names: tuple[str, ...] = (),
    ) -> CertKeyPair:
        """Writes ``<stem>.crt`` (leaf, then the intermediate unless ``with_chain`` is false)
        and ``<stem>.key``, as spiffe-helper writes SPIRE's ``svid.pem`` and ``svid_key.pem``.
        The SANs are the URI ``spiffe_id`` and ``dns_names`` (none unless the registration
        entry has ``-dns``)."""
        key, leaf = svid_factory.leaf(
            issuer_key=self.signing_key,
            issuer_cert=self.signing_cert,
            uris=[spiffe_id],
            dns_names=dns_names,
        )
        directory.mkdir(parents=True, exist_ok=True)
        pair = CertKeyPair(directory / f"{stem}.crt", directory / f"{stem}.key")
        chain = cert_to_pem(leaf) + (cert_to_pem(self.signing_cert) if with_chain else b"")
        write_file_atomic(pair.cert, chain, mode=0o644)
        write_file_atomic(pair.key, key_to_pem(key), mode=0o600)
        return pair


# --- fixtures -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    pki: PkiLayout  # the cleanroom CA, its broker certificate and its operator's
    spire: SpireCa
    bundle: Path  # the cleanroom CA and the SPIRE root: every peer's ca_file
    svids: Path  # the SPIRE SVIDs' directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    workdir = tmp_path_factory.mktemp("spire-broker")
    pki = make_pki(workdir / "pki")
    spire = SpireCa.create(TD)
    bundle = workdir / "bundle.crt"
    bundle.write_bytes(pki.ca_cert.read_bytes() + cert_to_pem(spire.root_cert))
    return Setup(pki, spire, bundle, workdir / "svids")


def _serve(workdir: Path, layout: PkiLayout, bundle: Path) -> Iterator[BrokerProcess]:
    """A broker serving ``layout``'s ``broker.crt``/``broker.key`` and trusting ``bundle``."""
    workdir.mkdir()
    config = write_config(workdir / "broker.toml", workdir, layout, ca_file=bundle)
    process = start_broker(config, layout, workdir)
    try:
        yield process
    finally:
        code = process.stop()
        assert code == 0, process.stderr()


@pytest.fixture(scope="module")
def broker(setup: Setup) -> Iterator[BrokerProcess]:
    """The broker with its ``cleanroom pki`` certificate (DNS localhost, IP 127.0.0.1)."""
    yield from _serve(setup.pki.directory.parent / "broker-pki", setup.pki, setup.bundle)


@pytest.fixture(scope="module")
def spire_broker(setup: Setup) -> Iterator[BrokerProcess]:
    """The broker whose own certificate is a SPIRE SVID (URI SAN and one DNS SAN, no IP)."""
    directory = setup.pki.directory.parent / "spire-broker-svid"
    # Named as write_config expects a broker's pair in a PkiLayout directory.
    setup.spire.write_svid(directory, BROKER_ID, stem="broker", dns_names=(BROKER_DNS,))
    layout = PkiLayout(directory=directory, trust_domain=TD)
    yield from _serve(setup.pki.directory.parent / "broker-spire", layout, setup.bundle)


def _client(
    broker: BrokerProcess,
    pair: CertKeyPair,
    bundle: Path,
    *,
    server_name: str | None = None,
    retries: int = DEFAULT_RETRIES,
) -> BrokerClient:
    return BrokerClient.connect(
        target=broker.grpc_address,
        cert_file=pair.cert,
        key_file=pair.key,
        ca_file=bundle,
        server_name=server_name,
        timeout=TIMEOUT,
        retries=retries,
    )


def _handshake_code(broker: BrokerProcess, pair: CertKeyPair, bundle: Path) -> grpc.StatusCode:
    """The status of a GetChallenge sent over raw gRPC (no client-side file checks)."""
    creds = channel_credentials(cert_file=pair.cert, key_file=pair.key, ca_file=bundle)
    with grpc.secure_channel(broker.grpc_address, creds) as channel:
        stub = attestation_pb2_grpc.AttestationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.GetChallenge(attestation_pb2.GetChallengeRequest(ak_name=UNKNOWN_AK), timeout=5)
    code = e.value.code()
    assert isinstance(code, grpc.StatusCode)
    return code


# --- (a) SPIRE client SVIDs -----------------------------------------------------------------


def test_a_spire_sidecar_svid_reaches_the_attestation_service(
    setup: Setup, broker: BrokerProcess
) -> None:
    pair = setup.spire.write_svid(setup.svids, str(SIDECAR), stem="sidecar")
    with _client(broker, pair, setup.bundle) as sidecar:
        assert sidecar.identity == SIDECAR
        # "not enrolled" is the attestation service's own answer: the handshake, the SPIFFE ID
        # read from the URI SAN, the trust domain and the sidecar role all passed before it.
        with pytest.raises(FailedPreconditionError) as refused:
            sidecar.get_challenge(UNKNOWN_AK)
        assert refused.value.details == f"AK {UNKNOWN_AK} is not enrolled"
        # The same identity is a sidecar, not an operator: the role comes from the SPIFFE ID.
        with pytest.raises(PermissionDeniedError):
            sidecar.list_eks()
    # The broker recorded the refusal under the SVID's SPIFFE ID.
    records = broker.admin("operator").ListAuditRecords(
        admin_pb2.ListAuditRecordsRequest(limit=1000), timeout=TIMEOUT
    )
    actors = {r.actor for r in records.records}
    assert str(SIDECAR) in actors


def test_a_spire_operator_svid_may_use_the_admin_service(
    setup: Setup, broker: BrokerProcess
) -> None:
    pair = setup.spire.write_svid(setup.svids, str(SpiffeId.operator(TD)), stem="operator")
    with _client(broker, pair, setup.bundle) as operator:
        assert operator.identity == SpiffeId.operator(TD)
        info = operator.get_broker_info()
        assert info.trust_domain == TD
        assert operator.list_eks() == []
        # An operator may not attest: the answer is about the role, not the certificate.
        with pytest.raises(PermissionDeniedError):
            operator.get_challenge(UNKNOWN_AK)


def test_spire_svids_the_bundle_does_not_vouch_for_are_refused_in_the_handshake(
    setup: Setup, broker: BrokerProcess, tmp_path: Path
) -> None:
    good = setup.spire.write_svid(tmp_path, str(SIDECAR), stem="good")
    assert _handshake_code(broker, good, setup.bundle) == grpc.StatusCode.FAILED_PRECONDITION
    # The leaf alone: the broker cannot reach the SPIRE root without the intermediate.
    leaf_only = setup.spire.write_svid(tmp_path, str(SIDECAR), stem="leaf", with_chain=False)
    assert _handshake_code(broker, leaf_only, setup.bundle) == grpc.StatusCode.UNAVAILABLE
    # Another SPIRE server of the same trust domain whose root is not in the bundle.
    rogue = SpireCa.create(TD).write_svid(tmp_path, str(SIDECAR), stem="rogue")
    assert _handshake_code(broker, rogue, setup.bundle) == grpc.StatusCode.UNAVAILABLE
    assert broker.proc.poll() is None


# --- (b) a broker with a SPIRE SVID ---------------------------------------------------------


def test_a_broker_with_a_spire_svid_is_reached_under_its_dns_name(
    setup: Setup, spire_broker: BrokerProcess
) -> None:
    assert spire_broker.grpc_address.startswith("127.0.0.1:")  # dialled by address, not name
    pair = setup.spire.write_svid(setup.svids, str(SIDECAR), stem="sidecar-b")
    with _client(spire_broker, pair, setup.bundle, server_name=BROKER_DNS) as sidecar:
        with pytest.raises(FailedPreconditionError) as refused:
            sidecar.get_challenge(UNKNOWN_AK)
        assert refused.value.details == f"AK {UNKNOWN_AK} is not enrolled"
    # A client with a `cleanroom pki` certificate trusts the SPIRE broker through the bundle.
    operator_pair = setup.pki.cert_and_key("operator")
    with _client(spire_broker, operator_pair, setup.bundle, server_name=BROKER_DNS) as operator:
        assert operator.get_broker_info().trust_domain == TD


@pytest.mark.parametrize("server_name", [None, "localhost", BROKER_ID])
def test_a_broker_with_a_spire_svid_is_refused_under_any_other_name(
    setup: Setup, spire_broker: BrokerProcess, server_name: str | None
) -> None:
    # None dials 127.0.0.1, which the SVID does not carry; "localhost" is in the cleanroom
    # broker certificate but not in this one; the SPIFFE ID is a URI SAN, which gRPC's
    # hostname check does not read.
    pair = setup.spire.write_svid(setup.svids, str(SIDECAR), stem="sidecar-c")
    with _client(spire_broker, pair, setup.bundle, server_name=server_name, retries=0) as sidecar:
        with pytest.raises(UnavailableError) as refused:
            sidecar.get_challenge(UNKNOWN_AK)
    message = str(refused.value)
    assert message.startswith("GetChallenge: "), message
    assert "Hostname Verification Check failed" in message, message
    assert message.endswith(f"[UNAVAILABLE] (broker {spire_broker.grpc_address})"), message
    assert spire_broker.proc.poll() is None


def test_the_admin_cli_reaches_a_spire_broker_with_server_name(
    setup: Setup, spire_broker: BrokerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    from cleanroom.app.cli import main

    cert, key = setup.pki.cert_and_key("operator")
    common = [
        "admin",
        "--broker",
        spire_broker.grpc_address,
        "--cert",
        str(cert),
        "--key",
        str(key),
        "--ca",
        str(setup.bundle),
        "--json",
    ]
    assert main([*common, "--server-name", BROKER_DNS, "ek", "list"]) == 0
    out, _ = capsys.readouterr()
    assert isinstance(json.loads(out), list | dict), out
    assert main([*common, "--timeout", "3", "ek", "list"]) == 1
    _, err = capsys.readouterr()
    assert "Hostname Verification Check failed" in err, err

"""sidecar.snp: the VCEK from the Azure metadata service (a loopback server speaking its answer)
or a file, with timeouts and clear errors. No test contacts 169.254.169.254."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from evidence.binding import snp_user_data
from sidecar.config import TpmConfig
from sidecar.errors import SnpEvidenceError, TpmCommandError, VcekUnavailableError
from sidecar.snp import (
    HCL_REPORT_NV_INDEX,
    IMDS_VCEK_URL,
    USER_DATA_NV_INDEX,
    SnpCollector,
    VcekSource,
    snp_collector,
)
from tests.harness.amd_snp import SyntheticAmdRoot, SyntheticChip


@pytest.fixture(scope="module")
def chip() -> SyntheticChip:
    return SyntheticAmdRoot().chip()


class _Imds(BaseHTTPRequestHandler):
    """Answers like Azure's THIM endpoint: JSON with vcekCert, only with ``Metadata: true``."""

    body = b""
    delay = 0.0
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        time.sleep(self.delay)
        if (
            self.headers.get("Metadata") != "true"
            or self.path != "/metadata/THIM/amd/certification"
        ):
            self.send_response(400)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def imds(chip: SyntheticChip) -> Iterator[tuple[str, type[_Imds]]]:
    pem = chip.vcek.public_bytes(serialization.Encoding.PEM).decode()
    handler = type(
        "Handler", (_Imds,), {"body": json.dumps({"vcekCert": pem, "tcbm": "x"}).encode()}
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/metadata/THIM/amd/certification", handler
    finally:
        server.shutdown()
        server.server_close()


def test_vcek_from_the_metadata_service_is_fetched_once(
    imds: tuple[str, type[_Imds]], chip: SyntheticChip
) -> None:
    url, handler = imds
    source = VcekSource(url=url, timeout_seconds=2)
    der = chip.vcek.public_bytes(serialization.Encoding.DER)
    assert source.fetch() == der
    assert source.fetch() == der
    assert handler.hits == 1


def test_metadata_service_that_does_not_answer_in_time(imds: tuple[str, type[_Imds]]) -> None:
    url, handler = imds
    handler.delay = 1.0
    with pytest.raises(VcekUnavailableError, match=r"within 0\.2 s"):
        VcekSource(url=url, timeout_seconds=0.2).fetch()


def test_metadata_service_error_is_one_clear_line(imds: tuple[str, type[_Imds]]) -> None:
    url, _ = imds
    with pytest.raises(VcekUnavailableError, match="answered HTTP 400: is this an Azure"):
        VcekSource(url=url.replace("THIM", "nope")).fetch()


def test_nothing_listening(tmp_path: Path) -> None:
    from tests.harness.net import free_port

    with pytest.raises(VcekUnavailableError, match="cannot fetch the VCEK"):
        VcekSource(url=f"http://127.0.0.1:{free_port()}/x", timeout_seconds=1).fetch()


@pytest.mark.parametrize("encoding", ["der", "pem", "json"])
def test_vcek_file(tmp_path: Path, chip: SyntheticChip, encoding: str) -> None:
    der = chip.vcek.public_bytes(serialization.Encoding.DER)
    pem = chip.vcek.public_bytes(serialization.Encoding.PEM)
    content = {"der": der, "pem": pem, "json": json.dumps({"vcekCert": pem.decode()}).encode()}
    path = tmp_path / "vcek"
    path.write_bytes(content[encoding])
    assert VcekSource(file=str(path)).fetch() == der


@pytest.mark.parametrize(
    "content, reason",
    [(b"garbage", "not a VCEK certificate"), (b'{"tcbm": 1}', "no vcekCert")],
)
def test_bad_vcek_file(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "vcek"
    path.write_bytes(content)
    with pytest.raises(VcekUnavailableError, match=reason):
        VcekSource(file=str(path)).fetch()


def test_missing_vcek_file(tmp_path: Path) -> None:
    with pytest.raises(VcekUnavailableError, match="cannot read the VCEK file"):
        VcekSource(file=str(tmp_path / "absent")).fetch()


def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="http"):
        VcekSource(url="file:///etc/passwd")
    with pytest.raises(ValueError, match="vcek_url"):
        TpmConfig(vcek_url="file:///etc/passwd")


def test_collector_only_when_configured() -> None:
    assert snp_collector(TpmConfig()) is None
    collector = snp_collector(TpmConfig(azure_snp=True))
    assert collector is not None and collector.vcek.url == IMDS_VCEK_URL


class _Nv:
    def __init__(self, fail: bool = False) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.fail = fail

    def nv_write(self, index: int, data: bytes) -> None:
        self.writes.append((index, data))

    def nv_read(self, index: int) -> bytes:
        if self.fail:
            raise TpmCommandError(f"NV index 0x{index:08x} is not defined in this TPM")
        return b"HCLA report"


def test_collector_writes_the_binding_before_reading_the_report(
    tmp_path: Path, chip: SyntheticChip
) -> None:
    path = tmp_path / "vcek.der"
    path.write_bytes(chip.vcek.public_bytes(serialization.Encoding.DER))
    nv = _Nv()
    evidence = SnpCollector(vcek=VcekSource(file=str(path))).collect(nv, b"q" * 32)
    assert nv.writes == [(USER_DATA_NV_INDEX, snp_user_data(b"q" * 32))]
    assert evidence.hcl_report == b"HCLA report" and evidence.vcek == path.read_bytes()


def test_collector_on_a_tpm_without_the_report(tmp_path: Path) -> None:
    with pytest.raises(SnpEvidenceError, match=f"0x{HCL_REPORT_NV_INDEX:08x}"):
        SnpCollector(vcek=VcekSource(file=str(tmp_path / "x"))).collect(_Nv(fail=True), b"q")

"""Quotes made by tpm2-tools on swtpm (the manual recipe's commands) are verified by the broker's
library and by ``cleanroom broker verify-quote``, and every kind of tampering is refused with its
own error. The evidence is re-made here on every run, with the same code that made the stored
regression vectors (tests/vectors), and both sets must get the same verdicts."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.errors import VerificationError
from broker.quote import event_log_to_json
from tests.harness.swtpm import Swtpm, running_copy
from tests.vectors.evidence import QuoteVector, quote_vectors
from tests.vectors.generate import build_quote_vectors

pytestmark = [pytest.mark.swtpm, pytest.mark.tpm2tools]

REPO = Path(__file__).resolve().parents[3]
STORED = {v.name: v for v in quote_vectors()}


@pytest.fixture(scope="module")
def tpm(swtpm_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    """One swtpm for the module: making the evidence once keeps the module fast."""
    with running_copy(swtpm_template, tmp_path_factory.mktemp("verify-quote") / "state") as t:
        yield t


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("evidence")


@pytest.fixture(scope="module")
def live(tpm: Swtpm, workdir: Path) -> dict[str, QuoteVector]:
    vectors = {v.name: v for v in build_quote_vectors(tpm, workdir)}
    # Nothing left loaded: there is no resource manager in front of swtpm.
    assert tpm.tools("tpm2_getcap", "handles-transient").stdout.strip() == ""
    return vectors


def test_live_evidence_covers_the_stored_vectors(live: dict[str, QuoteVector]) -> None:
    assert set(live) == set(STORED)


@pytest.mark.parametrize("name", sorted(STORED))
def test_live_verdict(live: dict[str, QuoteVector], name: str) -> None:
    vector = live[name]
    assert vector.expect == STORED[name].expect
    cls = vector.error_class
    if cls is None:
        verified = vector.verify()
        assert verified.qualifying_data == vector.qualifying_data
        return
    with pytest.raises(VerificationError) as info:
        vector.verify()
    assert type(info.value) is cls, f"{name}: {info.value!r}"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cleanroom.app.cli", "broker", "verify-quote", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def _tools_args(workdir: Path, ak: str, q: str, qualification: bytes) -> list[str]:
    return [
        "--public",
        str(workdir / f"{ak}.pub"),
        "--message",
        str(workdir / f"{q}.msg"),
        "--signature",
        str(workdir / f"{q}.sig"),
        "--pcr",
        str(workdir / f"{q}.pcrs"),
        "--qualification",
        qualification.hex(),
    ]


@pytest.mark.parametrize(
    ("name", "ak", "q"),
    [
        ("quote-rsa-rsassa-valid", "ak-rsa", "q-rsa"),
        ("quote-ecc-p256-ecdsa-valid", "ak-ecc", "q-ecc"),
        ("quote-rsa-values-pcr-file-valid", "ak-rsa", "q-rsa-values"),
    ],
)
def test_cli_and_checkquote_accept_tools_files(
    live: dict[str, QuoteVector], tpm: Swtpm, workdir: Path, name: str, ak: str, q: str
) -> None:
    vector = live[name]
    args = _tools_args(workdir, ak, q, vector.qualifying_data)
    expect = [f"--expect-pcr=sha256:23={vector.pcr_values[(23, 'sha256')].hex()}"]
    if vector.event_log is not None:
        log = workdir / f"{name}.events.json"
        log.write_bytes(event_log_to_json(vector.event_log))
        expect.append(f"--event-log={log}")
    proc = _cli(*args, *expect)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("VALID\n")
    assert "golden: match" in proc.stdout
    if "values" in name:
        # tpm2_checkquote 5.4 reads only the serialized format ("Format ignored"): the broker
        # reads both, so this file has no tpm2-tools counterpart to compare with.
        return
    # The manual recipe's verifier agrees on the very same files.
    tpm.tools(
        "tpm2_checkquote",
        "-u",
        str(workdir / f"{ak}.pub"),
        "-m",
        str(workdir / f"{q}.msg"),
        "-s",
        str(workdir / f"{q}.sig"),
        "-f",
        str(workdir / f"{q}.pcrs"),
        "-q",
        vector.qualifying_data.hex(),
    )


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("flipped-attest", "signature does not verify"),
        ("flipped-signature", "signature does not verify"),
        ("wrong-qualification", "qualifying data"),
        ("other-ak", "signature does not verify"),
        ("sha1-only", "SHA-1-only evidence is refused"),
        ("omits-pcr23", "does not cover required PCR sha256:23"),
        ("certify", "not a quote"),
        ("event-log", "event log replays to"),
        ("empty-event-log", "is empty"),
        ("golden", "golden values"),
    ],
)
def test_cli_rejects(live: dict[str, QuoteVector], workdir: Path, case: str, reason: str) -> None:
    valid = live["quote-rsa-rsassa-valid"]
    args = _tools_args(workdir, "ak-rsa", "q-rsa", valid.qualifying_data)
    tampered = workdir / f"tampered-{case}"
    if case in ("flipped-attest", "flipped-signature"):
        src = workdir / ("q-rsa.msg" if case == "flipped-attest" else "q-rsa.sig")
        data = bytearray(src.read_bytes())
        data[-1] ^= 1
        tampered.write_bytes(bytes(data))
        args[args.index("--message" if case == "flipped-attest" else "--signature") + 1] = str(
            tampered
        )
    elif case == "wrong-qualification":
        args[-1] = "00" * 32
    elif case == "other-ak":
        args[1] = str(workdir / "ak-other.pub")
    elif case == "sha1-only":
        args = _tools_args(workdir, "ak-rsa", "q-sha1", live["quote-rsa-sha1-only"].qualifying_data)
    elif case == "omits-pcr23":
        v = live["quote-rsa-selection-omits-pcr23"]
        args = _tools_args(workdir, "ak-rsa", "q-no23", v.qualifying_data)
    elif case == "certify":
        args[args.index("--message") + 1] = str(workdir / "certify.attest")
        args[args.index("--signature") + 1] = str(workdir / "certify.sig")
    elif case == "event-log":
        bad = live["quote-rsa-event-log-does-not-replay"]
        assert bad.event_log is not None
        tampered.write_bytes(event_log_to_json(bad.event_log))
        args += ["--event-log", str(tampered)]
    elif case == "empty-event-log":
        # A 0-byte log is refused, not read as "no log" (which would skip the replay check).
        tampered.write_bytes(b"")
        args += ["--event-log", str(tampered)]
    elif case == "golden":
        args += ["--expect-pcr", "sha256:23=" + "00" * 32]
    proc = _cli(*args)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith("INVALID: "), proc.stdout
    assert reason in proc.stdout.splitlines()[0]
    if reason == "signature does not verify":
        # A flipped attest bit, a flipped signature bit and another AK's signature are one
        # failure by construction (the signature covers the attest bytes); docs/manual-recipe.md
        # says so next to verify-quote.
        assert proc.stdout.splitlines()[0] == "INVALID: signature does not verify under the AK"

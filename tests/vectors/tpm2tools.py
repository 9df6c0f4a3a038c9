"""Makes attestation evidence the way the manual recipe does: tpm2-tools programs on a swtpm.

Used by the integration tests, by :mod:`tests.vectors.generate` (which regenerates the regression
vectors) and by ``bench/bench_verify.py``. There is no resource manager in front of swtpm, so every
step flushes the transient objects and the sessions that the tool left loaded.
"""

from __future__ import annotations

import hashlib
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from evidence.launch import Launch
from evidence.pcr import WORKLOAD_PCR, MeasurementEvent, launch_event


class ToolsRunner(Protocol):
    """What the swtpm test harness provides: runs a tpm2-tools program against one TPM."""

    def tools(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]: ...


@dataclass(frozen=True)
class KeyFiles:
    """The files a key-creating tool wrote."""

    context: Path
    public: Path
    name: Path | None = None
    private: Path | None = None


@dataclass(frozen=True)
class QuoteFiles:
    """What ``tpm2_quote`` wrote, and the qualifying data it was given."""

    message: Path
    signature: Path
    pcrs: Path
    qualification: bytes


def flush(tpm: ToolsRunner) -> None:
    """Flushes transient objects and sessions: swtpm has no resource manager to do it."""
    tpm.tools("tpm2_flushcontext", "--transient-object")
    tpm.tools("tpm2_flushcontext", "--loaded-session")


def _run(tpm: ToolsRunner, *args: str) -> None:
    try:
        tpm.tools(*args)
    finally:
        flush(tpm)


def create_ek(tpm: ToolsRunner, workdir: Path, *, alg: str = "rsa", prefix: str = "ek") -> KeyFiles:
    """``tpm2_createek``: the EK from the TCG default template (``rsa`` or ``ecc``)."""
    ctx, pub = workdir / f"{prefix}.ctx", workdir / f"{prefix}.pub"
    _run(tpm, "tpm2_createek", "-c", str(ctx), "-G", alg, "-u", str(pub))
    return KeyFiles(context=ctx, public=pub)


def create_ak(
    tpm: ToolsRunner,
    workdir: Path,
    ek: KeyFiles,
    *,
    alg: str = "rsa",
    scheme: str = "rsassa",
    hash_alg: str = "sha256",
    prefix: str = "ak",
) -> KeyFiles:
    """``tpm2_createak`` under ``ek``, as in the manual recipe."""
    files = KeyFiles(
        context=workdir / f"{prefix}.ctx",
        public=workdir / f"{prefix}.pub",
        name=workdir / f"{prefix}.name",
        private=workdir / f"{prefix}.priv",
    )
    assert files.name is not None and files.private is not None
    _run(
        tpm,
        "tpm2_createak",
        "-C",
        str(ek.context),
        "-c",
        str(files.context),
        "-G",
        alg,
        "-g",
        hash_alg,
        "-s",
        scheme,
        "-u",
        str(files.public),
        "-n",
        str(files.name),
        "-r",
        str(files.private),
    )
    return files


def create_key(
    tpm: ToolsRunner, workdir: Path, *, key_alg: str, attributes: str, prefix: str
) -> KeyFiles:
    """``tpm2_create`` of an arbitrary key under a fresh owner primary (for refusal tests)."""
    primary = workdir / f"{prefix}-primary.ctx"
    _run(tpm, "tpm2_createprimary", "-C", "o", "-c", str(primary))
    files = KeyFiles(
        context=primary, public=workdir / f"{prefix}.pub", private=workdir / f"{prefix}.priv"
    )
    assert files.private is not None
    _run(
        tpm,
        "tpm2_create",
        "-C",
        str(primary),
        "-G",
        key_alg,
        "-a",
        attributes,
        "-u",
        str(files.public),
        "-r",
        str(files.private),
    )
    return files


def reset_pcr23(tpm: ToolsRunner) -> None:
    _run(tpm, "tpm2_pcrreset", str(WORKLOAD_PCR))


def measure(
    tpm: ToolsRunner, contents: list[tuple[str, bytes]], banks: tuple[str, ...] = ("sha1", "sha256")
) -> tuple[MeasurementEvent, ...]:
    """Extends each content's digest into PCR 23 with ``tpm2_pcrextend`` and returns the log."""
    events = []
    for path, data in contents:
        digests = {bank: hashlib.new(bank, data).digest() for bank in banks}
        spec = ",".join(f"{bank}={d.hex()}" for bank, d in digests.items())
        _run(tpm, "tpm2_pcrextend", f"{WORKLOAD_PCR}:{spec}")
        events.append(MeasurementEvent(path=path, size=len(data), digests=digests))
    return tuple(events)


def measure_launch(
    tpm: ToolsRunner, launch: Launch, banks: tuple[str, ...] = ("sha1", "sha256")
) -> MeasurementEvent:
    """Extends the launch event with ``tpm2_pcrextend``, as ``sidecar run`` does after the
    files; returns its log entry."""
    event = launch_event(launch, banks)
    spec = ",".join(f"{bank}={d.hex()}" for bank, d in event.digests.items())
    _run(tpm, "tpm2_pcrextend", f"{WORKLOAD_PCR}:{spec}")
    return event


def quote(
    tpm: ToolsRunner,
    workdir: Path,
    ak: KeyFiles,
    *,
    pcr_list: str = "sha1:23+sha256:23",
    qualification: bytes | None = None,
    hash_alg: str = "sha256",
    pcr_format: str = "serialized",
    scheme: str | None = None,
    prefix: str = "quote",
) -> QuoteFiles:
    """``tpm2_quote`` with a fresh 32-byte qualification unless one is given."""
    q = secrets.token_bytes(32) if qualification is None else qualification
    files = QuoteFiles(
        message=workdir / f"{prefix}.msg",
        signature=workdir / f"{prefix}.sig",
        pcrs=workdir / f"{prefix}.pcrs",
        qualification=q,
    )
    extra = ("--scheme", scheme) if scheme else ()
    _run(
        tpm,
        "tpm2_quote",
        *extra,
        "-c",
        str(ak.context),
        "-l",
        pcr_list,
        "-m",
        str(files.message),
        "-s",
        str(files.signature),
        "-o",
        str(files.pcrs),
        "-F",
        pcr_format,
        "-q",
        q.hex(),
        "-g",
        hash_alg,
    )
    return files


def certify(
    tpm: ToolsRunner, workdir: Path, ak: KeyFiles, *, prefix: str = "certify"
) -> tuple[Path, Path]:
    """``tpm2_certify`` of the AK by itself: a genuine TPM attest that is not a quote."""
    attest, sig = workdir / f"{prefix}.attest", workdir / f"{prefix}.sig"
    _run(
        tpm,
        "tpm2_certify",
        "-c",
        str(ak.context),
        "-C",
        str(ak.context),
        "-g",
        "sha256",
        "-o",
        str(attest),
        "-s",
        str(sig),
    )
    return attest, sig


def activate_credential(
    tpm: ToolsRunner, workdir: Path, *, ak: KeyFiles, ek: KeyFiles, credential: Path
) -> bytes | None:
    """``tpm2_activatecredential`` with the EK's policy session (PolicySecret on the endorsement
    hierarchy); returns the recovered secret, or None when the TPM refuses."""
    session = workdir / "activate-session.ctx"
    out = workdir / "activated.secret"
    out.unlink(missing_ok=True)
    _run(tpm, "tpm2_startauthsession", "--policy-session", "-S", str(session))
    try:
        _run(tpm, "tpm2_policysecret", "-S", str(session), "-c", "e")
        proc = tpm.tools(
            "tpm2_activatecredential",
            "-c",
            str(ak.context),
            "-C",
            str(ek.context),
            "-i",
            str(credential),
            "-o",
            str(out),
            "-P",
            f"session:{session}",
            check=False,
        )
    finally:
        flush(tpm)
        tpm.tools("tpm2_flushcontext", str(session), check=False)
    if proc.returncode != 0:
        return None
    return out.read_bytes()

"""Regression vectors: evidence made by tpm2-tools on swtpm, stored as JSON files named after what
they guard, so the unit tests and the benchmark run without a TPM.

``quote-*.json`` hold one quote and the verdict expected from ``broker.quote.verify_quote``
("valid" or the name of the error class), ``key-*.json`` one TPM2B_PUBLIC and the verdict of the
AK/EK attribute checks, ``ekcert-*.json`` an EK certificate with the EK and the CA certificates.
``python -m tests.vectors.generate`` regenerates them on a fresh swtpm.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from broker import errors
from broker.quote import VerifiedQuote, event_log_from_json, event_log_to_json, verify_quote
from broker.tpmkeys import ak_qualified_name, load_public
from evidence.pcr import MeasurementEvent

VECTOR_DIR = Path(__file__).resolve().parent


def _pcrs_to_doc(values: Mapping[tuple[int, str], bytes]) -> dict[str, str]:
    return {f"{bank}:{index}": v.hex() for (index, bank), v in values.items()}


def _pcrs_from_doc(doc: Mapping[str, str]) -> dict[tuple[int, str], bytes]:
    out = {}
    for key, value in doc.items():
        bank, _, index = key.partition(":")
        out[(int(index), bank)] = bytes.fromhex(value)
    return out


@dataclass(frozen=True)
class QuoteVector:
    """One quote, everything needed to verify it, and the expected verdict."""

    name: str
    guards: str
    ak_public: bytes
    attest: bytes
    signature: bytes
    pcr_values: dict[tuple[int, str], bytes]
    qualifying_data: bytes
    expect: str = "valid"
    required_pcrs: dict[str, list[int]] = field(default_factory=lambda: {"sha256": [23]})
    event_log: tuple[MeasurementEvent, ...] | None = None
    #: The file ``tpm2_quote --pcr`` wrote (serialized format), when it is this quote's.
    tools_pcr_file: bytes | None = None
    #: The EK (TPM2B_PUBLIC) the AK is enrolled under, when known: the quote's qualifiedSigner
    #: must then be the AK's qualified name under it, as the broker checks.
    ek_public: bytes | None = None

    @property
    def error_class(self) -> type[errors.BrokerError] | None:
        """The exact error class expected, or None for a valid quote."""
        if self.expect == "valid":
            return None
        cls = getattr(errors, self.expect)
        assert isinstance(cls, type) and issubclass(cls, errors.BrokerError)
        return cls

    def verify(self) -> VerifiedQuote:
        ak = load_public(self.ak_public)
        signer = (
            None if self.ek_public is None else ak_qualified_name(ak, load_public(self.ek_public))
        )
        return verify_quote(
            ak=ak,
            attest=self.attest,
            signature=self.signature,
            pcr_values=self.pcr_values,
            expected_qualifying_data=self.qualifying_data,
            required_pcrs=self.required_pcrs,
            event_log=self.event_log,
            expected_signer=signer,
        )

    def derive(self, name: str, guards: str, expect: str, **changes: Any) -> QuoteVector:
        """A copy with other fields; the tools PCR file is dropped unless given."""
        changes.setdefault("tools_pcr_file", None)
        return replace(self, name=name, guards=guards, expect=expect, **changes)

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "guards": self.guards,
            "expect": self.expect,
            "ak_public": self.ak_public.hex(),
            "attest": self.attest.hex(),
            "signature": self.signature.hex(),
            "pcr_values": _pcrs_to_doc(self.pcr_values),
            "qualifying_data": self.qualifying_data.hex(),
            "required_pcrs": self.required_pcrs,
            "event_log": (
                None
                if self.event_log is None
                else json.loads(event_log_to_json(self.event_log))["events"]
            ),
        }
        if self.tools_pcr_file is not None:
            doc["tools_pcr_file"] = self.tools_pcr_file.hex()
        if self.ek_public is not None:
            doc["ek_public"] = self.ek_public.hex()
        return json.dumps(doc, indent=1) + "\n"

    @classmethod
    def from_json(cls, name: str, text: str) -> QuoteVector:
        doc = json.loads(text)
        log = doc.get("event_log")
        return cls(
            name=name,
            guards=doc["guards"],
            expect=doc["expect"],
            ak_public=bytes.fromhex(doc["ak_public"]),
            attest=bytes.fromhex(doc["attest"]),
            signature=bytes.fromhex(doc["signature"]),
            pcr_values=_pcrs_from_doc(doc["pcr_values"]),
            qualifying_data=bytes.fromhex(doc["qualifying_data"]),
            required_pcrs={k: list(v) for k, v in doc["required_pcrs"].items()},
            event_log=None if log is None else event_log_from_json(json.dumps(log).encode()),
            tools_pcr_file=(
                bytes.fromhex(doc["tools_pcr_file"]) if "tools_pcr_file" in doc else None
            ),
            ek_public=bytes.fromhex(doc["ek_public"]) if "ek_public" in doc else None,
        )


@dataclass(frozen=True)
class KeyVector:
    """One TPM2B_PUBLIC and the verdicts of the AK and EK attribute checks."""

    name: str
    guards: str
    public: bytes
    ak_verdict: str  # "valid" or "KeyAttributeError"
    ek_verdict: str

    def to_json(self) -> str:
        doc = {
            "guards": self.guards,
            "public": self.public.hex(),
            "ak_verdict": self.ak_verdict,
            "ek_verdict": self.ek_verdict,
        }
        return json.dumps(doc, indent=1) + "\n"

    @classmethod
    def from_json(cls, name: str, text: str) -> KeyVector:
        doc = json.loads(text)
        return cls(
            name=name,
            guards=doc["guards"],
            public=bytes.fromhex(doc["public"]),
            ak_verdict=doc["ak_verdict"],
            ek_verdict=doc["ek_verdict"],
        )


@dataclass(frozen=True)
class EkCertVector:
    """An EK certificate as read from NV, its EK, and the CA certificates that issued it."""

    name: str
    guards: str
    ek_public: bytes
    certificate: bytes
    ca_pems: tuple[bytes, ...]

    def to_json(self) -> str:
        doc = {
            "guards": self.guards,
            "ek_public": self.ek_public.hex(),
            "certificate": self.certificate.hex(),
            "ca_pems": [p.decode() for p in self.ca_pems],
        }
        return json.dumps(doc, indent=1) + "\n"

    @classmethod
    def from_json(cls, name: str, text: str) -> EkCertVector:
        doc = json.loads(text)
        return cls(
            name=name,
            guards=doc["guards"],
            ek_public=bytes.fromhex(doc["ek_public"]),
            certificate=bytes.fromhex(doc["certificate"]),
            ca_pems=tuple(p.encode() for p in doc["ca_pems"]),
        )


def _files(prefix: str) -> Iterator[Path]:
    return iter(sorted(VECTOR_DIR.glob(f"{prefix}-*.json")))


def quote_vectors() -> list[QuoteVector]:
    return [QuoteVector.from_json(p.stem, p.read_text()) for p in _files("quote")]


def quote_vector(name: str) -> QuoteVector:
    path = VECTOR_DIR / f"{name}.json"
    return QuoteVector.from_json(path.stem, path.read_text())


def key_vectors() -> list[KeyVector]:
    return [KeyVector.from_json(p.stem, p.read_text()) for p in _files("key")]


def ekcert_vectors() -> list[EkCertVector]:
    return [EkCertVector.from_json(p.stem, p.read_text()) for p in _files("ekcert")]


# --- mutations of a valid quote, shared by the generator and the integration tests -----------


def flip_last_bit(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


def mutations(valid: QuoteVector, prefix: str) -> list[QuoteVector]:
    """Tampered copies of a valid quote (with an event log and PCR 23 in sha1 and sha256), each
    expecting its own error."""
    assert valid.event_log, "the base vector needs an event log"
    pcr_key = (23, "sha256")
    wrong_value = dict(valid.pcr_values)
    wrong_value[pcr_key] = flip_last_bit(wrong_value[pcr_key])
    extra_value = dict(valid.pcr_values)
    extra_value[(16, "sha256")] = bytes(32)
    first = valid.event_log[0]
    bad_log = (
        MeasurementEvent(
            path=first.path,
            size=first.size,
            digests={bank: flip_last_bit(d) for bank, d in first.digests.items()},
        ),
        *valid.event_log[1:],
    )
    # The first file's digests with the size of empty data: the size is not extended into
    # PCR 23, so this log still replays.
    sizeless_log = (
        MeasurementEvent(path=first.path, size=0, digests=first.digests),
        *valid.event_log[1:],
    )
    sha1_only_log = tuple(
        MeasurementEvent(path=e.path, size=e.size, digests={"sha1": e.digests["sha1"]})
        for e in valid.event_log
    )
    # Byte 0 is the magic's first byte (0xff of TPM_GENERATED_VALUE).
    bad_magic = bytes([valid.attest[0] ^ 0x80]) + valid.attest[1:]
    return [
        valid.derive(
            f"{prefix}-flipped-attest-bit",
            "one flipped bit in the attest (its PCR digest) breaks the signature",
            "SignatureError",
            attest=flip_last_bit(valid.attest),
        ),
        valid.derive(
            f"{prefix}-flipped-signature-bit",
            "one flipped bit in the signature",
            "SignatureError",
            signature=flip_last_bit(valid.signature),
        ),
        valid.derive(
            f"{prefix}-wrong-qualifying-data",
            "the quote was made for another nonce",
            "QualifyingDataError",
            qualifying_data=flip_last_bit(valid.qualifying_data),
        ),
        valid.derive(
            f"{prefix}-pcr-value-not-in-digest",
            "a reported PCR value that is not the quoted one",
            "PcrDigestError",
            pcr_values=wrong_value,
        ),
        valid.derive(
            f"{prefix}-unquoted-pcr-reported",
            "a reported PCR value that the quote does not select",
            "PcrSelectionError",
            pcr_values=extra_value,
        ),
        valid.derive(
            f"{prefix}-event-log-does-not-replay",
            "an event log whose first digest differs from what was extended",
            "EventLogReplayError",
            event_log=bad_log,
        ),
        valid.derive(
            f"{prefix}-event-log-lacks-required-bank",
            "an event log with only sha1 digests when policy requires sha256:23",
            "EventLogReplayError",
            event_log=sha1_only_log,
        ),
        valid.derive(
            f"{prefix}-event-size-not-its-data",
            "an event log that replays but states size 0 for a file whose digests are not those "
            "of empty data",
            "EventLogReplayError",
            event_log=sizeless_log,
        ),
        valid.derive(
            f"{prefix}-not-tpm-generated",
            "an attest whose magic is not TPM_GENERATED_VALUE",
            "NotTpmGeneratedError",
            attest=bad_magic,
        ),
        valid.derive(
            f"{prefix}-trailing-bytes",
            "an attest with a byte after the TPMS_ATTEST",
            "MalformedEvidenceError",
            attest=valid.attest + b"\x00",
        ),
        valid.derive(
            f"{prefix}-truncated-signature",
            "a signature cut short",
            "MalformedEvidenceError",
            signature=valid.signature[:-10],
        ),
    ]


def write_vectors(vectors: Sequence[QuoteVector | KeyVector | EkCertVector]) -> None:
    for v in vectors:
        (VECTOR_DIR / f"{v.name}.json").write_text(v.to_json())

"""Pure verification of TPM quotes and measurement event logs.

:func:`verify_quote` takes the bytes ``tpm2_quote`` (or the sidecar) produced, the AK and the
expected qualifying data, and returns a :class:`VerifiedQuote` or raises the
:class:`~broker.errors.VerificationError` subclass that names what is wrong. No I/O happens here.

The checks run in a fixed order, each with its own error: parse (``MalformedEvidenceError``),
magic (``NotTpmGeneratedError``), type (``AttestTypeError``), signature scheme and hash
(``UnsupportedAlgorithmError``/``SignatureError``), signature (``SignatureError``), signer
(``QualifiedSignerError``, when the AK's qualified name is known), qualifying data
(``QualifyingDataError``), PCR selection (``UnsupportedAlgorithmError`` for SHA-1-only evidence
when a stronger bank is required, then ``PcrSelectionError``), PCR digest (``PcrDigestError``) and
event log (``EventLogReplayError``: each event's size against its digests, then the replay).
Golden values are a separate step, :func:`check_golden`, because policy decides which golden set
applies.

Performance: the attest and the signature are read from their bytes by :mod:`broker.tpmwire`
(which a differential test holds to accepting exactly what libtss2's unmarshalling accepts), not
through tpm2-pytss, whose wrappers allocate on every field access; the parsed PCR selection is
cached on its exact bytes, and per-AK state (the loaded key, its name and scheme) on the AK's
exact bytes by :func:`broker.tpmkeys.load_public`. docs/benchmarks.md has the profile.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import TPM2_ST, TPMS_ATTEST
from tpm2_pytss.utils import ffi as _ffi

from broker import tpmwire
from broker.errors import (
    AttestTypeError,
    EventLogReplayError,
    GoldenValueError,
    MalformedEvidenceError,
    NotTpmGeneratedError,
    PcrDigestError,
    PcrSelectionError,
    QualifiedSignerError,
    QualifyingDataError,
    SignatureError,
    UnsupportedAlgorithmError,
)
from broker.tpmkeys import HASH_BY_ALG, STRONG_HASHES, ParsedPublic
from evidence import eventlog
from evidence.errors import EventLogError
from evidence.eventlog import event_log_to_json
from evidence.pcr import BANK_SIZES, WORKLOAD_PCR, MeasurementEvent, check_event_size, replay

__all__ = [
    "DEFAULT_MAX_EVENT_LOG_ENTRIES",
    "DEFAULT_REQUIRED_PCRS",
    "ClockInfo",
    "PcrValues",
    "VerifiedQuote",
    "check_golden",
    "event_log_from_json",
    "event_log_to_json",
    "format_pcr",
    "pcr_values_from_tools",
    "verify_quote",
]

_T = TypeVar("_T")

#: Reported PCR values keyed by (index, bank), e.g. ``(23, "sha256")``.
PcrValues = Mapping[tuple[int, str], bytes]

#: By default a quote must cover PCR 23 in the SHA-256 bank.
DEFAULT_REQUIRED_PCRS: Final[Mapping[str, Sequence[int]]] = MappingProxyType(
    {"sha256": (WORKLOAD_PCR,)}
)
DEFAULT_MAX_EVENT_LOG_ENTRIES: Final = 1024

_TPM_GENERATED: Final = tpmwire.TPM_GENERATED_VALUE
_ST_ATTEST_QUOTE: Final = tpmwire.ST_ATTEST_QUOTE
_ALG_RSASSA: Final = tpmwire.ALG_RSASSA
_ALG_RSAPSS: Final = tpmwire.ALG_RSAPSS
_ALG_ECDSA: Final = tpmwire.ALG_ECDSA
_SIG_SCHEMES: Final = {_ALG_RSASSA: "rsassa", _ALG_RSAPSS: "rsapss", _ALG_ECDSA: "ecdsa"}
_BANK_ALGS: Final = {alg: name for alg, name in HASH_BY_ALG.items() if name in BANK_SIZES}
_WEAK_BANKS: Final = frozenset({"sha1"})

_HASHLIB: Final[dict[str, Callable[[bytes], Any]]] = {
    "sha1": hashlib.sha1,
    "sha256": hashlib.sha256,
    "sha384": hashlib.sha384,
    "sha512": hashlib.sha512,
}
_PYCA_HASH: Final[dict[str, hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}
_PKCS1: Final = padding.PKCS1v15()
# The TPM picks the PSS salt length (the digest size in the reference implementation, the
# maximum in older specifications), so the verifier recovers it from the signature.
_PSS: Final = {
    name: padding.PSS(mgf=padding.MGF1(h), salt_length=padding.PSS.AUTO)
    for name, h in _PYCA_HASH.items()
}
_ECDSA: Final = {name: ec.ECDSA(h) for name, h in _PYCA_HASH.items()}


def _bank_label(key: tuple[int, str]) -> str:
    return f"{key[1]}:{key[0]}"


def format_pcr(index: int, bank: str) -> str:
    """``sha256:23``, the tpm2-tools spelling of one PCR."""
    return f"{bank}:{index}"


@dataclass(frozen=True)
class ClockInfo:
    """TPMS_CLOCK_INFO of the quote: time since the last TPM reset, and reboot counters."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True)
class VerifiedQuote:
    """A quote that passed every check of :func:`verify_quote`."""

    #: The quoted PCR values in selection order, keyed by (index, bank).
    pcr_values: PcrValues
    #: The quoted selection: (bank, indices) in the quote's order.
    selection: tuple[tuple[str, tuple[int, ...]], ...]
    clock_info: ClockInfo
    firmware_version: int
    #: The qualified name of the signing key, as the TPM reports it.
    qualified_signer: bytes
    qualifying_data: bytes
    #: "rsassa", "rsapss" or "ecdsa", and the hash that signed (also the PCR digest's hash).
    signature_scheme: str
    signature_hash: str
    #: The event log that replayed to the quoted PCR 23 (empty when none was given).
    event_log: tuple[MeasurementEvent, ...]
    #: Banks in which the event log was replayed and matched.
    event_log_banks: tuple[str, ...]
    #: Hex SHA-256 over attest || signature: what audit records cite.
    evidence_digest: str
    #: ``ParsedPublic.key_id`` of the AK that signed.
    ak_key_id: str


def _frozen(cls: type[_T], **fields: Any) -> _T:
    """An instance of the frozen dataclass ``cls`` with ``fields`` (every field, by name).

    The generated ``__init__`` of a frozen dataclass sets each field through
    ``object.__setattr__``, which for VerifiedQuote's fourteen fields costs about as much as
    parsing the quote; filling the instance's ``__dict__`` at once makes the same object (the
    unit tests compare the two). It is only for the classes of this module, which have no
    ``__post_init__`` nor defaults.
    """
    obj = object.__new__(cls)
    obj.__dict__.update(fields)
    return obj


# --- parsing -------------------------------------------------------------------------------


def _unmarshal(cls: Any, data: bytes, what: str) -> Any:
    """Unmarshals exactly one ``cls`` from ``data`` (returns the tpm2-pytss object)."""
    try:
        obj, consumed = cls.unmarshal(data)
    except Exception as e:  # libtss2 reports short or invalid input as TSS2_Exception
        raise MalformedEvidenceError(f"{what} is not a valid {cls.__name__}") from e
    if consumed != len(data):
        raise MalformedEvidenceError(
            f"{what} has {len(data) - consumed} trailing bytes after the {cls.__name__}"
        )
    return obj


def _b(tpm2b_buffer: Any, size: int) -> bytes:
    # One copy out of the C buffer (slicing a cdata array first builds a list of ints).
    return _ffi.buffer(tpm2b_buffer, size)[:]  # type: ignore[no-any-return]


@dataclass(frozen=True)
class _Selection:
    order: tuple[tuple[int, str], ...]
    keys: frozenset[tuple[int, str]]
    banks: tuple[str, ...]
    by_bank: tuple[tuple[str, tuple[int, ...]], ...]
    #: The banks in which PCR 23 (the event log's PCR) is quoted, in the quote's order.
    workload_banks: tuple[str, ...]
    #: Every selected bank is a weak one (SHA-1).
    all_weak: bool
    #: ``order`` with each value's size.
    sized: tuple[tuple[tuple[int, str], int], ...]


@functools.lru_cache(maxsize=256)
def _parse_selection(raw: tuple[tuple[int, bytes], ...]) -> _Selection:
    order: list[tuple[int, str]] = []
    banks: list[str] = []
    by_bank: list[tuple[str, tuple[int, ...]]] = []
    for alg, bitmap in raw:
        bank = _BANK_ALGS.get(alg)
        if bank is None:
            raise UnsupportedAlgorithmError(
                f"quote selects PCR bank 0x{alg:04x}; supported banks: {', '.join(BANK_SIZES)}"
            )
        if bank in banks:
            raise MalformedEvidenceError(f"quote selects the {bank} bank twice")
        # TPMS_PCR_SELECT: bit b of byte i selects PCR 8*i + b; the TPM digests in this order.
        indices = tuple(
            8 * i + b for i, byte in enumerate(bitmap) for b in range(8) if byte & (1 << b)
        )
        if indices:
            banks.append(bank)
            by_bank.append((bank, indices))
            order.extend((index, bank) for index in indices)
    keys = frozenset(order)
    return _Selection(
        order=tuple(order),
        keys=keys,
        banks=tuple(banks),
        by_bank=tuple(by_bank),
        workload_banks=tuple(bank for bank in banks if (WORKLOAD_PCR, bank) in keys),
        all_weak=all(bank in _WEAK_BANKS for bank in banks),
        sized=tuple((key, BANK_SIZES[key[1]]) for key in order),
    )


@functools.lru_cache(maxsize=256)
def _selection_from_struct(raw: bytes) -> _Selection:
    """Parses a TPML_PCR_SELECTION from its in-memory image (libtss2's C layout)."""
    sel = _ffi.new("TPML_PCR_SELECTION *")
    _ffi.memmove(sel, raw, len(raw))
    if sel.count > len(sel.pcrSelections):
        raise MalformedEvidenceError("PCR selection has more banks than a TPM can select")
    return _parse_selection(
        tuple(
            (int(s.hash), _b(s.pcrSelect, min(int(s.sizeofSelect), len(s.pcrSelect))))
            for s in sel.pcrSelections[0 : sel.count]
        )
    )


@functools.lru_cache(maxsize=256)
def _selection_from_wire(raw: bytes) -> _Selection:
    """Parses a marshalled TPML_PCR_SELECTION (cached: quotes from one machine repeat the same
    selection, and the key is its exact bytes)."""
    return _parse_selection(tpmwire.parse_pcr_selection(raw))


def _selection_of(quote_c: Any) -> _Selection:
    # Quotes from one machine repeat the same selection, so the parsed form is cached on the
    # selection's raw C image: one copy instead of walking the structure field by field.
    raw = _ffi.buffer(_ffi.addressof(quote_c, "pcrSelect"))[:]
    return _selection_from_struct(raw)


# --- signature -----------------------------------------------------------------------------


def _verify_signature(ak: ParsedPublic, sig: tpmwire.Signature, attest: bytes) -> tuple[str, str]:
    """Checks the signature over ``attest``; returns its scheme and hash names."""
    sig_alg = sig.sig_alg
    scheme = _SIG_SCHEMES.get(sig_alg)
    if scheme is None:
        raise UnsupportedAlgorithmError(
            f"signature scheme 0x{sig_alg:04x} is not accepted (rsassa, rsapss, ecdsa)"
        )
    hash_alg = sig.hash_alg
    assert hash_alg is not None  # tpmwire reads the hash of every scheme accepted above
    hash_name = HASH_BY_ALG.get(hash_alg, f"0x{hash_alg:04x}")
    if hash_name not in STRONG_HASHES:
        raise UnsupportedAlgorithmError(
            f"signature hash {hash_name} is not accepted (SHA-256 or stronger is required)"
        )
    key = ak.key
    if (scheme == "ecdsa") != (ak.key_type == "ecc"):
        raise SignatureError(f"an {scheme} signature cannot come from an {ak.key_type.upper()} AK")
    if ak.scheme is not None and (ak.scheme != scheme or ak.scheme_hash != hash_name):
        raise SignatureError(
            f"signature is {scheme}/{hash_name} but the AK's scheme is {ak.scheme}/{ak.scheme_hash}"
        )
    algorithm = _PYCA_HASH[hash_name]
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            r = int.from_bytes(sig.r, "big")
            s = int.from_bytes(sig.s, "big")
            key.verify(encode_dss_signature(r, s), attest, _ECDSA[hash_name])
        else:
            pad = _PKCS1 if sig_alg == _ALG_RSASSA else _PSS[hash_name]
            key.verify(sig.sig, attest, pad, algorithm)
    except InvalidSignature as e:
        raise SignatureError("signature does not verify under the AK") from e
    return scheme, hash_name


# --- PCRs and event log --------------------------------------------------------------------


def _check_selection(
    selection: _Selection, pcr_values: PcrValues, required: Mapping[str, Sequence[int]]
) -> dict[tuple[int, str], bytes]:
    """Checks the quoted selection against policy and the reported values against the
    selection; returns the reported values in the quote's order."""
    if not selection.order:
        raise PcrSelectionError("quote selects no PCRs")
    if selection.all_weak:
        strong_required = [b for b in required if b not in _WEAK_BANKS and required[b]]
        if strong_required:
            raise UnsupportedAlgorithmError(
                f"quote covers only the {', '.join(selection.banks)} bank; policy requires "
                f"{', '.join(strong_required)} (SHA-1-only evidence is refused)"
            )
    keys = selection.keys
    for bank, indices in required.items():
        for index in indices:
            if (index, bank) not in keys:
                raise PcrSelectionError(f"quote does not cover required PCR {bank}:{index}")
    if pcr_values.keys() != keys:
        reported = set(pcr_values)
        missing = sorted(keys - reported)
        extra = sorted(reported - keys)
        parts = []
        if missing:
            parts.append("missing " + ", ".join(map(_bank_label, missing)))
        if extra:
            parts.append("not quoted " + ", ".join(map(_bank_label, extra)))
        raise PcrSelectionError(
            "reported PCR values do not match the quoted selection: " + "; ".join(parts)
        )
    ordered = {}
    for key, size in selection.sized:
        value = bytes(pcr_values[key])
        if len(value) != size:
            raise MalformedEvidenceError(
                f"reported {_bank_label(key)} value is {len(value)} bytes, expected {size}"
            )
        ordered[key] = value
    return ordered


def _check_event_log(
    events: Sequence[MeasurementEvent],
    selection: _Selection,
    pcr_values: PcrValues,
    required: Mapping[str, Sequence[int]],
    max_entries: int,
) -> tuple[str, ...]:
    if len(events) > max_entries:
        raise EventLogReplayError(f"event log has {len(events)} events, more than {max_entries}")
    quoted = selection.workload_banks
    # The quoted banks that every event has a digest for, found in the same pass as the
    # per-event checks: this runs for every quote the broker verifies.
    covered = quoted
    launches = False
    for n, event in enumerate(events):
        if event.pcr_index != WORKLOAD_PCR:
            raise EventLogReplayError(
                f"event {n} ({event.path!r}) is for PCR {event.pcr_index}; only PCR "
                f"{WORKLOAD_PCR} events can be replayed"
            )
        # The size is not extended into the PCR, so the replay cannot catch a false one; what
        # the digests alone show (empty data or not) is checked here, the rest against the
        # approved manifest by policy.
        try:
            check_event_size(n, event)
        except EventLogError as e:
            raise EventLogReplayError(f"event log is malformed: {e}") from e
        digests = event.digests
        for bank in covered:
            if bank not in digests:
                covered = tuple(b for b in covered if b in digests)
                break
        if event.launch is not None:
            launches = True
    if not quoted:
        raise EventLogReplayError(f"PCR {WORKLOAD_PCR} is not quoted: the event log is unchecked")
    # A bank that policy requires must be explained by the log: otherwise a log in a weaker bank
    # (SHA-1) could stand for a workload whose stronger-bank value is something else.
    for bank, indices in required.items():
        if WORKLOAD_PCR in indices and bank not in covered:
            raise EventLogReplayError(
                f"event log has no {bank} digest for every event; policy requires "
                f"{bank}:{WORKLOAD_PCR}"
            )
    if not covered:
        raise EventLogReplayError("event log has digests for none of the quoted banks")
    values = None if launches else _replay_files(events, covered)
    if values is None:
        # A launch event (whose digests must be recomputed from the launch) or a digest of the
        # wrong size: the one replay of evidence.pcr decides, and names what is wrong.
        try:
            replayed = replay(events, covered, pcr_index=WORKLOAD_PCR, max_events=max_entries)
        except EventLogError as e:
            raise EventLogReplayError(f"event log is malformed: {e}") from e
        values = tuple(replayed[bank] for bank in covered)
    for bank, value in zip(covered, values, strict=True):
        quoted_value = pcr_values[(WORKLOAD_PCR, bank)]
        if not hmac.compare_digest(value, quoted_value):
            raise EventLogReplayError(
                f"event log replays to {bank}:{WORKLOAD_PCR}={value.hex()}, "
                f"but the quote has {quoted_value.hex()}"
            )
    return covered


#: Logs of up to this many events have their replay remembered (see :func:`_replay_files`).
_REPLAY_CACHE_EVENTS: Final = 64


def _replay_files(
    events: Sequence[MeasurementEvent], banks: tuple[str, ...]
) -> tuple[bytes, ...] | None:
    """PCR 23 replayed from reset in each of ``banks``, for a log of file events only (no launch
    event) whose every event is for PCR 23 and has a digest in each of ``banks``; None when a
    digest has the wrong size.

    A workload's log is the same in every quote it sends, so the result is remembered, keyed by
    the banks and every digest in order (exactly what the replay is a function of): a log that
    differs in any byte is replayed afresh. Only short logs are remembered, which bounds the
    memory the cache can hold.
    """
    digests = tuple([e.digests[b] for e in events for b in banks])
    if len(events) <= _REPLAY_CACHE_EVENTS:
        try:
            return _replay_remembered(banks, digests)
        except TypeError:  # a digest that cannot be a key (a bytearray): replay it uncached
            pass
    return _replay_digests(banks, digests)


def _replay_digests(banks: tuple[str, ...], digests: tuple[bytes, ...]) -> tuple[bytes, ...] | None:
    """The replay itself: ``digests`` holds each event's digests in ``banks`` order, event after
    event. One bank at a time, so that the running value stays in a local."""
    out = []
    step = len(banks)
    for i, bank in enumerate(banks):
        size = BANK_SIZES[bank]
        h = _HASHLIB[bank]
        value = bytes(size)
        for digest in digests[i::step]:
            if len(digest) != size:
                return None
            value = h(value + digest).digest()
        out.append(value)
    return tuple(out)


_replay_remembered = functools.lru_cache(maxsize=256)(_replay_digests)


# --- the verifier --------------------------------------------------------------------------


def verify_quote(
    *,
    ak: ParsedPublic,
    attest: bytes,
    signature: bytes,
    pcr_values: PcrValues,
    expected_qualifying_data: bytes,
    required_pcrs: Mapping[str, Sequence[int]] = DEFAULT_REQUIRED_PCRS,
    event_log: Sequence[MeasurementEvent] | None = None,
    max_event_log_entries: int = DEFAULT_MAX_EVENT_LOG_ENTRIES,
    expected_signer: bytes | None = None,
) -> VerifiedQuote:
    """Verifies a TPM2_Quote made by ``ak``.

    ``attest`` is the marshalled TPMS_ATTEST (``tpm2_quote --message``), ``signature`` the
    marshalled TPMT_SIGNATURE (``--signature``), ``pcr_values`` the reported values of exactly the
    quoted PCRs (see :func:`pcr_values_from_tools`). ``required_pcrs`` maps a bank to the indices
    the quote must cover. With ``event_log``, the log must replay to the quoted PCR 23 in every
    quoted bank it has digests for, in at least one, and in every bank ``required_pcrs`` names
    for PCR 23, and every event's size must agree with its digests (0 exactly for empty data).
    With ``expected_signer`` (the AK's qualified name, :func:`broker.tpmkeys.ak_qualified_name`),
    the quote's qualifiedSigner must equal it.

    Raises:
        MalformedEvidenceError: attest or signature cannot be parsed, has trailing bytes, or a
            reported value has the wrong size.
        NotTpmGeneratedError: the magic is not TPM_GENERATED_VALUE.
        AttestTypeError: the attest is not a quote.
        UnsupportedAlgorithmError: signature scheme or hash (SHA-1) or PCR bank not accepted,
            or only SHA-1 PCRs were quoted where a stronger bank is required.
        SignatureError: the signature is not the AK's scheme or does not verify.
        QualifiedSignerError: qualifiedSigner is not ``expected_signer``.
        QualifyingDataError: extraData is not ``expected_qualifying_data``.
        PcrSelectionError: a required PCR is not quoted, or the reported values are not exactly
            the quoted selection.
        PcrDigestError: the quoted digest is not the digest of the reported values.
        EventLogReplayError: the event log is too long, malformed (an event's size contradicts
            its digests, say), or does not replay.
    """
    attest = bytes(attest)
    signature = bytes(signature)
    # Both structures are read from their bytes (broker.tpmwire), not through tpm2-pytss: see
    # the module docstring for why.
    a = tpmwire.parse_attest(attest)
    sig = tpmwire.parse_signature(signature)
    if a.magic != _TPM_GENERATED:
        raise NotTpmGeneratedError(
            f"attest magic is 0x{a.magic:08x}, not TPM_GENERATED_VALUE (0x{_TPM_GENERATED:08x})"
        )
    if a.type != _ST_ATTEST_QUOTE or a.pcr_select is None or a.pcr_digest is None:
        try:
            type_name = str(TPM2_ST(a.type))
        except ValueError:
            type_name = "unknown"
        raise AttestTypeError(f"attest is of type {type_name} (0x{a.type:04x}), not a quote")

    scheme, hash_name = _verify_signature(ak, sig, attest)

    signer = a.qualified_signer
    if expected_signer is not None and not hmac.compare_digest(signer, expected_signer):
        raise QualifiedSignerError(
            f"quote's qualifiedSigner is {signer.hex()}, not the enrolled AK's qualified name "
            f"{expected_signer.hex()} (the quote was made by another TPM object)"
        )

    extra = a.extra_data
    if not hmac.compare_digest(extra, expected_qualifying_data):
        raise QualifyingDataError("quote's qualifying data is not the expected value")

    selection = _selection_from_wire(a.pcr_select)
    ordered = _check_selection(selection, pcr_values, required_pcrs)

    # TPM2_Quote digests the selected PCRs with the hash of the signing scheme.
    digest = _HASHLIB[hash_name](b"".join(ordered.values())).digest()
    if not hmac.compare_digest(digest, a.pcr_digest):
        raise PcrDigestError(
            f"quoted PCR digest ({hash_name}) does not match the reported PCR values"
        )

    events: tuple[MeasurementEvent, ...] = ()
    log_banks: tuple[str, ...] = ()
    if event_log is not None:
        events = tuple(event_log)
        log_banks = _check_event_log(
            events, selection, pcr_values, required_pcrs, max_event_log_entries
        )

    h = hashlib.sha256(attest)
    h.update(signature)
    return _frozen(
        VerifiedQuote,
        pcr_values=MappingProxyType(ordered),
        selection=selection.by_bank,
        clock_info=_frozen(
            ClockInfo,
            clock=a.clock,
            reset_count=a.reset_count,
            restart_count=a.restart_count,
            safe=bool(a.safe),
        ),
        firmware_version=a.firmware_version,
        qualified_signer=signer,
        qualifying_data=extra,
        signature_scheme=scheme,
        signature_hash=hash_name,
        event_log=events,
        event_log_banks=log_banks,
        evidence_digest=h.hexdigest(),
        ak_key_id=ak.key_id,
    )


def check_golden(
    verified: VerifiedQuote, golden: Mapping[tuple[int, str], Collection[bytes]]
) -> None:
    """Checks that every PCR named in ``golden`` was quoted with one of its accepted values.

    Raises:
        GoldenValueError: naming the first PCR (in index, bank order) that is not quoted or
            whose value is not accepted. PCR values are not secret, so the message shows it.
    """
    for key in sorted(golden):
        accepted = golden[key]
        value = verified.pcr_values.get(key)
        if value is None:
            raise GoldenValueError(f"golden PCR {_bank_label(key)} is not in the quote")
        if value not in accepted:
            raise GoldenValueError(
                f"PCR {_bank_label(key)}={value.hex()} is not an accepted value "
                f"({len(accepted)} accepted)"
            )


# --- tpm2-tools and JSON formats -------------------------------------------------------------


def _attest_selection(attest: bytes) -> tuple[Any, _Selection]:
    obj = _unmarshal(TPMS_ATTEST, bytes(attest), "attest")
    if obj._cdata.type != _ST_ATTEST_QUOTE:
        raise AttestTypeError("attest is not a quote: it has no PCR selection")
    return obj.attested.quote.pcrSelect, _selection_of(obj._cdata.attested.quote)


def _serialized_layout() -> tuple[Any, int, int]:
    # tpm2-tools' "serialized" PCR file is a memory image of libtss2's C structures
    # (TPML_PCR_SELECTION, a UINT32 count, then that many TPML_DIGEST), so it is read with the
    # same structure definitions, through tpm2-pytss's cffi module, rather than by offsets.
    return _ffi, _ffi.sizeof("TPML_PCR_SELECTION"), _ffi.sizeof("TPML_DIGEST")


def _parse_serialized(data: bytes) -> dict[tuple[int, str], bytes] | None:
    ffi, sel_size, dig_size = _serialized_layout()
    if len(data) < sel_size + 4:
        return None
    sel = ffi.new("TPML_PCR_SELECTION *")
    ffi.memmove(sel, data[:sel_size], sel_size)
    count = ffi.new("UINT32 *")
    ffi.memmove(count, data[sel_size : sel_size + 4], 4)
    n_lists = int(count[0])
    if (
        sel.count > len(sel.pcrSelections)
        or n_lists > len(sel.pcrSelections)
        or len(data) != sel_size + 4 + n_lists * dig_size
    ):
        return None
    selection = _selection_from_struct(data[:sel_size])
    lists = ffi.new("TPML_DIGEST[]", n_lists)
    ffi.memmove(lists, data[sel_size + 4 :], n_lists * dig_size)
    digests: list[bytes] = []
    for lst in lists:
        if lst.count > 8:
            raise MalformedEvidenceError("PCR file holds a TPML_DIGEST with more than 8 values")
        digests.extend(_b(d.buffer, min(int(d.size), 64)) for d in lst.digests[0 : lst.count])
    return _assign(selection, digests)


def _assign(selection: _Selection, digests: list[bytes]) -> dict[tuple[int, str], bytes]:
    if len(digests) != len(selection.order):
        raise MalformedEvidenceError(
            f"PCR file holds {len(digests)} values for {len(selection.order)} selected PCRs"
        )
    out = {}
    for key, value in zip(selection.order, digests, strict=True):
        if len(value) != BANK_SIZES[key[1]]:
            raise MalformedEvidenceError(f"PCR file's {_bank_label(key)} value has the wrong size")
        out[key] = value
    return out


def pcr_values_from_tools(
    data: bytes,
    *,
    attest: bytes | None = None,
    pcr_format: Literal["auto", "serialized", "values"] = "auto",
) -> dict[tuple[int, str], bytes]:
    """Reads the PCR file ``tpm2_quote --pcr`` writes, into the mapping :func:`verify_quote`
    takes.

    ``serialized`` (tpm2-tools' default, ``-F serialized``) carries its own selection.
    ``values`` (``-F values``) is the bare concatenation of the values in the quote's selection
    order, so it needs ``attest`` to know the selection (read with
    ``tpm2_pytss.utils.unmarshal_tools_pcr_values``). ``auto`` takes the file as serialized when
    its size and counts fit that layout exactly, else as values.

    Raises:
        MalformedEvidenceError: the file does not fit the format or the selection.
        AttestTypeError: ``attest`` is not a quote.
    """
    data = bytes(data)
    if pcr_format in ("auto", "serialized"):
        parsed = _parse_serialized(data)
        if parsed is not None:
            return parsed
        if pcr_format == "serialized":
            raise MalformedEvidenceError("PCR file is not in tpm2-tools' serialized format")
    if attest is None:
        raise MalformedEvidenceError("a values-format PCR file needs the quote to be read")
    from tpm2_pytss.utils import unmarshal_tools_pcr_values

    pcr_select, selection = _attest_selection(attest)
    consumed, digests = unmarshal_tools_pcr_values(data, pcr_select)
    if consumed != len(data):
        raise MalformedEvidenceError(
            f"PCR file is {len(data)} bytes; the quoted selection needs {consumed}"
        )
    return _assign(selection, [bytes(d) for d in digests])


def event_log_from_json(
    data: bytes, *, max_events: int = DEFAULT_MAX_EVENT_LOG_ENTRIES
) -> tuple[MeasurementEvent, ...]:
    """Reads an event log from JSON (:func:`evidence.eventlog.event_log_from_json`, the one
    codec), as the broker's verification error.

    Raises:
        EventLogReplayError: the JSON is malformed, too long, or has a bad bank or digest.
    """
    try:
        return eventlog.event_log_from_json(data, max_events=max_events)
    except EventLogError as e:
        raise EventLogReplayError(str(e)) from e

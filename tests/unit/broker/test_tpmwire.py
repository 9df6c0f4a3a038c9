"""broker.tpmwire against libtss2: the hand parsers accept exactly what tpm2-pytss's unmarshal
accepts (whole input consumed), and read the same fields.

This is what makes hand parsing safe: the inputs are the stored quotes (tpm2-tools on swtpm, and
the Azure vTPM's), every single-bit flip of them, every truncation, trailing bytes, random
multi-byte damage, and each length field at, just past and far past what libtss2's buffers hold.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tpm2_pytss import (
    TPM2_ALG,
    TPM2_GENERATED,
    TPM2_ST,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMT_SIGNATURE,
)
from tpm2_pytss.utils import ffi

from broker import tpmwire
from broker.errors import MalformedEvidenceError
from tests.vectors.evidence import quote_vectors
from tests.vectors.snp import milan_evidence

_VECTORS = quote_vectors()
_MILAN = milan_evidence()
# Unique inputs, in a stable order: several vectors share one quote.
ATTESTS = list(dict.fromkeys([v.attest for v in _VECTORS] + [_MILAN.attest]))
SIGNATURES = list(dict.fromkeys([v.signature for v in _VECTORS] + [_MILAN.signature]))


def _b(tpm2b: Any, field: str) -> bytes:
    return bytes(ffi.buffer(getattr(tpm2b, field), tpm2b.size))


def _reference(cls: Any, data: bytes) -> Any | None:
    """tpm2-pytss's verdict: the parsed C structure, or None when refused or not all consumed."""
    try:
        obj, consumed = cls.unmarshal(data)
    except Exception:  # libtss2 refuses with TSS2_Exception
        return None
    return obj._cdata if consumed == len(data) else None


def _selection_fields(sel: Any) -> tuple[tuple[int, bytes], ...]:
    return tuple(
        (int(s.hash), bytes(ffi.buffer(s.pcrSelect, s.sizeofSelect)))
        for s in sel.pcrSelections[0 : sel.count]
    )


def _attest_fields(a: Any) -> tuple[Any, ...]:
    clock = a.clockInfo
    head = (
        int(a.magic),
        int(a.type),
        _b(a.qualifiedSigner, "name"),
        _b(a.extraData, "buffer"),
        int(clock.clock),
        int(clock.resetCount),
        int(clock.restartCount),
        int(clock.safe),
        int(a.firmwareVersion),
    )
    if a.type != tpmwire.ST_ATTEST_QUOTE:
        return (*head, None, None)
    quote = a.attested.quote
    return (*head, _selection_fields(quote.pcrSelect), _b(quote.pcrDigest, "buffer"))


def _signature_fields(s: Any) -> tuple[Any, ...]:
    alg = int(s.sigAlg)
    if alg in (tpmwire.ALG_RSASSA, tpmwire.ALG_RSAPSS):
        rsa = s.signature.rsassa
        return (alg, int(rsa.hash), _b(rsa.sig, "buffer"), b"", b"")
    if alg == tpmwire.ALG_ECDSA:
        ecc = s.signature.ecdsa
        return (alg, int(ecc.hash), b"", _b(ecc.signatureR, "buffer"), _b(ecc.signatureS, "buffer"))
    return (alg, None, b"", b"", b"")


def _ours_attest(data: bytes) -> tuple[Any, ...] | None:
    try:
        a = tpmwire.parse_attest(data)
    except MalformedEvidenceError:
        return None
    sel = None if a.pcr_select is None else tpmwire.parse_pcr_selection(a.pcr_select)
    return (*a[:9], sel, a.pcr_digest)


def _ours_signature(data: bytes) -> tuple[Any, ...] | None:
    try:
        return tuple(tpmwire.parse_signature(data))
    except MalformedEvidenceError:
        return None


def _agree_attest(data: bytes) -> None:
    ref = _reference(TPMS_ATTEST, data)
    expected = None if ref is None else _attest_fields(ref)
    assert _ours_attest(data) == expected, data.hex()


def _agree_signature(data: bytes) -> None:
    ref = _reference(TPMT_SIGNATURE, data)
    expected = None if ref is None else _signature_fields(ref)
    assert _ours_signature(data) == expected, data.hex()


def _damaged(data: bytes, seed: int) -> Iterator[bytes]:
    """Every single-bit flip and truncation, trailing bytes, and seeded random damage."""
    for i in range(len(data)):
        for bit in range(8):
            yield data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1 :]
    for n in range(len(data)):
        yield data[:n]
    for tail in (b"\x00", b"\x00\x00", bytes(17), b"\xff" * 3):
        yield data + tail
    rng = random.Random(seed)
    for _ in range(300):
        m = bytearray(data)
        for _ in range(rng.randint(2, 6)):
            m[rng.randrange(len(m))] = rng.randrange(256)
        cut = rng.choice((len(m), len(m), rng.randrange(len(m) + 1)))
        yield bytes(m[:cut]) + (b"" if rng.random() < 0.8 else rng.randbytes(rng.randint(1, 8)))


def test_buffer_limits_are_libtss2s() -> None:
    for struct_name, field, limit in (
        ("TPM2B_NAME", "name", tpmwire.NAME_MAX),
        ("TPM2B_DATA", "buffer", tpmwire.DATA_MAX),
        ("TPM2B_DIGEST", "buffer", tpmwire.DIGEST_MAX),
        ("TPML_PCR_SELECTION", "pcrSelections", tpmwire.PCR_BANKS_MAX),
        ("TPMS_PCR_SELECTION", "pcrSelect", tpmwire.PCR_SELECT_MAX),
        ("TPM2B_PUBLIC_KEY_RSA", "buffer", tpmwire.RSA_SIG_MAX),
        ("TPM2B_ECC_PARAMETER", "buffer", tpmwire.ECC_PARAM_MAX),
    ):
        assert len(getattr(ffi.new(f"{struct_name} *"), field)) == limit, struct_name


def test_constants_are_the_tpm_specifications() -> None:
    assert tpmwire.TPM_GENERATED_VALUE == int(TPM2_GENERATED.VALUE)
    assert tpmwire.ST_ATTEST_QUOTE == int(TPM2_ST.ATTEST_QUOTE)
    assert tpmwire.ALG_RSASSA == int(TPM2_ALG.RSASSA)
    assert tpmwire.ALG_RSAPSS == int(TPM2_ALG.RSAPSS)
    assert tpmwire.ALG_ECDSA == int(TPM2_ALG.ECDSA)


def test_the_vectors_are_read_as_libtss2_reads_them() -> None:
    # The stored vectors include malformed ones (trailing bytes, a truncated signature) and a
    # certify: each gets libtss2's verdict.
    for data in ATTESTS:
        _agree_attest(data)
    for data in SIGNATURES:
        _agree_signature(data)
    parsed = [tpmwire.parse_attest(a) for a in ATTESTS if _ours_attest(a) is not None]
    assert len(parsed) >= 4
    assert {a.type for a in parsed} >= {tpmwire.ST_ATTEST_QUOTE, 0x8017}
    # Both key types and the Azure vTPM's 24-PCR selection are among them.
    algs = {tpmwire.parse_signature(s).sig_alg for s in SIGNATURES if _ours_signature(s)}
    assert {tpmwire.ALG_RSASSA, tpmwire.ALG_RSAPSS, tpmwire.ALG_ECDSA} <= algs


@pytest.mark.parametrize("index", range(len(ATTESTS)))
def test_damaged_attests_get_libtss2s_verdict(index: int) -> None:
    accepted = 0
    for data in _damaged(ATTESTS[index], seed=index):
        _agree_attest(data)
        accepted += _ours_attest(data) is not None
    # Flips of counters and values parse: the comparison covers accepted fields, not only
    # refusals (unless the vector was malformed to begin with).
    assert accepted > 100 or _ours_attest(ATTESTS[index]) is None


@pytest.mark.parametrize("index", range(len(SIGNATURES)))
def test_damaged_signatures_get_libtss2s_verdict(index: int) -> None:
    for data in _damaged(SIGNATURES[index], seed=1000 + index):
        _agree_signature(data)


def _valid_quote() -> bytes:
    return next(a for a in ATTESTS if (_ours_attest(a) or (0, 0))[1] == tpmwire.ST_ATTEST_QUOTE)


def _quote_layout(data: bytes) -> dict[str, int]:
    """Offsets of the length fields of a quote's TPMS_ATTEST."""
    signer = struct.unpack_from(">H", data, 6)[0]
    extra_at = 8 + signer
    extra = struct.unpack_from(">H", data, extra_at)[0]
    select_at = extra_at + 2 + extra + 25
    off = select_at + 4
    for _ in range(struct.unpack_from(">I", data, select_at)[0]):
        off += 3 + data[off + 2]
    return {"signer": 6, "extra": extra_at, "select": select_at, "digest": off}


def _with_tpm2b(data: bytes, at: int, size: int) -> bytes:
    old = struct.unpack_from(">H", data, at)[0]
    return data[:at] + struct.pack(">H", size) + bytes(range(256)) * 256 + data[at + 2 + old :]


@pytest.mark.parametrize("field", ["signer", "extra", "digest"])
def test_every_length_at_and_past_the_buffer(field: str) -> None:
    base = _valid_quote()
    at = _quote_layout(base)[field]
    for size in (0, 1, 32, 63, 64, 65, 67, 68, 69, 255, 256, 0xFFFF):
        longer = _with_tpm2b(base, at, size)
        old = struct.unpack_from(">H", base, at)[0]
        # Exactly sized (the payload cut to ``size``), too short by one, and one byte over.
        exact = longer[: at + 2 + size] + base[at + 2 + old :]
        for data in (exact, exact[:-1], exact + b"\x00"):
            _agree_attest(data)


def test_every_pcr_selection_shape() -> None:
    base = _valid_quote()
    layout = _quote_layout(base)
    head, digest = base[: layout["select"]], base[layout["digest"] :]
    for count in (0, 1, 2, 15, 16, 17, 0xFFFFFFFF):
        for size_of_select in (0, 1, 3, 4, 5, 255):
            one = struct.pack(">HB", 0x000B, size_of_select) + b"\x80" * size_of_select
            for n in {count, min(count, 17)}:
                body = struct.pack(">I", count) + one * min(n, 17)
                _agree_attest(head + body + digest)
                assert _reference(TPML_PCR_SELECTION, body) is None or (
                    tpmwire.parse_pcr_selection(body)
                    == _selection_fields(_reference(TPML_PCR_SELECTION, body))
                )


def test_pcr_selection_parser_alone_agrees() -> None:
    quote = tpmwire.parse_attest(_valid_quote())
    assert quote.pcr_select is not None
    for data in _damaged(quote.pcr_select, seed=7):
        ref = _reference(TPML_PCR_SELECTION, data)
        try:
            ours: Any = tpmwire.parse_pcr_selection(data)
        except MalformedEvidenceError:
            ours = None
        assert ours == (None if ref is None else _selection_fields(ref)), data.hex()


@pytest.mark.parametrize(
    ("alg", "sizes"),
    [
        (tpmwire.ALG_RSASSA, [(0,), (256,), (511,), (512,), (513,), (0xFFFF,)]),
        (tpmwire.ALG_RSAPSS, [(512,), (513,)]),
        (tpmwire.ALG_ECDSA, [(0, 0), (32, 32), (128, 128), (129, 1), (1, 129), (0xFFFF, 0)]),
    ],
)
def test_every_signature_length_at_and_past_the_buffer(
    alg: int, sizes: list[tuple[int, ...]]
) -> None:
    for lengths in sizes:
        body = b"".join(struct.pack(">H", n) + bytes([n & 0xFF]) * n for n in lengths)
        data = struct.pack(">HH", alg, 0x000B) + body
        for variant in (data, data[:-1], data + b"\x01"):
            _agree_signature(variant)


def test_other_schemes_and_types_are_libtss2s_to_judge() -> None:
    sig = next(s for s in SIGNATURES if _ours_signature(s))
    for alg in (0x0010, 0x0005, 0x001A, 0x001B, 0x001C, 0x1234, 0xFFFF):  # NULL, HMAC, ECDAA...
        for data in (struct.pack(">H", alg), struct.pack(">H", alg) + sig[2:]):
            _agree_signature(data)
    quote = _valid_quote()
    for st in (0x8014, 0x8015, 0x8016, 0x8017, 0x8019, 0x801A, 0x801C, 0x1234):
        _agree_attest(quote[:4] + struct.pack(">H", st) + quote[6:])


def test_refusals_are_the_verifiers_error() -> None:
    parsers: list[Callable[[bytes], object]] = [
        tpmwire.parse_attest,
        tpmwire.parse_signature,
        tpmwire.parse_pcr_selection,
    ]
    for parse in parsers:
        for data in (b"", b"\x00", b"\xff" * 5):
            with pytest.raises(MalformedEvidenceError):
                parse(data)

"""The two TPM 2.0 structures the verifier reads for every quote, parsed from their bytes.

A quote arrives as a marshalled TPMS_ATTEST and a marshalled TPMT_SIGNATURE. Parsing them through
tpm2-pytss costs more than the rest of the verification apart from the signature: libtss2's
unmarshalling fills a C structure, and tpm2-pytss wraps it in Python objects that allocate on
every field access. Both structures are short, big-endian and fixed in layout, so for the one
attest type (TPM_ST_ATTEST_QUOTE) and the three signature schemes (RSASSA, RSAPSS, ECDSA) that
the verifier accepts they are read here with :mod:`struct`, every length bounds-checked against
the input and against the C buffer libtss2 would copy it into.

The rule is that these parsers accept exactly what libtss2 accepts, no more: an input they
parse, libtss2 parses to the same fields and consumes completely; an input they refuse,
libtss2 refuses or leaves bytes over. ``tests/unit/broker/test_tpmwire.py`` holds them to it on
the regression vectors and on random mutations of them. Other attest types and signature
schemes, which the verifier refuses anyway, are handed to libtss2 so that the verdict on their
structure is libtss2's own.
"""

from __future__ import annotations

import struct
from typing import Any, Final, NamedTuple

from broker.errors import MalformedEvidenceError

__all__ = [
    "ALG_ECDSA",
    "ALG_RSAPSS",
    "ALG_RSASSA",
    "ST_ATTEST_QUOTE",
    "TPM_GENERATED_VALUE",
    "Attest",
    "Signature",
    "parse_attest",
    "parse_pcr_selection",
    "parse_signature",
]

#: TPM_GENERATED_VALUE, the magic of every structure the TPM signs itself.
TPM_GENERATED_VALUE: Final = 0xFF544347
#: TPM_ST_ATTEST_QUOTE.
ST_ATTEST_QUOTE: Final = 0x8018
#: TPM_ALG_RSASSA, TPM_ALG_RSAPSS, TPM_ALG_ECDSA.
ALG_RSASSA: Final = 0x0014
ALG_RSAPSS: Final = 0x0016
ALG_ECDSA: Final = 0x0018

# The capacities of libtss2's C buffers (TSS 2.0 headers): a longer TPM2B or list does not fit,
# and libtss2 refuses it. The tests compare them with tpm2-pytss's structure definitions.
NAME_MAX: Final = 68  # TPM2B_NAME.name: sizeof(TPMU_NAME)
DATA_MAX: Final = 64  # TPM2B_DATA.buffer: sizeof(TPMU_HA)
DIGEST_MAX: Final = 64  # TPM2B_DIGEST.buffer: sizeof(TPMU_HA)
PCR_BANKS_MAX: Final = 16  # TPML_PCR_SELECTION.pcrSelections: TPM2_NUM_PCR_BANKS
PCR_SELECT_MAX: Final = 4  # TPMS_PCR_SELECTION.pcrSelect: TPM2_PCR_SELECT_MAX
RSA_SIG_MAX: Final = 512  # TPM2B_PUBLIC_KEY_RSA.buffer: TPM2_MAX_RSA_KEY_BYTES
ECC_PARAM_MAX: Final = 128  # TPM2B_ECC_PARAMETER.buffer: TPM2_MAX_ECC_KEY_BYTES

_HEAD: Final = struct.Struct(">IHH")  # magic, type, qualifiedSigner.size
# TPMS_CLOCK_INFO (clock, resetCount, restartCount, safe) and firmwareVersion.
_CLOCK: Final = struct.Struct(">QIIBQ")
_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
_SIG_HEAD: Final = struct.Struct(">HHH")  # sigAlg, hash, first TPM2B size


class Attest(NamedTuple):
    """The fields of a TPMS_ATTEST. ``pcr_select`` and ``pcr_digest`` (TPMS_QUOTE_INFO) are
    None unless the type is TPM_ST_ATTEST_QUOTE."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    #: TPMI_YES_NO as marshalled: libtss2 does not hold it to 0 or 1, nor is it here.
    safe: int
    firmware_version: int
    #: The marshalled TPML_PCR_SELECTION, read with :func:`parse_pcr_selection`.
    pcr_select: bytes | None
    pcr_digest: bytes | None


class Signature(NamedTuple):
    """The fields of a TPMT_SIGNATURE. For RSASSA and RSAPSS ``sig`` is the signature and
    ``r`` and ``s`` are empty; for ECDSA it is the other way round. For any other scheme only
    ``sig_alg`` is read (``hash_alg`` is None and the rest empty)."""

    sig_alg: int
    hash_alg: int | None
    sig: bytes
    r: bytes
    s: bytes


def _libtss2_verdict(cls: Any, data: bytes, what: str) -> None:
    """Lets libtss2 judge the structure of a type this module does not parse itself.

    Raises:
        MalformedEvidenceError: libtss2 refuses it or leaves bytes over.
    """
    try:
        _, consumed = cls.unmarshal(data)
    except Exception as e:  # libtss2 reports short or invalid input as TSS2_Exception
        raise MalformedEvidenceError(f"{what} is not a valid {cls.__name__}") from e
    if consumed != len(data):
        raise MalformedEvidenceError(
            f"{what} has {len(data) - consumed} trailing bytes after the {cls.__name__}"
        )


def parse_attest(data: bytes) -> Attest:
    """Parses exactly one marshalled TPMS_ATTEST.

    Raises:
        MalformedEvidenceError: the bytes are truncated, a length exceeds what the structure
            can hold, a list is too long, the type is unknown, or bytes are left over.
    """
    n = len(data)
    try:
        magic, st, signer_size = _HEAD.unpack_from(data, 0)
        if signer_size > NAME_MAX:
            raise MalformedEvidenceError("attest's qualifiedSigner is longer than a TPM name")
        if st != ST_ATTEST_QUOTE:
            # Not a quote: the verifier refuses it by type, once libtss2 has said whether it
            # is well formed (so that a malformed one is refused as malformed, as before).
            from tpm2_pytss import TPMS_ATTEST

            _libtss2_verdict(TPMS_ATTEST, data, "attest")
        off = 8 + signer_size
        signer = data[8:off]
        (extra_size,) = _U16.unpack_from(data, off)
        if extra_size > DATA_MAX:
            raise MalformedEvidenceError("attest's extraData is longer than 64 bytes")
        off += 2
        extra = data[off : off + extra_size]
        off += extra_size
        clock, resets, restarts, safe, firmware = _CLOCK.unpack_from(data, off)
        off += 25
        if st != ST_ATTEST_QUOTE:
            return Attest(
                magic, st, signer, extra, clock, resets, restarts, safe, firmware, None, None
            )
        # TPMS_QUOTE_INFO: a TPML_PCR_SELECTION, then a TPM2B_DIGEST.
        start = off
        (count,) = _U32.unpack_from(data, off)
        if count > PCR_BANKS_MAX:
            raise MalformedEvidenceError(f"attest selects {count} PCR banks, more than a TPM has")
        off += 4
        for _ in range(count):
            size_of_select = data[off + 2]
            if size_of_select > PCR_SELECT_MAX:
                raise MalformedEvidenceError(
                    f"attest's PCR selection is {size_of_select} bytes, more than {PCR_SELECT_MAX}"
                )
            off += 3 + size_of_select
        pcr_select = data[start:off]
        (digest_size,) = _U16.unpack_from(data, off)
        if digest_size > DIGEST_MAX:
            raise MalformedEvidenceError("attest's PCR digest is longer than 64 bytes")
        off += 2
        end = off + digest_size
    except (struct.error, IndexError) as e:
        raise MalformedEvidenceError("attest is not a valid TPMS_ATTEST (truncated)") from e
    # Every field but the last is followed by a fixed-size read, which fails if that field ran
    # past the end; the last one, the digest, is checked here.
    if end > n:
        raise MalformedEvidenceError("attest is not a valid TPMS_ATTEST (truncated)")
    if end != n:
        raise MalformedEvidenceError(f"attest has {n - end} trailing bytes after the TPMS_ATTEST")
    return Attest(
        magic,
        st,
        signer,
        extra,
        clock,
        resets,
        restarts,
        safe,
        firmware,
        pcr_select,
        data[off:end],
    )


def parse_pcr_selection(raw: bytes) -> tuple[tuple[int, bytes], ...]:
    """The (hash algorithm, PCR bitmap) pairs of a marshalled TPML_PCR_SELECTION, such as
    :attr:`Attest.pcr_select`, in their order.

    Raises:
        MalformedEvidenceError: the bytes are not exactly one TPML_PCR_SELECTION.
    """
    try:
        (count,) = _U32.unpack_from(raw, 0)
        if count > PCR_BANKS_MAX:
            raise MalformedEvidenceError(f"{count} PCR banks selected, more than a TPM has")
        off = 4
        out = []
        for _ in range(count):
            (alg,) = _U16.unpack_from(raw, off)
            size_of_select = raw[off + 2]
            if size_of_select > PCR_SELECT_MAX:
                raise MalformedEvidenceError(
                    f"a PCR selection of {size_of_select} bytes, more than {PCR_SELECT_MAX}"
                )
            off += 3
            bitmap = raw[off : off + size_of_select]
            off += size_of_select
            out.append((alg, bitmap))
    except (struct.error, IndexError) as e:
        raise MalformedEvidenceError("not a valid TPML_PCR_SELECTION (truncated)") from e
    # A bitmap cut short leaves ``off`` past the end, so this also catches truncation.
    if off != len(raw):
        raise MalformedEvidenceError("not exactly one TPML_PCR_SELECTION")
    return tuple(out)


def parse_signature(data: bytes) -> Signature:
    """Parses exactly one marshalled TPMT_SIGNATURE.

    Raises:
        MalformedEvidenceError: the bytes are truncated, a length exceeds what the structure
            can hold, the scheme is unknown, or bytes are left over.
    """
    n = len(data)
    if n < 2:
        raise MalformedEvidenceError("signature is not a valid TPMT_SIGNATURE (truncated)")
    (sig_alg,) = _U16.unpack_from(data, 0)
    if sig_alg != ALG_RSASSA and sig_alg != ALG_RSAPSS and sig_alg != ALG_ECDSA:
        # Another scheme: the verifier refuses it by name once libtss2 has judged its
        # structure (so that a malformed one is refused as malformed, as before).
        from tpm2_pytss import TPMT_SIGNATURE

        _libtss2_verdict(TPMT_SIGNATURE, data, "signature")
        return Signature(sig_alg, None, b"", b"", b"")
    if n < 6:
        raise MalformedEvidenceError("signature is not a valid TPMT_SIGNATURE (truncated)")
    _, hash_alg, size = _SIG_HEAD.unpack_from(data, 0)
    if sig_alg != ALG_ECDSA:
        if size > RSA_SIG_MAX:
            raise MalformedEvidenceError("signature is longer than an RSA key can make")
        end = 6 + size
        sig, r, s = data[6:end], b"", b""
    else:
        if size > ECC_PARAM_MAX:
            raise MalformedEvidenceError("signature's R is longer than an ECC parameter")
        off = 6 + size
        if off + 2 > n:
            raise MalformedEvidenceError("signature is not a valid TPMT_SIGNATURE (truncated)")
        (s_size,) = _U16.unpack_from(data, off)
        if s_size > ECC_PARAM_MAX:
            raise MalformedEvidenceError("signature's S is longer than an ECC parameter")
        end = off + 2 + s_size
        sig, r, s = b"", data[6:off], data[off + 2 : end]
    if end > n:
        raise MalformedEvidenceError("signature is not a valid TPMT_SIGNATURE (truncated)")
    if end != n:
        raise MalformedEvidenceError(
            f"signature has {n - end} trailing bytes after the TPMT_SIGNATURE"
        )
    return Signature(sig_alg, hash_alg, sig, r, s)

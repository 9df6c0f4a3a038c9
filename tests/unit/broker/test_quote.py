"""broker.quote: the checks that the stored vectors cannot reach.

A real TPM never signs SHA-1 digests with a SHA-256 AK, never selects unknown banks and never
quotes with a SHA-384 scheme on swtpm's AKs, so these tests build TPMS_ATTEST structures with
tpm2-pytss and sign them with a software key: the verifier under test is the real one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from tpm2_pytss import (
    TPM2_ALG,
    TPM2_GENERATED,
    TPM2_ST,
    TPM2B_DATA,
    TPM2B_DIGEST,
    TPM2B_ECC_PARAMETER,
    TPM2B_NAME,
    TPM2B_PUBLIC_KEY_RSA,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMS_CLOCK_INFO,
    TPMS_PCR_SELECTION,
    TPMS_QUOTE_INFO,
    TPMS_SIGNATURE_ECC,
    TPMS_SIGNATURE_RSA,
    TPMT_SIGNATURE,
    TPMU_ATTEST,
    TPMU_SIGNATURE,
)

from broker import quote
from broker.errors import (
    EventLogReplayError,
    GoldenValueError,
    MalformedEvidenceError,
    PcrDigestError,
    PcrSelectionError,
    QualifiedSignerError,
    QualifyingDataError,
    SignatureError,
    UnsupportedAlgorithmError,
)
from broker.tpmkeys import ParsedPublic, ak_qualified_name, load_public
from evidence.launch import Launch
from evidence.pcr import EMPTY_DIGESTS, MeasurementEvent, extend, launch_event, replay
from tests.vectors.evidence import QuoteVector, flip_last_bit, quote_vector

NONCE = b"q" * 32
_ALG = {"sha1": TPM2_ALG.SHA1, "sha256": TPM2_ALG.SHA256, "sha384": TPM2_ALG.SHA384}
_PYCA = {
    "sha1": hashes.SHA1(),  # noqa: S303 (refusing SHA-1 is what is tested)
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
}


@pytest.fixture(scope="module")
def soft_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def soft_ak(soft_key: rsa.RSAPrivateKey) -> ParsedPublic:
    pem = soft_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return load_public(pem)


def _bitmap(indices: Sequence[int]) -> bytes:
    out = bytearray(3)
    for i in indices:
        out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def make_quote(
    key: rsa.RSAPrivateKey,
    selection: Sequence[tuple[int, Sequence[int]]],
    values: Sequence[bytes],
    *,
    sign_hash: str = "sha256",
    digest_hash: str | None = None,
) -> tuple[bytes, bytes]:
    """A TPMS_ATTEST quote over ``values`` and its TPMT_SIGNATURE, made in software."""
    sels = TPML_PCR_SELECTION(
        [
            TPMS_PCR_SELECTION(hash=alg, sizeofSelect=3, pcrSelect=_bitmap(idx))
            for alg, idx in selection
        ]
    )
    digest = hashlib.new(digest_hash or sign_hash, b"".join(values)).digest()
    attest = TPMS_ATTEST(
        magic=TPM2_GENERATED.VALUE,
        type=TPM2_ST.ATTEST_QUOTE,
        qualifiedSigner=TPM2B_NAME(b"\x00\x0b" + bytes(32)),
        extraData=TPM2B_DATA(NONCE),
        clockInfo=TPMS_CLOCK_INFO(clock=1000, resetCount=2, restartCount=3, safe=1),
        firmwareVersion=0x20191023,
        attested=TPMU_ATTEST(quote=TPMS_QUOTE_INFO(pcrSelect=sels, pcrDigest=TPM2B_DIGEST(digest))),
    ).marshal()
    raw = key.sign(attest, padding.PKCS1v15(), _PYCA[sign_hash])
    sig = TPMT_SIGNATURE(
        sigAlg=TPM2_ALG.RSASSA,
        signature=TPMU_SIGNATURE(
            rsassa=TPMS_SIGNATURE_RSA(hash=_ALG[sign_hash], sig=TPM2B_PUBLIC_KEY_RSA(raw))
        ),
    ).marshal()
    return bytes(attest), bytes(sig)


def _pcr23(value: bytes = b"\x11" * 32) -> dict[tuple[int, str], bytes]:
    return {(23, "sha256"): value}


def test_software_quote_verifies(soft_key: rsa.RSAPrivateKey, soft_ak: ParsedPublic) -> None:
    attest, sig = make_quote(soft_key, [(TPM2_ALG.SHA256, [23])], [b"\x11" * 32])
    v = quote.verify_quote(
        ak=soft_ak,
        attest=attest,
        signature=sig,
        pcr_values=_pcr23(),
        expected_qualifying_data=NONCE,
    )
    assert v.clock_info == quote.ClockInfo(clock=1000, reset_count=2, restart_count=3, safe=True)
    assert v.firmware_version == 0x20191023
    assert v.signature_scheme == "rsassa" and v.signature_hash == "sha256"
    assert v.evidence_digest == hashlib.sha256(attest + sig).hexdigest()
    assert v.selection == (("sha256", (23,)),)


def test_sha1_signature_is_unsupported(soft_key: rsa.RSAPrivateKey, soft_ak: ParsedPublic) -> None:
    attest, sig = make_quote(soft_key, [(TPM2_ALG.SHA256, [23])], [b"\x11" * 32], sign_hash="sha1")
    with pytest.raises(UnsupportedAlgorithmError, match="sha1"):
        quote.verify_quote(
            ak=soft_ak, attest=attest, signature=sig, pcr_values=_pcr23(),
            expected_qualifying_data=NONCE,
        )  # fmt: skip


def test_pcr_digest_uses_the_signing_hash(
    soft_key: rsa.RSAPrivateKey, soft_ak: ParsedPublic
) -> None:
    values = [b"\x11" * 32]
    sel = [(TPM2_ALG.SHA256, [23])]
    # The TPM digests the PCRs with the signing scheme's hash (SHA-384 here), not the bank's.
    attest, sig = make_quote(soft_key, sel, values, sign_hash="sha384")
    v = quote.verify_quote(
        ak=soft_ak, attest=attest, signature=sig, pcr_values=_pcr23(),
        expected_qualifying_data=NONCE,
    )  # fmt: skip
    assert v.signature_hash == "sha384"
    attest, sig = make_quote(soft_key, sel, values, sign_hash="sha384", digest_hash="sha256")
    with pytest.raises(PcrDigestError):
        quote.verify_quote(
            ak=soft_ak, attest=attest, signature=sig, pcr_values=_pcr23(),
            expected_qualifying_data=NONCE,
        )  # fmt: skip


def test_unknown_signature_scheme(soft_key: rsa.RSAPrivateKey, soft_ak: ParsedPublic) -> None:
    attest, _ = make_quote(soft_key, [(TPM2_ALG.SHA256, [23])], [b"\x11" * 32])
    schnorr = TPMT_SIGNATURE(
        sigAlg=TPM2_ALG.ECSCHNORR,
        signature=TPMU_SIGNATURE(
            ecschnorr=TPMS_SIGNATURE_ECC(
                hash=TPM2_ALG.SHA256,
                signatureR=TPM2B_ECC_PARAMETER(b"\x01" * 32),
                signatureS=TPM2B_ECC_PARAMETER(b"\x02" * 32),
            )
        ),
    ).marshal()
    with pytest.raises(UnsupportedAlgorithmError, match="0x001c"):
        quote.verify_quote(
            ak=soft_ak, attest=attest, signature=bytes(schnorr), pcr_values=_pcr23(),
            expected_qualifying_data=NONCE,
        )  # fmt: skip


def test_ecdsa_signature_for_rsa_ak(soft_key: rsa.RSAPrivateKey, soft_ak: ParsedPublic) -> None:
    attest, _ = make_quote(soft_key, [(TPM2_ALG.SHA256, [23])], [b"\x11" * 32])
    ecdsa = TPMT_SIGNATURE(
        sigAlg=TPM2_ALG.ECDSA,
        signature=TPMU_SIGNATURE(
            ecdsa=TPMS_SIGNATURE_ECC(
                hash=TPM2_ALG.SHA256,
                signatureR=TPM2B_ECC_PARAMETER(b"\x01" * 32),
                signatureS=TPM2B_ECC_PARAMETER(b"\x02" * 32),
            )
        ),
    ).marshal()
    with pytest.raises(SignatureError, match="RSA AK"):
        quote.verify_quote(
            ak=soft_ak, attest=attest, signature=bytes(ecdsa), pcr_values=_pcr23(),
            expected_qualifying_data=NONCE,
        )  # fmt: skip


def test_unsupported_bank(soft_key: rsa.RSAPrivateKey, soft_ak: ParsedPublic) -> None:
    attest, sig = make_quote(
        soft_key,
        [(TPM2_ALG.SHA256, [23]), (TPM2_ALG.SM3_256, [23])],
        [b"\x11" * 32, b"\x22" * 32],
    )
    with pytest.raises(UnsupportedAlgorithmError, match="bank"):
        quote.verify_quote(
            ak=soft_ak, attest=attest, signature=sig, pcr_values=_pcr23(),
            expected_qualifying_data=NONCE,
        )  # fmt: skip


def test_bank_selected_twice_is_malformed(
    soft_key: rsa.RSAPrivateKey, soft_ak: ParsedPublic
) -> None:
    attest, sig = make_quote(
        soft_key,
        [(TPM2_ALG.SHA256, [23]), (TPM2_ALG.SHA256, [16])],
        [b"\x11" * 32, b"\x22" * 32],
    )
    with pytest.raises(MalformedEvidenceError, match="twice"):
        quote.verify_quote(
            ak=soft_ak, attest=attest, signature=sig, pcr_values=_pcr23(),
            expected_qualifying_data=NONCE,
        )  # fmt: skip


def test_empty_selection(soft_key: rsa.RSAPrivateKey, soft_ak: ParsedPublic) -> None:
    attest, sig = make_quote(soft_key, [(TPM2_ALG.SHA256, [])], [])
    with pytest.raises(PcrSelectionError, match="no PCRs"):
        quote.verify_quote(
            ak=soft_ak, attest=attest, signature=sig, pcr_values={},
            expected_qualifying_data=NONCE, required_pcrs={},
        )  # fmt: skip


def test_selection_order_is_bank_then_index(
    soft_key: rsa.RSAPrivateKey, soft_ak: ParsedPublic
) -> None:
    sel = [(TPM2_ALG.SHA256, [23, 0, 7]), (TPM2_ALG.SHA1, [23])]
    ordered = [b"\x00" * 32, b"\x07" * 32, b"\x23" * 32, b"\x01" * 20]
    attest, sig = make_quote(soft_key, sel, ordered)
    # The mapping's own order does not matter: the verifier orders by the quote's selection.
    values = {
        (23, "sha1"): b"\x01" * 20,
        (23, "sha256"): b"\x23" * 32,
        (7, "sha256"): b"\x07" * 32,
        (0, "sha256"): b"\x00" * 32,
    }
    v = quote.verify_quote(
        ak=soft_ak, attest=attest, signature=sig, pcr_values=values,
        expected_qualifying_data=NONCE, required_pcrs={"sha256": [0, 7, 23]},
    )  # fmt: skip
    assert list(v.pcr_values) == [(0, "sha256"), (7, "sha256"), (23, "sha256"), (23, "sha1")]
    with pytest.raises(PcrSelectionError, match="sha256:16"):
        quote.verify_quote(
            ak=soft_ak, attest=attest, signature=sig, pcr_values=values,
            expected_qualifying_data=NONCE, required_pcrs={"sha256": [16, 23]},
        )  # fmt: skip


def test_reported_value_of_wrong_size(soft_key: rsa.RSAPrivateKey, soft_ak: ParsedPublic) -> None:
    attest, sig = make_quote(soft_key, [(TPM2_ALG.SHA256, [23])], [b"\x11" * 32])
    with pytest.raises(MalformedEvidenceError, match="31 bytes"):
        quote.verify_quote(
            ak=soft_ak, attest=attest, signature=sig, pcr_values=_pcr23(b"\x11" * 31),
            expected_qualifying_data=NONCE,
        )  # fmt: skip


def test_missing_reported_value(soft_key: rsa.RSAPrivateKey, soft_ak: ParsedPublic) -> None:
    attest, sig = make_quote(soft_key, [(TPM2_ALG.SHA256, [16, 23])], [b"\x16" * 32, b"\x11" * 32])
    with pytest.raises(PcrSelectionError, match="missing sha256:16"):
        quote.verify_quote(
            ak=soft_ak, attest=attest, signature=sig, pcr_values=_pcr23(),
            expected_qualifying_data=NONCE,
        )  # fmt: skip


# --- with the tpm2-tools vectors ---------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_valid() -> QuoteVector:
    return quote_vector("quote-rsa-rsassa-valid")


def _verify(v: QuoteVector, **kw: object) -> quote.VerifiedQuote:
    args: dict[str, object] = {
        "ak": load_public(v.ak_public),
        "attest": v.attest,
        "signature": v.signature,
        "pcr_values": v.pcr_values,
        "expected_qualifying_data": v.qualifying_data,
        "event_log": v.event_log,
    }
    args.update(kw)
    return quote.verify_quote(**args)  # type: ignore[arg-type]


def test_checks_run_in_order(rsa_valid: QuoteVector) -> None:
    # A broken signature and a wrong nonce: the signature is reported, as it is checked first.
    with pytest.raises(SignatureError):
        _verify(rsa_valid, signature=rsa_valid.signature[:-1] + b"\x00",
                expected_qualifying_data=b"other")  # fmt: skip
    with pytest.raises(QualifyingDataError):
        _verify(rsa_valid, expected_qualifying_data=b"other", pcr_values={})


def test_pem_ak_verifies_the_same_quote(rsa_valid: QuoteVector) -> None:
    tpm_ak = load_public(rsa_valid.ak_public)
    pem = tpm_ak.key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    v = _verify(rsa_valid, ak=load_public(pem))
    assert v.pcr_values == _verify(rsa_valid).pcr_values


def test_event_log_limits(rsa_valid: QuoteVector) -> None:
    assert rsa_valid.event_log is not None
    with pytest.raises(EventLogReplayError, match="more than 2"):
        _verify(rsa_valid, max_event_log_entries=2)
    other_pcr = (*rsa_valid.event_log, replace(rsa_valid.event_log[0], pcr_index=16))
    with pytest.raises(EventLogReplayError, match="PCR 16"):
        _verify(rsa_valid, event_log=other_pcr)
    with pytest.raises(EventLogReplayError, match="replays to"):
        _verify(rsa_valid, event_log=rsa_valid.event_log[:-1])
    with pytest.raises(EventLogReplayError, match="replays to"):
        _verify(rsa_valid, event_log=tuple(reversed(rsa_valid.event_log)))


def test_an_event_size_must_agree_with_its_digests(rsa_valid: QuoteVector) -> None:
    assert rsa_valid.event_log is not None
    first, *rest = rsa_valid.event_log
    # Sizes are not extended into PCR 23: each of these logs still replays to the quote.
    for size, what in ((0, "says 0 bytes"), (-1, "not a byte count"), (1 << 64, "byte count")):
        log = (replace(first, size=size), *rest)
        with pytest.raises(EventLogReplayError, match=what):
            _verify(rsa_valid, event_log=log)
    # An empty file measured, but a size stated for it: refused before the replay is tried.
    empty = MeasurementEvent(path="empty.txt", size=7, digests=dict(EMPTY_DIGESTS))
    with pytest.raises(
        EventLogReplayError, match=r"says 7 bytes, but its \w+ digest is that of em"
    ):
        _verify(rsa_valid, event_log=(empty, *rsa_valid.event_log))


def test_the_signer_must_be_the_aks_qualified_name(rsa_valid: QuoteVector) -> None:
    assert rsa_valid.ek_public is not None
    ak = load_public(rsa_valid.ak_public)
    signer = ak_qualified_name(ak, load_public(rsa_valid.ek_public))
    assert _verify(rsa_valid, expected_signer=signer).qualified_signer == signer
    # The AK's bare name is not what a TPM reports for an object under the EK.
    assert ak.name is not None and signer != ak.name
    with pytest.raises(QualifiedSignerError, match="not the enrolled AK's qualified name"):
        _verify(rsa_valid, expected_signer=ak.name)
    # The signature is checked first: a quote by another key is a SignatureError, whatever
    # its signer says.
    with pytest.raises(SignatureError):
        _verify(rsa_valid, expected_signer=ak.name, signature=flip_last_bit(rsa_valid.signature))
    # PEM keys have no TPM name, so no qualified name can be computed for them.
    pem = ak.key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert ak_qualified_name(load_public(pem), load_public(rsa_valid.ek_public)) is None


def test_event_log_in_sha256_only_is_enough(rsa_valid: QuoteVector) -> None:
    assert rsa_valid.event_log is not None
    sha256_only = tuple(
        MeasurementEvent(path=e.path, size=e.size, digests={"sha256": e.digests["sha256"]})
        for e in rsa_valid.event_log
    )
    v = _verify(rsa_valid, event_log=sha256_only)
    assert v.event_log_banks == ("sha256",)


def test_event_log_needs_pcr23_quoted(rsa_valid: QuoteVector) -> None:
    v = quote_vector("quote-rsa-selection-omits-pcr23")
    with pytest.raises(EventLogReplayError, match="not quoted"):
        _verify(v, event_log=rsa_valid.event_log, required_pcrs={"sha256": [16]})


def test_empty_event_log_replays_to_a_reset_pcr(rsa_valid: QuoteVector) -> None:
    with pytest.raises(EventLogReplayError, match="replays to"):
        _verify(rsa_valid, event_log=())


def test_sha1_only_allowed_when_policy_asks_only_sha1() -> None:
    v = quote_vector("quote-rsa-sha1-only")
    verified = _verify(v, required_pcrs={"sha1": [23]})
    assert list(verified.pcr_values) == [(23, "sha1")]


def test_replay_matches_extends(rsa_valid: QuoteVector) -> None:
    assert rsa_valid.event_log is not None
    value = bytes(32)
    for e in rsa_valid.event_log:
        value = extend(value, e.digests["sha256"], "sha256")
    assert rsa_valid.pcr_values[(23, "sha256")] == value


# --- golden values -----------------------------------------------------------------------------


def test_check_golden(rsa_valid: QuoteVector) -> None:
    v = _verify(rsa_valid)
    value = rsa_valid.pcr_values[(23, "sha256")]
    quote.check_golden(v, {(23, "sha256"): {value}})
    quote.check_golden(v, {(23, "sha256"): [bytes(32), value]})
    quote.check_golden(v, {})
    with pytest.raises(GoldenValueError, match=r"sha256:23=" + value.hex()):
        quote.check_golden(v, {(23, "sha256"): {bytes(32)}})
    with pytest.raises(GoldenValueError, match="sha1:23"):
        quote.check_golden(v, {(23, "sha256"): {value}, (23, "sha1"): set()})
    with pytest.raises(GoldenValueError, match="sha256:0 is not in the quote"):
        quote.check_golden(v, {(0, "sha256"): {bytes(32)}})


# --- tpm2-tools PCR files and event-log JSON ---------------------------------------------------


def test_values_and_serialized_pcr_files(rsa_valid: QuoteVector) -> None:
    values_file = b"".join(rsa_valid.pcr_values.values())
    assert quote.pcr_values_from_tools(values_file, attest=rsa_valid.attest) == rsa_valid.pcr_values
    with pytest.raises(MalformedEvidenceError):
        quote.pcr_values_from_tools(values_file + b"\x00", attest=rsa_valid.attest)
    with pytest.raises(MalformedEvidenceError):
        quote.pcr_values_from_tools(values_file[:-1], attest=rsa_valid.attest)
    with pytest.raises(MalformedEvidenceError, match="needs the quote"):
        quote.pcr_values_from_tools(values_file)
    with pytest.raises(MalformedEvidenceError, match="serialized"):
        quote.pcr_values_from_tools(values_file, pcr_format="serialized")
    assert rsa_valid.tools_pcr_file is not None
    assert (
        quote.pcr_values_from_tools(rsa_valid.tools_pcr_file, pcr_format="serialized")
        == rsa_valid.pcr_values
    )


def test_event_log_json_forms(rsa_valid: QuoteVector) -> None:
    assert rsa_valid.event_log is not None
    text = quote.event_log_to_json(rsa_valid.event_log)
    assert quote.event_log_from_json(text) == rsa_valid.event_log
    bare = json.dumps(json.loads(text)["events"]).encode()
    assert quote.event_log_from_json(bare) == rsa_valid.event_log
    # The protobuf JSON mapping of cleanroom.v1.EventLog, as the wire contract spells it.
    from google.protobuf import json_format

    from evidence.proto import event_log_to_pb

    pb_json = json_format.MessageToJson(event_log_to_pb(rsa_valid.event_log)).encode()
    assert quote.event_log_from_json(pb_json) == rsa_valid.event_log
    for bad in (
        b"not json",
        b"{}",
        b'[{"digests": {"sha256": "zz"}}]',
        b'[{"digests": {"md5": ""}}]',
        # Numbers and nesting that Python's own conversions refuse with other exceptions.
        b'[{"path": "a", "size": 1e400, "digests": {"sha256": "00"}}]',
        b'{"events": [{"pcrIndex": 1e400}]}',
        b"[" * 100_000 + b"]" * 100_000,
    ):
        with pytest.raises(EventLogReplayError):
            quote.event_log_from_json(bad)
    with pytest.raises(EventLogReplayError, match="more than 2"):
        quote.event_log_from_json(text, max_events=2)


def test_the_verdict_is_the_dataclass_its_fields_make(rsa_valid: QuoteVector) -> None:
    # verify_quote fills its frozen dataclasses without their generated __init__ (for speed):
    # the result must be the very object the constructor makes, every field set, still frozen.
    v = _verify(rsa_valid)
    rebuilt = quote.VerifiedQuote(**{f.name: getattr(v, f.name) for f in dataclasses.fields(v)})
    assert v == rebuilt and vars(v) == vars(rebuilt)
    assert v.clock_info == quote.ClockInfo(**vars(v.clock_info))
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.qualifying_data = b""  # type: ignore[misc]
    # And the fields read from the bytes are libtss2's reading of them.
    a = TPMS_ATTEST.unmarshal(rsa_valid.attest)[0]
    assert v.clock_info == quote.ClockInfo(
        clock=int(a.clockInfo.clock),
        reset_count=int(a.clockInfo.resetCount),
        restart_count=int(a.clockInfo.restartCount),
        safe=bool(a.clockInfo.safe),
    )
    assert v.firmware_version == int(a.firmwareVersion)
    assert v.qualified_signer == bytes(a.qualifiedSigner)
    assert v.qualifying_data == bytes(a.extraData)


def _log_quote(
    key: rsa.RSAPrivateKey, events: Sequence[MeasurementEvent]
) -> tuple[bytes, bytes, dict[tuple[int, str], bytes]]:
    """A software quote of PCR 23 in both banks at the value ``events`` replay to."""
    values = replay(events, ["sha1", "sha256"])
    attest, sig = make_quote(
        key,
        [(TPM2_ALG.SHA1, [23]), (TPM2_ALG.SHA256, [23])],
        [values["sha1"], values["sha256"]],
    )
    return attest, sig, {(23, "sha1"): values["sha1"], (23, "sha256"): values["sha256"]}


def test_a_launch_event_is_bound_to_its_launch(
    soft_key: rsa.RSAPrivateKey, soft_ak: ParsedPublic
) -> None:
    # The verifier replays a log of file events on a fast path of its own; a log with a launch
    # event must still have every launch digest recomputed from the launch it reports.
    launch = Launch.create(
        argv=("/usr/bin/python3", "run.py"),
        executable_sha256=hashlib.sha256(b"python").digest(),
        env={"LANG": "C"},
        cwd="/srv",
    )
    file_event = MeasurementEvent(
        path="run.py",
        size=3,
        digests={"sha1": hashlib.sha1(b"run").digest(), "sha256": hashlib.sha256(b"run").digest()},  # noqa: S324
    )
    events = (file_event, launch_event(launch, ["sha1", "sha256"]))
    attest, sig, values = _log_quote(soft_key, events)

    def verify(log: Sequence[MeasurementEvent]) -> quote.VerifiedQuote:
        return quote.verify_quote(
            ak=soft_ak,
            attest=attest,
            signature=sig,
            pcr_values=values,
            expected_qualifying_data=NONCE,
            event_log=log,
        )

    assert verify(events).event_log_banks == ("sha1", "sha256")
    # The approved launch's digests, reported with another command: the digests replay to the
    # quoted PCR, but they are not this launch's.
    forged = replace(events[1], launch=replace(launch, argv=("/usr/bin/python3", "-c", "steal()")))
    with pytest.raises(EventLogReplayError, match="not its launch's"):
        verify((file_event, forged))


def test_a_digest_of_the_wrong_size_is_malformed(
    soft_key: rsa.RSAPrivateKey, soft_ak: ParsedPublic
) -> None:
    good = MeasurementEvent(
        path="a", size=1, digests={"sha1": b"\x01" * 20, "sha256": b"\x02" * 32}
    )
    attest, sig, values = _log_quote(soft_key, (good,))
    for bank, short in (("sha256", b"\x02" * 31), ("sha1", b"\x01" * 19)):
        bad = replace(good, digests={**good.digests, bank: short})
        with pytest.raises(EventLogReplayError, match=f"malformed {bank} digest"):
            quote.verify_quote(
                ak=soft_ak,
                attest=attest,
                signature=sig,
                pcr_values=values,
                expected_qualifying_data=NONCE,
                event_log=(good, bad),
            )


def test_the_file_replay_is_evidence_pcrs_replay() -> None:
    # The verifier's own replay of file events against evidence.pcr.replay, on seeded random
    # logs of every length up to 40 and every set of banks.
    import random

    rng = random.Random(16)
    for n in (*range(41), 64, 65, 100):
        events = tuple(
            MeasurementEvent(
                path=f"f{i}",
                size=1,
                digests={
                    b: rng.randbytes(s) for b, s in (("sha1", 20), ("sha256", 32), ("sha384", 48))
                },
            )
            for i in range(n)
        )
        for banks in (
            ("sha1",),
            ("sha256",),
            ("sha384",),
            ("sha1", "sha256"),
            ("sha256", "sha384"),
        ):
            expected = replay(events, banks)
            assert quote._replay_files(events, banks) == tuple(expected[b] for b in banks)
            assert quote._replay_digests(
                banks, tuple(e.digests[b] for e in events for b in banks)
            ) == tuple(expected[b] for b in banks)


def test_a_remembered_replay_serves_only_the_same_log(rsa_valid: QuoteVector) -> None:
    # The replay of a log is remembered, keyed by its banks and every digest: the same log is
    # not replayed again, and a log that differs in one bit of one digest is, and is refused.
    log = rsa_valid.event_log
    assert log is not None
    _verify(rsa_valid)
    hits = quote._replay_remembered.cache_info().hits
    _verify(rsa_valid)
    assert quote._replay_remembered.cache_info().hits == hits + 1
    for n, event in enumerate(log):
        for bank, digest in event.digests.items():
            changed = replace(event, digests={**event.digests, bank: flip_last_bit(digest)})
            with pytest.raises(EventLogReplayError, match="replays to"):
                _verify(rsa_valid, event_log=(*log[:n], changed, *log[n + 1 :]))
            short = replace(event, digests={**event.digests, bank: digest[:-1]})
            with pytest.raises(EventLogReplayError, match="malformed"):
                _verify(rsa_valid, event_log=(*log[:n], short, *log[n + 1 :]))
    # Events swapped: the same digests in another order replay to another value.
    with pytest.raises(EventLogReplayError, match="replays to"):
        _verify(rsa_valid, event_log=(log[1], log[0], *log[2:]))
    # A digest given as a bytearray (outside the declared type, but an untyped caller may; it
    # cannot be a dictionary key) is replayed all the same.
    as_bytearray = tuple(
        replace(e, digests={b: bytearray(d) for b, d in e.digests.items()})  # type: ignore[misc]
        for e in log
    )
    assert _verify(rsa_valid, event_log=as_bytearray).event_log_banks == ("sha1", "sha256")

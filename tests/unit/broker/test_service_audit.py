"""What the broker's core writes to the audit log, and who can read it.

A real :class:`~broker.core.Broker` over SQLite in ``tmp_path`` runs real attestations: a
software AK (``bench._loadgen.SoftAk``, enrolled as a TPM2B_PUBLIC with tpm2_createak's
attributes) signs TPM2_Quote structures built with tpm2-pytss over a real measurement of files,
and the broker runs every one of its checks on them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from broker import release
from broker.app import open_broker
from broker.config import BrokerConfig
from broker.core import Broker, Evidence
from broker.custody import LocalKek
from broker.errors import (
    AttestationRefusedError,
    DuplicateError,
    PolicyError,
    RevokedKeyError,
    StorageError,
    UnknownKeyError,
    UnknownPolicyObjectError,
)
from broker.keyseal import seal_for_registration
from broker.model import AuditRecord, DenialCode, GoldenPcrSet, Party, PcrKey
from broker.storage.schema import audit_head
from broker.tpmkeys import ak_qualified_name, load_public
from evidence.binding import qualifying_data
from evidence.manifest import ManifestEntry
from evidence.pcr import Measurement, MeasurementEvent
from pki.identity import SpiffeId
from sealing.errors import InvalidKeyError
from sealing.keys import KEM_X25519, generate_recipient_key
from tests.harness.launch import TEST_LAUNCH, measure_workload
from tests.support.softtpm import QUOTED_BANKS, QuoteMaker, SoftAk
from tests.vectors.evidence import key_vectors

KEY_VECTORS = {v.name: v for v in key_vectors()}
TD = "cleanroom.local"
OPERATOR = SpiffeId.operator(TD)
ADVERTISER = SpiffeId.party(TD, "advertiser")
PUBLISHER = SpiffeId.party(TD, "publisher")
SIDECAR = SpiffeId.sidecar(TD, "sidecar-1")
#: The sidecar's TLS certificate as the binding hashes it (any bytes do: only its hash counts).
CERT_DER = b"the sidecar's certificate"
WORKLOAD = [("model/train.py", b"print('join and train')\n"), ("bin/run.sh", b"#!/bin/sh\n")]
OTHER_WORKLOAD = [("model/train.py", b"print('something else')\n")]


@dataclass
class Room:
    broker: Broker
    ak: SoftAk
    maker: QuoteMaker
    measured: Measurement
    tmp: Path

    def records(self, party: str | None = None) -> list[AuditRecord]:
        return self.broker.audit.list_records(limit=1000, party=party)

    def evidence(
        self,
        key_ids: Sequence[str],
        *,
        nonce: bytes | None = None,
        maker: QuoteMaker | None = None,
        events: tuple[MeasurementEvent, ...] | None = None,
    ) -> Evidence:
        """A quote of the measured workload over a fresh challenge (or ``nonce``), by the
        room's AK (or ``maker``'s), with the measured event log (or ``events``)."""
        maker = maker or self.maker
        if nonce is None:
            nonce = self.broker.challenge(SIDECAR, maker.ak.name_hex).nonce
        ephemeral = generate_recipient_key().public_key()
        binding = qualifying_data(
            nonce=nonce,
            kem=ephemeral.kem,
            ephemeral_public_key=ephemeral.raw,
            tls_certificate_der=CERT_DER,
        )
        attest, signature = maker.quote(binding)
        return Evidence(
            ak_name=maker.ak.name_hex,
            nonce=nonce,
            attest=attest,
            signature=signature,
            pcr_values={(23, bank): self.measured.pcrs[bank] for bank in QUOTED_BANKS},
            event_log=self.measured.events if events is None else events,
            ephemeral_key=ephemeral,
            key_ids=tuple(key_ids),
            peer_certificate_der=CERT_DER,
        )

    def approve(
        self, who: SpiffeId, key_id: str, files: Sequence[tuple[str, bytes]], golden: str = ""
    ) -> str:
        manifest = [
            ManifestEntry(path=e.path, size=e.size, digests=dict(e.digests))
            for e in measure_workload(self.tmp / who.name, files).events
            if e.launch is None
        ]
        approval = self.broker.approve_workload(
            who,
            workload_name=f"{who.name}-workload",
            manifest=manifest,
            key_ids=[key_id],
            output_recipients=[who.name],
            golden_set=golden or None,
            launch=TEST_LAUNCH,
        )
        return approval.approval_id


@pytest.fixture
def room(tmp_path: Path) -> Iterator[Room]:
    config = BrokerConfig(
        database_url=f"sqlite:///{tmp_path / 'broker.db'}", state_dir=str(tmp_path / "state")
    )
    with open_broker(config) as broker:
        ak = SoftAk.generate("ecc")
        broker.enroll_ak(OPERATOR, ak_public=ak.tpm2b_public, ek_id=None)
        for who in (ADVERTISER, PUBLISHER):
            public = generate_recipient_key().public_key().raw
            broker.add_party(OPERATOR, Party(name=who.name, kem=KEM_X25519, public_key=public))
            key_id = f"{who.name}-data"
            sealed = seal_for_registration(
                broker.registration_key.public_key(), b"\x42" * 32, key_id=key_id, owner=who.name
            )
            broker.register_data_key(who, key_id=key_id, sealed_data_key=sealed, description="")
        measured = measure_workload(tmp_path / "sidecar", WORKLOAD)
        yield Room(broker, ak, QuoteMaker(ak, measured.pcrs), measured, tmp_path)


def _last(records: Sequence[AuditRecord], action: str) -> AuditRecord:
    return [r for r in records if r.action == action][-1]


def _text(records: Sequence[AuditRecord]) -> str:
    """Everything a reader of these records sees, as one string."""
    return "\n".join(
        f"{r.actor} {r.action} {r.subject} {r.decision} {r.reason} {r.evidence_digest} "
        f"{' '.join(r.parties)}"
        for r in records
    )


# --- challenges -----------------------------------------------------------------------------


def test_an_issued_challenge_is_audited_with_the_nonces_digest_only(room: Room) -> None:
    before = len(room.records())
    challenge = room.broker.challenge(SIDECAR, room.ak.name_hex)
    (record,) = room.records()[before:]
    assert (record.actor, record.action, record.subject, record.decision) == (
        str(SIDECAR),
        "challenge",
        room.ak.name_hex,
        "allow",
    )
    assert record.evidence_digest == hashlib.sha256(challenge.nonce).hexdigest()
    assert record.parties == ()
    assert challenge.nonce.hex() not in _text([record])
    assert room.broker.audit.verify_chain().valid


def test_a_challenge_whose_record_cannot_be_written_issues_no_nonce(room: Room) -> None:
    # The nonce and its record share one transaction: when the append fails (here the chain
    # head row is gone), the nonce is not stored either, so no unaudited nonce can be used.
    with room.broker.store.transaction("break the chain head", write=True) as conn:
        conn.execute(sa.delete(audit_head))
    with pytest.raises(StorageError, match="head row is missing"):
        room.broker.challenge(SIDECAR, room.ak.name_hex)
    assert room.broker.nonces.count_outstanding() == 0


def test_a_revoked_aks_next_challenge_and_attestation_are_refused_and_audited(room: Room) -> None:
    room.approve(ADVERTISER, "advertiser-data", WORKLOAD)
    pending = room.evidence(["advertiser-data"])  # its nonce was issued before the revocation
    room.broker.revoke_ak(OPERATOR, room.ak.name_hex, "machine retired")

    with pytest.raises(RevokedKeyError, match=r"is revoked$"):
        room.broker.challenge(SIDECAR, room.ak.name_hex)
    refused = _last(room.records(), "challenge")
    assert (refused.decision, refused.subject) == ("deny", room.ak.name_hex)
    assert refused.reason == f"AK {room.ak.name_hex} is revoked: machine retired"

    with pytest.raises(AttestationRefusedError) as denied:
        room.broker.attest(SIDECAR, pending)
    assert isinstance(denied.value.__cause__, RevokedKeyError)
    verdict = _last(room.records(), "attest")
    assert verdict.decision == "deny"
    assert verdict.reason == f"AK {room.ak.name_hex} is revoked: machine retired"
    assert not [r for r in room.records() if r.action == "key.release"]


# --- attestation verdicts: each party reads only its own keys --------------------------------


def test_a_stale_golden_set_denial_is_audited_with_its_reason(room: Room) -> None:
    stale = b"\x01" * 32  # the PCR value of an image that no longer runs
    room.broker.set_golden_set(
        OPERATOR,
        GoldenPcrSet(
            name="image-v1",
            accepted={PcrKey(23, "sha256"): frozenset({stale})},
            updated_at=datetime.now(UTC),
        ),
    )
    approval = room.approve(ADVERTISER, "advertiser-data", WORKLOAD, golden="image-v1")
    with pytest.raises(AttestationRefusedError):
        room.broker.attest(SIDECAR, room.evidence(["advertiser-data"]))
    why = (
        f"golden set 'image-v1': PCR 23 (sha256) value {room.measured.pcrs['sha256'].hex()} "
        f"is not accepted (approval {approval} by advertiser)"
    )
    withheld = _last(room.records(party="advertiser"), "key.release")
    assert (withheld.subject, withheld.decision, withheld.reason) == (
        "advertiser-data",
        "deny",
        why,
    )
    verdict = _last(room.records(), "attest")
    assert (verdict.decision, verdict.reason) == (
        "deny",
        f"no key released: advertiser-data: {why}",
    )


def test_a_full_denial_shows_each_party_only_its_own_keys(room: Room) -> None:
    room.approve(ADVERTISER, "advertiser-data", OTHER_WORKLOAD)
    room.approve(PUBLISHER, "publisher-data", OTHER_WORKLOAD)
    with pytest.raises(AttestationRefusedError) as denied:
        room.broker.attest(SIDECAR, room.evidence(["advertiser-data", "publisher-data"]))
    assert denied.value.__cause__ is None  # "not approved", for the metrics

    # The operator's verdict holds every key's reason...
    verdict = _last(room.records(), "attest")
    assert verdict.parties == ()
    assert "advertiser-data: not approved by advertiser" in verdict.reason
    assert "publisher-data: not approved by publisher" in verdict.reason
    # ...and each party reads why its own key was withheld, and nothing of the other's.
    for me, other in (("advertiser", "publisher"), ("publisher", "advertiser")):
        mine = room.records(party=me)
        withheld = [r for r in mine if r.action == "key.release"]
        assert [(r.subject, r.decision, r.parties) for r in withheld] == [
            (f"{me}-data", "deny", (me,))
        ]
        assert withheld[0].reason.startswith(f"not approved by {me}:")
        assert other not in _text(mine)
    assert room.broker.audit.verify_chain().valid


def test_a_partial_release_shows_each_party_only_its_own_keys(room: Room) -> None:
    room.approve(ADVERTISER, "advertiser-data", WORKLOAD)
    room.approve(PUBLISHER, "publisher-data", OTHER_WORKLOAD)
    evidence = room.evidence(["advertiser-data", "publisher-data"])
    before = room.broker.audit.head()[0]
    outcome = room.broker.attest(SIDECAR, evidence)
    assert [r.key_id for r in outcome.released] == ["advertiser-data"]
    # One transaction: the verdict and both keys' records follow each other in the chain.
    written = room.broker.audit.list_records(after_sequence=before, limit=10)
    assert [(r.action, r.subject, r.decision) for r in written] == [
        ("key.release", "advertiser-data", "allow"),
        ("key.release", "publisher-data", "deny"),
        ("attest", room.ak.name_hex, "allow"),
    ]
    assert written[-1].parties == () and "withheld 1" in written[-1].reason
    for me, other in (("advertiser", "publisher"), ("publisher", "advertiser")):
        mine = [r for r in room.records(party=me) if r.sequence > before]
        assert [r.subject for r in mine] == [f"{me}-data"]
        assert other not in _text(mine)


def test_a_kek_failure_shows_its_reason_only_to_the_keys_owner(room: Room) -> None:
    room.approve(ADVERTISER, "advertiser-data", WORKLOAD)
    room.approve(PUBLISHER, "publisher-data", WORKLOAD)
    evidence = room.evidence(["advertiser-data", "publisher-data"])
    # A closed KEK refuses to unwrap: the first granted key (the advertiser's) fails.
    kek = room.broker.keks.get("local")
    assert isinstance(kek, LocalKek)
    kek.close()
    with pytest.raises(AttestationRefusedError, match=r"^key custody failed: "):
        room.broker.attest(SIDECAR, evidence)
    verdict = room.records()[-1]
    assert (verdict.action, verdict.decision, verdict.parties) == (
        "attest",
        "deny",
        ("advertiser",),
    )
    assert verdict.reason.startswith("key custody failed: ")
    (theirs,) = [r for r in room.records(party="publisher") if r.action == "attest"]
    assert theirs.reason == "no key released: key custody failed for another party's key"
    assert "advertiser" not in _text([theirs])


# --- what a refused sidecar learns: a coarse code and the audit records -----------------------


def test_a_denial_carries_its_code_and_the_records_that_hold_the_reasons(room: Room) -> None:
    # The workload is approved, but the golden set does not accept the machine.
    room.broker.set_golden_set(
        OPERATOR,
        GoldenPcrSet(
            name="image-v1",
            accepted={PcrKey(23, "sha256"): frozenset({b"\x01" * 32})},
            updated_at=datetime.now(UTC),
        ),
    )
    room.approve(ADVERTISER, "advertiser-data", WORKLOAD, golden="image-v1")
    with pytest.raises(AttestationRefusedError) as denied:
        room.broker.attest(SIDECAR, room.evidence(["advertiser-data"]))
    verdict = _last(room.records(), "attest")
    withheld = _last(room.records(), "key.release")
    assert denied.value.code is DenialCode.PLATFORM_NOT_ACCEPTED
    assert denied.value.audit_record == verdict.sequence
    assert [(w.key_id, w.code, w.audit_record) for w in denied.value.withheld] == [
        ("advertiser-data", DenialCode.PLATFORM_NOT_ACCEPTED, withheld.sequence)
    ]
    assert withheld.reason == denied.value.withheld[0].reason

    # Keys withheld for different reasons: the verdict says so, each key its own.
    room.approve(PUBLISHER, "publisher-data", OTHER_WORKLOAD)
    with pytest.raises(AttestationRefusedError) as denied:
        room.broker.attest(SIDECAR, room.evidence(["advertiser-data", "publisher-data"]))
    assert denied.value.code is DenialCode.KEYS_WITHHELD
    assert [(w.key_id, w.code) for w in denied.value.withheld] == [
        ("advertiser-data", DenialCode.PLATFORM_NOT_ACCEPTED),
        ("publisher-data", DenialCode.NOT_APPROVED),
    ]
    records = {r.sequence: r for r in room.records()}
    for w in denied.value.withheld:
        assert (records[w.audit_record].action, records[w.audit_record].subject) == (
            "key.release",
            w.key_id,
        )

    # A spent nonce: its own class, with its record.
    evidence = room.evidence(["publisher-data"])
    with pytest.raises(AttestationRefusedError):
        room.broker.attest(SIDECAR, evidence)
    with pytest.raises(AttestationRefusedError) as denied:
        room.broker.attest(SIDECAR, evidence)
    assert denied.value.code is DenialCode.NONCE_INVALID
    assert denied.value.audit_record == room.records()[-1].sequence


def test_a_partial_release_tells_each_withheld_keys_code_and_record(room: Room) -> None:
    room.approve(ADVERTISER, "advertiser-data", WORKLOAD)
    room.approve(PUBLISHER, "publisher-data", OTHER_WORKLOAD)
    outcome = room.broker.attest(SIDECAR, room.evidence(["advertiser-data", "publisher-data"]))
    withheld = _last(room.records(), "key.release")
    assert [(w.key_id, w.code, w.audit_record) for w in outcome.denied] == [
        ("publisher-data", DenialCode.NOT_APPROVED, withheld.sequence)
    ]
    assert withheld.subject == "publisher-data" and withheld.decision == "deny"


def test_a_key_whose_approval_demands_sev_snp_is_withheld_as_platform_not_accepted(
    room: Room,
) -> None:
    # The workload is approved, but only for a machine that proves the AMD SEV-SNP hardware
    # root, which this one did not: the sidecar is told the machine was not accepted (with the
    # record that says why), not that nothing was approved.
    room.broker.approve_workload(
        ADVERTISER,
        workload_name="advertiser-workload",
        manifest=[
            ManifestEntry(path=e.path, size=e.size, digests=dict(e.digests))
            for e in room.measured.events
            if e.launch is None
        ],
        key_ids=["advertiser-data"],
        output_recipients=["advertiser"],
        golden_set=None,
        require_snp=True,
        launch=TEST_LAUNCH,
    )
    with pytest.raises(AttestationRefusedError) as denied:
        room.broker.attest(SIDECAR, room.evidence(["advertiser-data"]))
    assert denied.value.code is DenialCode.PLATFORM_NOT_ACCEPTED
    (withheld,) = denied.value.withheld
    records = {r.sequence: r for r in room.records()}
    assert (withheld.key_id, withheld.code) == ("advertiser-data", DenialCode.PLATFORM_NOT_ACCEPTED)
    # The record the sidecar is pointed to is the one that says why.
    assert records[withheld.audit_record].subject == "advertiser-data"
    assert "requires AMD SEV-SNP evidence" in records[withheld.audit_record].reason
    assert records[denied.value.audit_record].action == "attest"
    snp = [
        r
        for r in records.values()
        if r.action == "key.release" and "requires AMD SEV-SNP evidence" in r.reason
    ]
    assert [r.subject for r in snp] == ["advertiser-data"]


def test_an_event_log_that_misstates_a_size_releases_nothing(room: Room) -> None:
    # Sizes are not extended into PCR 23: this log still replays to the quote.
    room.approve(ADVERTISER, "advertiser-data", WORKLOAD)
    first, *rest = room.measured.events
    larger = (replace(first, size=first.size + 100), *rest)
    with pytest.raises(AttestationRefusedError) as denied:
        room.broker.attest(SIDECAR, room.evidence(["advertiser-data"], events=larger))
    assert denied.value.code is DenialCode.NOT_APPROVED
    withheld = _last(room.records(party="advertiser"), "key.release")
    assert (
        f"file 0 ('model/train.py'): the event log says {first.size + 100} bytes, the approved "
        f"file with these digests is {first.size} bytes"
    ) in withheld.reason
    # Size 0 for data whose digests are not those of empty data: the evidence itself is false.
    empty = (replace(first, size=0), *rest)
    with pytest.raises(AttestationRefusedError) as denied:
        room.broker.attest(SIDECAR, room.evidence(["advertiser-data"], events=empty))
    assert denied.value.code is DenialCode.EVIDENCE_INVALID
    assert "EventLogReplayError" in _last(room.records(), "attest").reason
    # The true sizes release the key.
    assert room.broker.attest(SIDECAR, room.evidence(["advertiser-data"])).released


def test_a_quote_must_name_the_ak_under_its_ek_as_signer(room: Room) -> None:
    # An AK bound to an EK is the EK's child: a TPM names it by its qualified name under the
    # EK. A quote that names anything else (here the AK's bare name) was not made by the
    # enrolled object.
    ek_public = next(k.public for k in key_vectors() if k.name == "key-rsa-createek")
    ek = room.broker.enroll_ek(
        OPERATOR, ek_public=ek_public, certificate=None, allow_without_certificate=True
    )
    ak = SoftAk.generate("rsa")
    room.broker.enroll_ak(OPERATOR, ak_public=ak.tpm2b_public, ek_id=ek.ek_id)
    room.approve(ADVERTISER, "advertiser-data", WORKLOAD)
    bare = QuoteMaker(ak, room.measured.pcrs)
    with pytest.raises(AttestationRefusedError) as denied:
        room.broker.attest(SIDECAR, room.evidence(["advertiser-data"], maker=bare))
    assert denied.value.code is DenialCode.EVIDENCE_INVALID
    assert "QualifiedSignerError" in _last(room.records(), "attest").reason
    qualified = ak_qualified_name(load_public(ak.tpm2b_public), load_public(ek_public))
    assert qualified is not None
    child = QuoteMaker(ak, room.measured.pcrs, signer=qualified)
    assert room.broker.attest(SIDECAR, room.evidence(["advertiser-data"], maker=child)).released


# --- refused administration -------------------------------------------------------------------


def test_revoking_another_partys_approval_is_audited_for_both_without_leaking(
    room: Room,
) -> None:
    approval = room.approve(ADVERTISER, "advertiser-data", WORKLOAD)
    with pytest.raises(PolicyError, match=r"^approval belongs to another party$"):
        room.broker.revoke_approval(PUBLISHER, approval)
    assert not room.broker.store.get_approval(approval).revoked

    caller = [r for r in room.records(party="publisher") if r.action == "workload.revoke"]
    assert [(r.actor, r.subject, r.decision, r.reason, r.parties) for r in caller] == [
        (str(PUBLISHER), approval, "deny", "approval belongs to another party", ("publisher",))
    ]
    assert "advertiser" not in _text(room.records(party="publisher"))
    owner = [r for r in room.records(party="advertiser") if r.action == "workload.revoke"]
    assert [(r.actor, r.decision, r.parties) for r in owner] == [
        (str(PUBLISHER), "deny", ("advertiser",))
    ]

    with pytest.raises(UnknownPolicyObjectError) as unknown:
        room.broker.revoke_approval(PUBLISHER, "no-such-approval")
    last = _last(room.records(party="publisher"), "workload.revoke")
    assert (last.subject, last.decision, last.reason) == (
        "no-such-approval",
        "deny",
        str(unknown.value),
    )


def _refusal(room: Room, action: str) -> AuditRecord:
    last = room.records()[-1]
    assert (last.action, last.actor, last.decision) == (action, str(OPERATOR), "deny")
    return last


def test_an_invalid_golden_set_is_refused_and_audited(room: Room) -> None:
    bad = GoldenPcrSet(
        name="image-v1",
        accepted={PcrKey(0, "sha256"): frozenset({b"\x01" * 20})},
        updated_at=datetime.now(UTC),
    )
    with pytest.raises(PolicyError) as refused:
        room.broker.set_golden_set(OPERATOR, bad)
    record = _refusal(room, "golden.set")
    assert (record.subject, record.reason) == ("image-v1", str(refused.value))
    assert "must be 32 bytes, got 20" in record.reason
    assert room.broker.list_golden_sets() == []

    with pytest.raises(UnknownPolicyObjectError) as unknown:
        room.broker.delete_golden_set(OPERATOR, "image-v9")
    record = _refusal(room, "golden.delete")
    assert (record.subject, record.reason) == ("image-v9", str(unknown.value))


@pytest.mark.parametrize("kind", ["ak", "ek"])
def test_revoking_an_unknown_key_is_refused_and_audited(room: Room, kind: str) -> None:
    name = "ab" * 34
    with pytest.raises(UnknownKeyError) as unknown:
        getattr(room.broker, f"revoke_{kind}")(OPERATOR, name, "lost")
    record = _refusal(room, f"{kind}.revoke")
    assert (record.subject, record.reason) == (name, str(unknown.value))


def test_adding_a_party_with_a_bad_key_is_refused_and_audited(room: Room) -> None:
    bad = Party(name="retailer", kem=KEM_X25519, public_key=b"\x01" * 31)
    with pytest.raises(InvalidKeyError) as refused:
        room.broker.add_party(OPERATOR, bad)
    record = _refusal(room, "party.add")
    assert (record.subject, record.reason, record.parties) == (
        "retailer",
        str(refused.value),
        (),
    )
    assert "31" in record.reason
    assert "retailer" not in {p.name for p in room.broker.list_parties()}

    again = Party(name="advertiser", kem=KEM_X25519, public_key=b"\x01" * 32)
    with pytest.raises(DuplicateError):
        room.broker.add_party(OPERATOR, again)
    assert _refusal(room, "party.add").reason == "party 'advertiser' exists"


# --- one unit of work per decision -----------------------------------------------------------


def test_a_change_whose_record_cannot_be_written_is_not_stored(room: Room) -> None:
    # An enrollment, a registration and an approval each commit with their record or not at
    # all: with the chain head row gone no record can be written, so nothing is stored.
    with room.broker.store.transaction("break the chain head", write=True) as conn:
        conn.execute(sa.delete(audit_head))
    ak = SoftAk.generate("ecc")
    with pytest.raises(StorageError, match="head row is missing"):
        room.broker.enroll_ak(OPERATOR, ak_public=ak.tpm2b_public, ek_id=None)
    assert ak.name_hex not in {a.ak_name for a in room.broker.list_aks()}
    sealed = seal_for_registration(
        room.broker.registration_key.public_key(), b"\x17" * 32, key_id="k2", owner="advertiser"
    )
    with pytest.raises(StorageError, match="head row is missing"):
        room.broker.register_data_key(
            ADVERTISER, key_id="k2", sealed_data_key=sealed, description=""
        )
    assert "k2" not in {k.key_id for k in room.broker.list_data_keys(OPERATOR)}
    with pytest.raises(StorageError, match="head row is missing"):
        room.approve(ADVERTISER, "advertiser-data", WORKLOAD)
    assert room.broker.list_approvals(OPERATOR) == []


def test_a_release_re_checks_its_approvals_in_its_transaction(
    room: Room, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The approval is revoked after policy granted the key and before the release commits
    # (as a concurrent RevokeApproval would): the key is withheld, and the chain never shows a
    # release citing the approval after its revocation record.
    approval = room.approve(ADVERTISER, "advertiser-data", WORKLOAD)
    evidence = room.evidence(["advertiser-data"])
    real_seal = release.seal_records

    def revoke_then_seal(*args: Any, **kwargs: Any) -> Any:
        room.broker.revoke_approval(ADVERTISER, approval)
        return real_seal(*args, **kwargs)

    monkeypatch.setattr(release, "seal_records", revoke_then_seal)
    with pytest.raises(AttestationRefusedError, match="revoked meanwhile"):
        room.broker.attest(SIDECAR, evidence)
    records = room.records()
    revoked_at = next(r.sequence for r in records if r.action == "workload.revoke")
    assert not [r for r in records if r.action == "key.release" and r.decision == "allow"], (
        "a key was released on a revoked approval"
    )
    withheld = _last(records, "key.release")
    assert withheld.sequence > revoked_at and withheld.decision == "deny"
    assert f"approval {approval} was revoked during the attestation" == withheld.reason
    # The nonce was burned with the denial: the same evidence cannot be replayed.
    monkeypatch.setattr(release, "seal_records", real_seal)
    with pytest.raises(AttestationRefusedError, match="nonce refused"):
        room.broker.attest(SIDECAR, evidence)


def test_a_record_names_each_party_once(room: Room) -> None:
    # The advertiser approves with itself as the output recipient: it is named once.
    approval = room.approve(ADVERTISER, "advertiser-data", WORKLOAD)
    record = next(r for r in room.records() if r.subject == approval)
    assert record.parties == ("advertiser",)
    assert room.broker.audit.verify_chain().valid


# --- revocation that keeps a TPM out, and re-admission -----------------------------------------


def _tpm(room: Room) -> tuple[str, SoftAk, SoftAk]:
    """An EK (tpm2_createek's RSA EK) with two AKs under it; its id and the AKs."""
    public = KEY_VECTORS["key-rsa-createek"].public
    ek = room.broker.enroll_ek(
        OPERATOR, ek_public=public, certificate=None, allow_without_certificate=True
    )
    aks = SoftAk.generate("ecc"), SoftAk.generate("ecc")
    for ak in aks:
        room.broker.enroll_ak(OPERATOR, ak_public=ak.tpm2b_public, ek_id=ek.ek_id)
    return ek.ek_id, aks[0], aks[1]


def _break_chain_head(room: Room) -> None:
    with room.broker.store.transaction("break the chain head", write=True) as conn:
        conn.execute(sa.delete(audit_head))


def test_an_ak_revocation_keeps_its_ek_out_with_its_record_or_not_at_all(room: Room) -> None:
    ek_id, first, second = _tpm(room)
    with room.broker.store.transaction("read the head") as conn:
        saved = conn.execute(sa.select(audit_head)).one()
    _break_chain_head(room)
    with pytest.raises(StorageError, match="head row is missing"):
        room.broker.revoke_ak(OPERATOR, first.name_hex, "leaked")
    assert not room.broker.store.get_ak(first.name_hex).revoked
    assert not room.broker.store.get_ek(ek_id).revoked
    with room.broker.store.transaction("restore the chain head", write=True) as conn:
        conn.execute(sa.insert(audit_head).values(**saved._mapping))

    room.broker.revoke_ak(OPERATOR, first.name_hex, "leaked")
    record = _last(room.records(), "ak.revoke")
    assert record.reason == f"leaked (EK {ek_id} kept out until re-admitted)"
    # The TPM's other AK gets no challenge now: its EK is out.
    with pytest.raises(RevokedKeyError, match=f"EK {ek_id} is revoked"):
        room.broker.challenge(SIDECAR, second.name_hex)
    assert _last(room.records(), "challenge").reason == (
        f"EK {ek_id} is revoked: AK {first.name_hex} revoked: leaked"
    )

    # A re-admission whose record cannot be written leaves the EK out.
    _break_chain_head(room)
    with pytest.raises(StorageError, match="head row is missing"):
        room.broker.readmit_ek(OPERATOR, ek_id, "replaced")
    assert room.broker.store.get_ek(ek_id).revoked
    with room.broker.store.transaction("restore the chain head", write=True) as conn:
        conn.execute(sa.insert(audit_head).values(**saved._mapping))


def test_a_readmission_lets_the_tpm_back_and_is_audited(room: Room) -> None:
    ek_id, first, second = _tpm(room)
    room.broker.revoke_ek(OPERATOR, ek_id, "stolen")
    assert room.broker.readmit_ek(OPERATOR, ek_id, "found") is True
    record = _last(room.records(), "ek.readmit")
    assert (record.actor, record.subject, record.decision, record.reason) == (
        str(OPERATOR),
        ek_id,
        "allow",
        "found; lifted: stolen",
    )
    # Its AKs stay revoked (by the EK's revocation); a new AK enrolls.
    for ak in (first, second):
        with pytest.raises(RevokedKeyError, match=f"AK {ak.name_hex} is revoked"):
            room.broker.challenge(SIDECAR, ak.name_hex)
    third = SoftAk.generate("ecc")
    room.broker.enroll_ak(OPERATOR, ak_public=third.tpm2b_public, ek_id=ek_id)
    assert room.broker.challenge(SIDECAR, third.name_hex).nonce
    assert room.broker.readmit_ek(OPERATOR, ek_id, "") is False
    assert _last(room.records(), "ek.readmit").reason == "was not revoked"
    with pytest.raises(UnknownKeyError):
        room.broker.readmit_ek(OPERATOR, "00" * 32, "")
    assert _refusal(room, "ek.readmit").reason == f"EK {'00' * 32} is not enrolled"
    assert room.broker.audit.verify_chain().valid


def test_a_release_re_checks_the_aks_ek_in_its_transaction(
    room: Room, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another AK of the attesting AK's TPM is revoked after policy granted the key and before
    # the release commits: the TPM is out, so nothing is released.
    _, first, second = _tpm(room)
    # The AKs are the EK's children: their quotes name them by their qualified name under it.
    signer = ak_qualified_name(
        load_public(second.tpm2b_public), load_public(KEY_VECTORS["key-rsa-createek"].public)
    )
    room.ak, room.maker = second, QuoteMaker(second, room.measured.pcrs, signer=signer)
    room.approve(ADVERTISER, "advertiser-data", WORKLOAD)
    evidence = room.evidence(["advertiser-data"])
    real_seal = release.seal_records

    def revoke_then_seal(*args: Any, **kwargs: Any) -> Any:
        room.broker.revoke_ak(OPERATOR, first.name_hex, "leaked")
        return real_seal(*args, **kwargs)

    monkeypatch.setattr(release, "seal_records", revoke_then_seal)
    with pytest.raises(
        AttestationRefusedError, match="or its EK was revoked during the attestation"
    ):
        room.broker.attest(SIDECAR, evidence)
    assert not [r for r in room.records() if r.action == "key.release" and r.decision == "allow"]


def test_an_attestation_denial_is_logged_at_warning(
    room: Room, caplog: pytest.LogCaptureFixture
) -> None:
    # An operator watching WARNING and above (the CLI's default level) sees refused machines.
    room.broker.set_golden_set(
        OPERATOR,
        GoldenPcrSet(
            name="image-v1",
            accepted={PcrKey(23, "sha256"): frozenset({b"\x01" * 32})},
            updated_at=datetime.now(UTC),
        ),
    )
    room.approve(ADVERTISER, "advertiser-data", WORKLOAD, golden="image-v1")
    caplog.set_level(logging.WARNING, logger="cleanroom.broker")
    with pytest.raises(AttestationRefusedError):
        room.broker.attest(SIDECAR, room.evidence(["advertiser-data"]))
    denials = [r for r in caplog.records if r.getMessage().startswith("attestation denied")]
    assert denials and all(r.levelno == logging.WARNING for r in denials)

"""Release policy: grants, per-key denials with exact reasons, revoked attesters, golden sets."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from broker.errors import (
    AttesterRevokedError,
    NotApprovedError,
    PolicyError,
    RevokedKeyError,
    UncoveredPcrError,
    UnknownPolicyObjectError,
)
from broker.model import AkRecord, Approval, DataKeyRecord, EkRecord, GoldenPcrSet, Party, PcrKey
from broker.policy import (
    Decision,
    Denial,
    Grant,
    approval_pcr23,
    evaluate,
    launch_from_events,
    manifest_from_events,
    validate_approval,
    validate_golden_set,
)
from evidence.launch import Launch
from evidence.manifest import ManifestEntry, expected_pcr23
from evidence.pcr import MeasurementEvent, launch_event

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
BANKS = ("sha1", "sha256")
BOOT_VALUE = hashlib.sha256(b"firmware").digest()

NOT_APPROVED = (
    "not approved by {p}: no active approval by {p} for this key matches the measured workload"
)


def entry(path: str, content: bytes) -> ManifestEntry:
    return ManifestEntry(
        path=path,
        size=len(content),
        digests={bank: hashlib.new(bank, content).digest() for bank in BANKS},
    )


MANIFEST = (entry("bin/train.py", b"train code"), entry("conf/model.toml", b"depth = 3"))
OTHER_MANIFEST = (entry("bin/train.py", b"exfiltrate"), entry("conf/model.toml", b"depth = 3"))
PYTHON_SHA256 = hashlib.sha256(b"the image's python").digest()
LAUNCH = Launch.create(
    argv=("/usr/bin/python3", "bin/train.py", "--depth", "3"),
    executable_sha256=PYTHON_SHA256,
    env={"LANG": "C.UTF-8", "OMP_NUM_THREADS": "2"},
    cwd="/srv/workload",
)


def quoted_for(
    manifest: Sequence[ManifestEntry],
    *,
    boot: bytes = BOOT_VALUE,
    launch: Launch | None = LAUNCH,
) -> dict[tuple[int, str], bytes]:
    """The quoted PCRs of a machine that measured ``manifest`` then ``launch`` (and booted to
    ``boot``)."""
    pcrs = {(23, bank): value for bank, value in expected_pcr23(manifest, BANKS, launch).items()}
    pcrs[(0, "sha256")] = boot
    return pcrs


AK = AkRecord(
    ak_name="000b" + "aa" * 32,
    public=b"ak",
    ek_id="ek-1",
    enrolled_by="credential-activation",
    enrolled_at=NOW,
)
EK = EkRecord(ek_id="ek-1", public=b"ek", certificate=None, enrolled_at=NOW)

KEYS = {
    key.key_id: key
    for key in (
        DataKeyRecord("alice-k1", "alice", b"w", "local", NOW),
        DataKeyRecord("alice-k2", "alice", b"w", "local", NOW),
        DataKeyRecord("bob-k1", "bob", b"w", "local", NOW),
    )
}

GOLDEN = GoldenPcrSet(
    name="boot",
    accepted={PcrKey(0, "sha256"): frozenset({BOOT_VALUE})},
    updated_at=NOW,
)


def approval(
    approval_id: str,
    party: str,
    key_ids: Sequence[str],
    *,
    manifest: Sequence[ManifestEntry] = MANIFEST,
    recipients: Sequence[str] = (),
    golden_set: str | None = None,
    revoked: bool = False,
    created_at: datetime = NOW,
    workload_name: str = "trainer",
    launch: Launch | None = LAUNCH,
) -> Approval:
    return Approval(
        approval_id=approval_id,
        party=party,
        workload_name=workload_name,
        manifest=tuple(manifest),
        launch=launch,
        expected_pcrs=expected_pcr23(manifest, BANKS, launch),
        key_ids=tuple(key_ids),
        output_recipients=tuple(recipients),
        golden_set=golden_set,
        created_at=created_at,
        revoked=revoked,
    )


def decide(
    approvals: Sequence[Approval],
    *,
    requested: Sequence[str] = ("alice-k1", "bob-k1"),
    quoted: Mapping[tuple[int, str], bytes] | None = None,
    measured: Sequence[ManifestEntry] = MANIFEST,
    golden: Mapping[str, GoldenPcrSet] | None = None,
    ak: AkRecord = AK,
    ek: EkRecord | None = EK,
    launch: Launch | None = LAUNCH,
) -> Decision:
    if quoted is None:
        quoted = quoted_for(measured, launch=launch)
    return evaluate(
        ak=ak,
        ek=ek,
        quoted_pcrs=quoted,
        measured_manifest=measured,
        requested_key_ids=requested,
        keys=KEYS,
        approvals=approvals,
        golden_sets=golden if golden is not None else {"boot": GOLDEN},
        now=NOW,
        measured_launch=launch,
    )


def reasons(decision: Decision) -> dict[str, str]:
    return {d.key_id: d.reason for d in decision.denied}


# --- evaluate -------------------------------------------------------------------------------


def test_approved_workload_grants_every_key() -> None:
    decision = decide(
        [
            approval("a1", "alice", ["alice-k1"], recipients=["alice", "bob"], golden_set="boot"),
            approval("b1", "bob", ["bob-k1"], recipients=["carol", "bob"]),
        ]
    )
    assert decision.granted == (
        Grant("alice-k1", "alice", "a1"),
        Grant("bob-k1", "bob", "b1"),
    )
    assert decision.denied == ()
    assert decision.output_recipients == ("alice", "bob", "carol")
    assert decision.workload_name == "trainer"
    assert decision.evaluated_at == NOW
    assert decision.granted_key_ids == ("alice-k1", "bob-k1")


def test_unapproved_workload_is_denied_with_reason() -> None:
    decision = decide(
        [approval("a1", "alice", ["alice-k1"]), approval("b1", "bob", ["bob-k1"])],
        measured=OTHER_MANIFEST,
    )
    assert decision.granted == ()
    measured_pcr = expected_pcr23(OTHER_MANIFEST, BANKS, LAUNCH)["sha256"].hex()
    assert reasons(decision) == {
        "alice-k1": f"not approved by alice: measured PCR 23 (sha256 {measured_pcr}) "
        "matches no active approval by alice for this key",
        "bob-k1": f"not approved by bob: measured PCR 23 (sha256 {measured_pcr}) "
        "matches no active approval by bob for this key",
    }
    assert decision.output_recipients == ()
    assert decision.workload_name == ""


def test_one_party_approved_other_not_withholds_only_that_partys_keys() -> None:
    decision = decide(
        [approval("a1", "alice", ["alice-k1", "alice-k2"], recipients=["alice"])],
        requested=("alice-k1", "alice-k2", "bob-k1"),
    )
    assert decision.granted_key_ids == ("alice-k1", "alice-k2")
    assert decision.denied == (
        Denial(
            "bob-k1",
            NOT_APPROVED.format(p="bob"),
        ),
    )
    assert decision.output_recipients == ("alice",)


def test_approval_by_another_party_does_not_release_a_key() -> None:
    # Bob cannot approve Alice's key, even if a malformed approval names it.
    decision = decide([approval("b1", "bob", ["alice-k1", "bob-k1"])])
    assert decision.granted_key_ids == ("bob-k1",)
    assert reasons(decision) == {"alice-k1": NOT_APPROVED.format(p="alice")}


def test_revoked_ak_releases_nothing() -> None:
    revoked = replace(AK, revoked=True, revoked_reason="TPM replaced")
    with pytest.raises(AttesterRevokedError, match=r"AK .* is revoked: TPM replaced") as info:
        decide([approval("a1", "alice", ["alice-k1"])], ak=revoked)
    # Callers catch it either as the policy subtree or as the precise enrollment error.
    assert isinstance(info.value, PolicyError)
    assert isinstance(info.value, RevokedKeyError)


def test_revoked_ek_releases_nothing() -> None:
    revoked = replace(EK, revoked=True, revoked_reason="EK certificate revoked")
    with pytest.raises(AttesterRevokedError, match=r"EK ek-1 of AK .* is revoked"):
        decide([approval("a1", "alice", ["alice-k1"])], ek=revoked)


def test_ek_that_is_not_the_aks_is_refused() -> None:
    with pytest.raises(PolicyError, match="is not the EK of AK"):
        decide([approval("a1", "alice", ["alice-k1"])], ek=replace(EK, ek_id="ek-2"))
    with pytest.raises(PolicyError, match="not enrolled"):
        decide([approval("a1", "alice", ["alice-k1"])], ek=None)


def test_ak_enrolled_without_ek_can_attest() -> None:
    operator_ak = replace(AK, ek_id=None, enrolled_by="operator")
    decision = decide([approval("a1", "alice", ["alice-k1"])], ak=operator_ak, ek=None)
    assert decision.granted_key_ids == ("alice-k1",)


def test_revoked_approval_denies() -> None:
    decision = decide(
        [approval("a1", "alice", ["alice-k1"], revoked=True)], requested=("alice-k1",)
    )
    assert decision.granted == ()
    assert reasons(decision) == {
        "alice-k1": "not approved by alice: every approval by alice naming this key is revoked (a1)"
    }


def test_active_approval_grants_when_another_is_revoked() -> None:
    decision = decide(
        [
            approval("a-old", "alice", ["alice-k1"], revoked=True),
            approval("a-new", "alice", ["alice-k1"], created_at=NOW - timedelta(days=1)),
        ],
        requested=("alice-k1",),
    )
    assert decision.granted == (Grant("alice-k1", "alice", "a-new"),)


def test_stale_golden_set_denies_naming_the_pcr() -> None:
    # The machine's firmware changed; the golden set still accepts only the old value.
    new_boot = hashlib.sha256(b"firmware v2").digest()
    decision = decide(
        [approval("a1", "alice", ["alice-k1"], golden_set="boot")],
        requested=("alice-k1",),
        quoted=quoted_for(MANIFEST, boot=new_boot),
    )
    assert decision.granted == ()
    assert reasons(decision) == {
        "alice-k1": f"golden set 'boot': PCR 0 (sha256) value {new_boot.hex()} is not accepted "
        "(approval a1 by alice)"
    }
    # The approval matched the measurement, so the workload is still named for the audit log.
    assert decision.workload_name == "trainer"


def test_golden_set_accepts_any_of_several_values() -> None:
    new_boot = hashlib.sha256(b"firmware v2").digest()
    rolling = replace(GOLDEN, accepted={PcrKey(0, "sha256"): frozenset({BOOT_VALUE, new_boot})})
    for boot in (BOOT_VALUE, new_boot):
        decision = decide(
            [approval("a1", "alice", ["alice-k1"], golden_set="boot")],
            requested=("alice-k1",),
            quoted=quoted_for(MANIFEST, boot=boot),
            golden={"boot": rolling},
        )
        assert decision.granted_key_ids == ("alice-k1",)


def test_golden_pcr_not_quoted_denies() -> None:
    quoted = quoted_for(MANIFEST)
    del quoted[(0, "sha256")]
    decision = decide(
        [approval("a1", "alice", ["alice-k1"], golden_set="boot")],
        requested=("alice-k1",),
        quoted=quoted,
    )
    assert reasons(decision) == {
        "alice-k1": "golden set 'boot': PCR 0 (sha256) not quoted (approval a1 by alice)"
    }


def test_missing_golden_set_denies() -> None:
    decision = decide(
        [approval("a1", "alice", ["alice-k1"], golden_set="boot")],
        requested=("alice-k1",),
        golden={},
    )
    assert reasons(decision) == {"alice-k1": "golden set 'boot' missing (approval a1 by alice)"}


def test_manifest_mismatch_with_equal_pcr_denies() -> None:
    # Paths are not extended into PCR 23, so a renamed file gives the same PCR value.
    renamed = (entry("bin/other.py", b"train code"), MANIFEST[1])
    assert expected_pcr23(renamed, BANKS) == expected_pcr23(MANIFEST, BANKS)
    decision = decide([approval("a1", "alice", ["alice-k1"])], measured=renamed)
    assert decision.granted == ()
    assert reasons(decision)["alice-k1"] == (
        "approval a1 by alice: approved manifest differs from the measured event log "
        "(file 0: approved 'bin/train.py', measured 'bin/other.py')"
    )
    # Asked for "every approved key", the approval is not one for this measurement at all.
    everything = decide([approval("a1", "alice", ["alice-k1"])], measured=renamed, requested=())
    assert (everything.granted, everything.denied, everything.workload_name) == ((), (), "")


def test_approval_whose_pcr_does_not_follow_its_manifest_denies() -> None:
    # An approval with the right PCR 23 but another manifest (it cannot pass validation, but
    # a corrupted store must not turn into a release).
    forged = replace(
        approval("a1", "alice", ["alice-k1"], manifest=OTHER_MANIFEST),
        expected_pcrs=expected_pcr23(MANIFEST, BANKS, LAUNCH),
    )
    decision = decide([forged], requested=("alice-k1",))
    assert reasons(decision) == {
        "alice-k1": "approval a1 by alice: approved manifest differs from the measured event "
        "log (file 0 ('bin/train.py'): sha1 digest differs)"
    }


def test_a_false_size_for_approved_data_denies() -> None:
    # The event log's sizes are not extended into PCR 23, so a size that the event log states
    # for a file is compared with the size approved with the same digests.
    lying = (replace(MANIFEST[0], size=MANIFEST[0].size + 1), MANIFEST[1])
    assert expected_pcr23(lying, BANKS) == expected_pcr23(MANIFEST, BANKS)
    decision = decide([approval("a1", "alice", ["alice-k1"])], measured=lying)
    assert decision.granted == ()
    assert reasons(decision)["alice-k1"] == (
        "approval a1 by alice: approved manifest differs from the measured event log "
        "(file 0 ('bin/train.py'): the event log says 11 bytes, the approved file with these "
        "digests is 10 bytes)"
    )


def test_manifest_with_another_number_of_files_denies() -> None:
    longer = (*MANIFEST, entry("data/extra.bin", b"x"))
    forged = replace(
        approval("a1", "alice", ["alice-k1"], manifest=longer),
        expected_pcrs=expected_pcr23(MANIFEST, BANKS, LAUNCH),
    )
    decision = decide([forged], requested=("alice-k1",))
    assert "3 files approved, 2 measured" in reasons(decision)["alice-k1"]


def test_unknown_requested_key_is_denied_and_others_still_released() -> None:
    decision = decide(
        [approval("a1", "alice", ["alice-k1"])], requested=("nope", "alice-k1", "nope")
    )
    assert decision.granted_key_ids == ("alice-k1",)
    assert decision.denied == (Denial("nope", "unknown key"),)


def test_empty_request_means_every_key_approved_for_this_measurement() -> None:
    decision = decide(
        [
            approval("a1", "alice", ["alice-k2", "alice-k1"]),
            # Approves another workload: its key is not part of this release.
            approval("b1", "bob", ["bob-k1"], manifest=OTHER_MANIFEST),
        ],
        requested=(),
    )
    assert decision.granted_key_ids == ("alice-k1", "alice-k2")
    assert decision.denied == ()


def test_empty_request_reports_keys_withheld_by_golden_values() -> None:
    decision = decide(
        [approval("a1", "alice", ["alice-k1"], golden_set="boot")],
        requested=(),
        golden={},
    )
    assert decision.granted == ()
    assert [d.key_id for d in decision.denied] == ["alice-k1"]


def test_sha1_bank_is_compared_when_quoted() -> None:
    a1 = approval("a1", "alice", ["alice-k1"])
    wrong_sha1 = replace(a1, expected_pcrs={**a1.expected_pcrs, "sha1": bytes(20)})
    assert decide([wrong_sha1], requested=("alice-k1",)).granted == ()
    # A bank the quote does not cover is not compared (sha256 always is).
    quoted = quoted_for(MANIFEST)
    del quoted[(23, "sha1")]
    granted = decide([wrong_sha1], requested=("alice-k1",), quoted=quoted)
    assert granted.granted_key_ids == ("alice-k1",)


def test_quote_without_sha256_pcr23_denies() -> None:
    quoted = quoted_for(MANIFEST)
    del quoted[(23, "sha256")]
    decision = decide(
        [approval("a1", "alice", ["alice-k1"])], requested=("alice-k1",), quoted=quoted
    )
    assert reasons(decision) == {"alice-k1": "quote does not cover PCR 23 in sha256"}


def test_approval_without_sha256_never_matches() -> None:
    a1 = approval("a1", "alice", ["alice-k1"])
    sha1_only = replace(a1, expected_pcrs={"sha1": a1.expected_pcrs["sha1"]})
    assert decide([sha1_only], requested=("alice-k1",)).granted == ()


def test_newest_passing_approval_is_recorded() -> None:
    decision = decide(
        [
            approval("a-old", "alice", ["alice-k1"], recipients=["bob"]),
            approval(
                "a-new", "alice", ["alice-k1"], recipients=["alice"], created_at=NOW + timedelta(1)
            ),
        ],
        requested=("alice-k1",),
    )
    assert decision.granted == (Grant("alice-k1", "alice", "a-new"),)
    assert decision.output_recipients == ("alice",)


def test_distinct_workload_names_are_joined() -> None:
    decision = decide(
        [
            approval("a1", "alice", ["alice-k1"], workload_name="trainer"),
            approval("b1", "bob", ["bob-k1"], workload_name="insights"),
        ]
    )
    assert decision.workload_name == "insights, trainer"


# --- helpers --------------------------------------------------------------------------------


def test_expected_pcr23_matches_independent_computation() -> None:
    pcr = bytes(32)
    for e in MANIFEST:
        pcr = hashlib.sha256(pcr + e.digests["sha256"]).digest()
    assert expected_pcr23(MANIFEST, ["sha256"]) == {"sha256": pcr}
    assert expected_pcr23((), ["sha1"]) == {"sha1": bytes(20)}


def test_expected_pcr23_needs_a_digest_in_every_bank() -> None:
    partial = (ManifestEntry("a", 1, {"sha256": bytes(32)}),)
    with pytest.raises(PolicyError, match="no sha1 digest"):
        approval_pcr23(partial, ["sha1", "sha256"])
    with pytest.raises(PolicyError, match="unsupported PCR bank"):
        approval_pcr23(partial, ["md5"])


def test_manifest_from_events_keeps_pcr23_events_in_order() -> None:
    events = [
        MeasurementEvent("b", 2, {"sha256": b"\x02" * 32}),
        MeasurementEvent("boot", 9, {"sha256": b"\x09" * 32}, pcr_index=4),
        MeasurementEvent("a", 1, {"sha256": b"\x01" * 32}),
    ]
    assert manifest_from_events(events) == (
        ManifestEntry("b", 2, {"sha256": b"\x02" * 32}),
        ManifestEntry("a", 1, {"sha256": b"\x01" * 32}),
    )


# --- validation -----------------------------------------------------------------------------

PARTIES = {
    name: Party(name=name, kem=1, public_key=bytes(32)) for name in ("alice", "bob", "carol")
}


def validate(a: Approval) -> None:
    validate_approval(
        a,
        keys=KEYS,
        parties=PARTIES,
        golden_sets={"boot": GOLDEN, "boot-0": replace(GOLDEN, name="boot-0")},
        # The broker's PCR 23 and boot_pcrs [7]: not GOLDEN's PCR 0 (see the last case below).
        quoted_pcrs=(0, 7, 23) if a.golden_set == "boot" else (7, 23),
    )


def test_valid_approval_passes() -> None:
    validate(approval("a1", "alice", ["alice-k1"], recipients=["alice", "bob"], golden_set="boot"))


@pytest.mark.parametrize(
    ("change", "error", "fragment"),
    [
        ({"manifest": ()}, PolicyError, "non-empty manifest"),
        ({"workload_name": ""}, PolicyError, "workload name"),
        ({"key_ids": ()}, PolicyError, "at least one key"),
        ({"key_ids": ("alice-k1", "alice-k1")}, PolicyError, "twice"),
        ({"key_ids": ("bob-k1",)}, NotApprovedError, "belongs to bob, not to alice"),
        ({"key_ids": ("ghost",)}, UnknownPolicyObjectError, "unknown key 'ghost'"),
        ({"output_recipients": ("mallory",)}, UnknownPolicyObjectError, "recipient"),
        ({"output_recipients": ("bob", "bob")}, PolicyError, "twice"),
        ({"golden_set": "nope"}, UnknownPolicyObjectError, "golden set 'nope'"),
        ({"golden_set": ""}, PolicyError, "empty golden set"),
        ({"expected_pcrs": {"sha1": bytes(20)}}, PolicyError, "in sha256"),
        ({"expected_pcrs": {"sha256": bytes(32)}}, PolicyError, "not the value the manifest"),
        ({"expected_pcrs": {"sha256": bytes(31)}}, PolicyError, "must be 32 bytes"),
        (
            {"manifest": (ManifestEntry("a", 1, {"sha1": bytes(20)}),)},
            PolicyError,
            "no sha256 digest",
        ),
        (
            {"manifest": (ManifestEntry("", 1, {"sha256": bytes(32)}),)},
            PolicyError,
            "empty path",
        ),
        (
            {"manifest": (ManifestEntry("a", 1, {"sha256": bytes(32), "md5": bytes(16)}),)},
            PolicyError,
            "unknown bank 'md5'",
        ),
        (
            # A size left out (0) for a file whose digest is not that of empty data.
            {"manifest": (replace(MANIFEST[0], size=0), MANIFEST[1])},
            PolicyError,
            r"manifest file 0 \('bin/train.py'\) says 0 bytes, but its sha1 digest is that of "
            "non-empty data",
        ),
        (
            {"manifest": (entry("empty", b""), replace(entry("empty", b""), size=3))},
            PolicyError,
            "manifest file 1 .* says 3 bytes, but its sha1 digest is that of empty data",
        ),
        (
            {"golden_set": "boot-0"},
            UncoveredPcrError,
            "golden set 'boot-0' names PCR 0, which no quote is sure to cover: quotes cover "
            "PCR 7, 23",
        ),
    ],
)
def test_invalid_approval_is_refused(
    change: dict[str, object], error: type[Exception], fragment: str
) -> None:
    bad = replace(approval("a1", "alice", ["alice-k1"]), **change)  # type: ignore[arg-type]
    with pytest.raises(error, match=fragment):
        validate(bad)


def test_valid_golden_set_passes() -> None:
    validate_golden_set(GOLDEN)
    validate_golden_set(
        replace(
            GOLDEN,
            accepted={
                PcrKey(0, "sha1"): frozenset({bytes(20)}),
                PcrKey(23, "sha384"): frozenset({bytes(48), b"\x01" * 48}),
            },
        )
    )


def test_a_golden_set_must_name_only_pcrs_every_quote_covers() -> None:
    validate_golden_set(GOLDEN, quoted_pcrs=(0, 23))
    with pytest.raises(UncoveredPcrError) as info:
        validate_golden_set(
            replace(
                GOLDEN, accepted={**GOLDEN.accepted, PcrKey(16, "sha1"): frozenset({bytes(20)})}
            ),
            quoted_pcrs=(23,),
        )
    assert str(info.value) == (
        "golden set 'boot' names PCR 0, 16, which no quote is sure to cover: quotes cover PCR 23 "
        "(PCR 23 and the broker's boot_pcrs); add the PCR to boot_pcrs or remove it from the "
        "golden set"
    )
    # Without the broker's selection (offline checks) only the set itself is checked.
    validate_golden_set(GOLDEN)


@pytest.mark.parametrize(
    ("accepted", "fragment"),
    [
        ({}, "lists no PCR"),
        ({PcrKey(24, "sha256"): frozenset({bytes(32)})}, "outside 0..23"),
        ({PcrKey(-1, "sha256"): frozenset({bytes(32)})}, "outside 0..23"),
        ({PcrKey(0, "md5"): frozenset({bytes(16)})}, "unknown bank 'md5'"),
        ({PcrKey(0, "sha256"): frozenset({bytes(20)})}, "must be 32 bytes, got 20"),
        ({PcrKey(0, "sha256"): frozenset()}, "no accepted value"),
    ],
)
def test_invalid_golden_set_is_refused(
    accepted: dict[PcrKey, frozenset[bytes]], fragment: str
) -> None:
    with pytest.raises(PolicyError, match=fragment):
        validate_golden_set(replace(GOLDEN, accepted=accepted))
    with pytest.raises(PolicyError, match="needs a name"):
        validate_golden_set(replace(GOLDEN, name=""))


# --- the launch -----------------------------------------------------------------------------


def _measured_with(**changes: object) -> Launch:
    return replace(LAUNCH, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("measured", "reason"),
    [
        pytest.param(
            _measured_with(argv=("/usr/bin/python3", "bin/train.py", "--depth", "9")),
            "command: approved `/usr/bin/python3 bin/train.py --depth 3`, measured "
            "`/usr/bin/python3 bin/train.py --depth 9`",
            id="another-argv",
        ),
        pytest.param(
            _measured_with(
                argv=("/tmp/evil/python3", "bin/train.py", "--depth", "3"),
                executable="/tmp/evil/python3",
            ),
            "command: approved `/usr/bin/python3 bin/train.py --depth 3`, measured "
            "`/tmp/evil/python3 bin/train.py --depth 3`; executable: approved "
            "'/usr/bin/python3', measured '/tmp/evil/python3'",
            id="another-executable",
        ),
        pytest.param(
            _measured_with(executable_sha256=hashlib.sha256(b"patched python").digest()),
            f"interpreter digest: approved sha256 {PYTHON_SHA256.hex()}, measured "
            f"{hashlib.sha256(b'patched python').hexdigest()}",
            id="another-interpreter",
        ),
        pytest.param(
            _measured_with(
                env=(
                    ("LANG", "C.UTF-8"),
                    ("LD_PRELOAD", "/tmp/hook.so"),
                    ("OMP_NUM_THREADS", "8"),
                    ("PYTHONPATH", "/tmp/inject"),
                )
            ),
            "environment: not approved LD_PRELOAD, PYTHONPATH, other value for OMP_NUM_THREADS",
            id="injected-environment",
        ),
        pytest.param(
            _measured_with(env=(("LANG", "C.UTF-8"),)),
            "environment: missing OMP_NUM_THREADS",
            id="missing-variable",
        ),
        pytest.param(
            _measured_with(cwd="/tmp/elsewhere"),
            "working directory: approved '/srv/workload', measured '/tmp/elsewhere'",
            id="another-workdir",
        ),
    ],
)
def test_a_launch_other_than_the_approved_one_is_denied_saying_what_differs(
    measured: Launch, reason: str
) -> None:
    decision = decide(
        [approval("a1", "alice", ["alice-k1"]), approval("b1", "bob", ["bob-k1"])],
        launch=measured,
    )
    assert decision.granted == ()
    assert reasons(decision) == {
        "alice-k1": f"approval a1 by alice: launch differs from the approved launch ({reason})",
        "bob-k1": f"approval b1 by bob: launch differs from the approved launch ({reason})",
    }


def test_the_launch_reason_wins_over_an_approval_of_other_files() -> None:
    # Two approvals by alice: one of other files, one of these files with another command.
    other = _measured_with(argv=("/usr/bin/python3", "-c", "print(1)"))
    decision = decide(
        [
            approval("a-files", "alice", ["alice-k1"], manifest=OTHER_MANIFEST),
            approval("a-launch", "alice", ["alice-k1"]),
        ],
        requested=("alice-k1",),
        launch=other,
    )
    assert reasons(decision)["alice-k1"].startswith(
        "approval a-launch by alice: launch differs from the approved launch (command: "
    )


def test_an_event_log_without_a_launch_is_denied() -> None:
    decision = decide(
        [approval("a1", "alice", ["alice-k1"])],
        requested=("alice-k1",),
        launch=None,
        quoted=quoted_for(MANIFEST, launch=None),
    )
    assert reasons(decision) == {
        "alice-k1": "approval a1 by alice: the event log has no launch event"
    }


def test_an_approval_stored_before_launches_were_measured_grants_nothing() -> None:
    old = approval("a-old", "alice", ["alice-k1"], launch=None)
    for launch in (LAUNCH, None):
        decision = decide(
            [old],
            requested=("alice-k1",),
            launch=launch,
            quoted=quoted_for(MANIFEST, launch=launch),
        )
        assert decision.granted == ()
        assert reasons(decision) == {
            "alice-k1": "approval a-old by alice approves no launch (it was made before "
            "launches were measured): approve the workload again with --command"
        }


def test_the_measured_launch_is_the_single_last_event() -> None:
    files = [MeasurementEvent(e.path, e.size, e.digests) for e in MANIFEST]
    event = launch_event(LAUNCH, BANKS)
    assert launch_from_events([*files, event]) == LAUNCH
    assert launch_from_events(files) is None
    assert manifest_from_events([*files, event]) == MANIFEST
    with pytest.raises(PolicyError, match="2 launch events"):
        launch_from_events([*files, event, event])
    with pytest.raises(PolicyError, match="not its last PCR 23 event"):
        launch_from_events([files[0], event, files[1]])


def test_a_valid_approval_needs_a_launch_and_its_pcr_covers_it() -> None:
    parties = {"alice": Party("alice", 1, b"k")}
    good = approval("a1", "alice", ["alice-k1"])
    validate_approval(good, keys=KEYS, parties=parties, golden_sets={})
    with pytest.raises(PolicyError, match="needs the launch: approve it with"):
        validate_approval(
            replace(good, launch=None, expected_pcrs=expected_pcr23(MANIFEST, BANKS)),
            keys=KEYS,
            parties=parties,
            golden_sets={},
        )
    # The PCR of the files alone does not explain an approval with a launch.
    with pytest.raises(PolicyError, match="the manifest and the launch produce"):
        validate_approval(
            replace(good, expected_pcrs=expected_pcr23(MANIFEST, BANKS)),
            keys=KEYS,
            parties=parties,
            golden_sets={},
        )


def test_the_reason_comes_from_the_approval_whose_launch_differs_least() -> None:
    # Alice approved the files with two launches; the measured one differs from the second in
    # its environment only, and from the first in its command, executable and environment.
    far = _measured_with(
        argv=("/opt/py/bin/python3", "bin/train.py"), executable="/opt/py/bin/python3"
    )
    decision = decide(
        [
            approval("a-far", "alice", ["alice-k1"], launch=far, created_at=NOW + timedelta(1)),
            approval("a-near", "alice", ["alice-k1"]),
        ],
        requested=("alice-k1",),
        launch=_measured_with(env=(("LANG", "C.UTF-8"), ("OMP_NUM_THREADS", "2"), ("X", "1"))),
    )
    assert reasons(decision) == {
        "alice-k1": "approval a-near by alice: launch differs from the approved launch "
        "(environment: not approved X)"
    }

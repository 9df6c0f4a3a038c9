"""Release policy: which data keys a verified attestation is entitled to. Pure: no I/O.

The broker first verifies the quote and the event log (:mod:`broker.quote`); this module then
decides, for each requested data key, whether the key's owner approved the measured workload on
this machine. It takes plain data (records, quoted PCR values, the measured manifest) and
returns a :class:`Decision`, or raises when the attester itself may not receive anything.

Rules (see ``docs/policy.md``):

* A revoked AK, or an AK whose EK is revoked, gets nothing: :class:`AttesterRevokedError`.
* A key is granted when an active approval by the key's *owner* names it, its manifest equals
  the measured manifest (same ordered paths, digests and sizes), its launch equals the measured
  launch (command, executable, the executable's digest, environment, working directory), its
  expected PCR 23 equals the quoted PCR 23 in every bank both list (sha256 always), and its
  golden set, if any, exists and accepts every PCR value it lists. An approval without a
  launch (stored before launches were measured) grants nothing.
* Keys are decided one by one (partial release): a key whose owner did not approve the workload
  is withheld with an exact reason while the other parties' keys are released.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from broker.errors import (
    AttesterRevokedError,
    NotApprovedError,
    PolicyError,
    UncoveredPcrError,
    UnknownPolicyObjectError,
)
from broker.model import (
    AkRecord,
    Approval,
    DataKeyRecord,
    DenialCode,
    EkRecord,
    GoldenPcrSet,
    Party,
)
from evidence.errors import EventLogError
from evidence.launch import Launch, launch_difference
from evidence.manifest import ManifestEntry, expected_pcr23
from evidence.pcr import (
    BANK_SIZES,
    WORKLOAD_PCR,
    MeasurementEvent,
    check_event_size,
)

#: The bank every comparison of PCR 23 must include: sha1 alone is never enough.
REQUIRED_BANK = "sha256"

#: The highest PCR index a TPM 2.0 PC-client platform has.
MAX_PCR_INDEX = 23


@dataclass(frozen=True)
class Grant:
    """A data key the attested workload may receive, and the approval that allowed it."""

    key_id: str
    owner: str
    approval_id: str


@dataclass(frozen=True)
class Denial:
    """A requested data key that is withheld. ``reason`` is exact, for the audit log only;
    ``code`` is the coarse class the sidecar may learn."""

    key_id: str
    reason: str
    code: DenialCode = DenialCode.NOT_APPROVED


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`evaluate` for one attestation.

    ``output_recipients`` is the union of the recipients named by the approvals that granted
    keys, sorted by name. ``workload_name`` is the approved workload's name (several distinct
    names are joined with ", "); empty when no approval matched the measurement.
    """

    granted: tuple[Grant, ...]
    denied: tuple[Denial, ...]
    output_recipients: tuple[str, ...]
    workload_name: str
    evaluated_at: datetime

    @property
    def granted_key_ids(self) -> tuple[str, ...]:
        return tuple(g.key_id for g in self.granted)


# Stages an approval can fail at, in the order they are checked. When no approval grants a
# key, the reason reported comes from the approval that got furthest, since that is the one the
# owner most likely meant for this workload. A launch that differs also changes PCR 23, so the
# launch is compared as soon as the files are known to be equal: the reason then says what in
# the launch differs rather than only that PCR 23 does.
_REVOKED, _PCR, _NO_LAUNCH, _LAUNCH, _MANIFEST, _GOLDEN = range(6)


def evaluate(
    *,
    ak: AkRecord,
    ek: EkRecord | None,
    quoted_pcrs: Mapping[tuple[int, str], bytes],
    measured_manifest: Sequence[ManifestEntry],
    requested_key_ids: Sequence[str],
    keys: Mapping[str, DataKeyRecord],
    approvals: Sequence[Approval],
    golden_sets: Mapping[str, GoldenPcrSet],
    now: datetime,
    measured_launch: Launch | None = None,
) -> Decision:
    """Decides which requested data keys a verified attestation may receive.

    ``quoted_pcrs`` are the verified quoted PCR values, ``measured_manifest`` the files of the
    verified event log (:func:`manifest_from_events`), ``measured_launch`` its launch
    (:func:`launch_from_events`; None when it has none, which no approval accepts).
    ``approvals`` are the candidates (the
    caller may pre-select active approvals whose expected PCR 23 matches; every rule is checked
    here again regardless). When ``requested_key_ids`` is empty, every key named by an active
    approval that matches this measurement is considered.

    Nothing at all being granted is a valid :class:`Decision` with only denials; the caller
    turns it into an opaque refusal.

    Raises:
        AttesterRevokedError: the AK or its EK is revoked (nothing may be released).
        PolicyError: the EK record given does not belong to the AK, or the AK's EK is missing.
    """
    _check_attester(ak, ek)
    ordered = sorted(approvals, key=lambda a: (-a.created_at.timestamp(), a.approval_id))
    measured = _Measured(tuple(measured_manifest), measured_launch)

    if requested_key_ids:
        wanted = list(dict.fromkeys(requested_key_ids))
    else:
        # Approvals that match this measurement name the keys; their golden sets are checked
        # per key below, so a key withheld for a stale golden set still gets its denial.
        named = {
            key_id
            for a in ordered
            if _failure_stage(a, quoted_pcrs, measured) >= _GOLDEN
            for key_id in a.key_ids
        }
        wanted = sorted(named)

    granted: list[Grant] = []
    denied: list[Denial] = []
    granting: dict[str, Approval] = {}
    for key_id in wanted:
        record = keys.get(key_id)
        if record is None or record.key_id != key_id:
            # NOT_APPROVED, as for a key that exists: a sidecar learns nothing of which key
            # ids exist.
            denied.append(Denial(key_id, "unknown key", DenialCode.NOT_APPROVED))
            continue
        outcome = _decide_key(record, ordered, quoted_pcrs, measured, golden_sets)
        if isinstance(outcome, Approval):
            granted.append(
                Grant(key_id=key_id, owner=record.owner, approval_id=outcome.approval_id)
            )
            granting[outcome.approval_id] = outcome
        else:
            denied.append(Denial(key_id, *outcome))

    recipients = sorted({r for a in granting.values() for r in a.output_recipients})
    if granting:
        names = {a.workload_name for a in granting.values()}
    else:
        names = {
            a.workload_name
            for a in ordered
            if not a.revoked and _failure_stage(a, quoted_pcrs, measured) >= _GOLDEN
        }
    return Decision(
        granted=tuple(granted),
        denied=tuple(denied),
        output_recipients=tuple(recipients),
        workload_name=", ".join(sorted(names)),
        evaluated_at=now,
    )


@dataclass(frozen=True)
class _Measured:
    """What the verified event log measured: the files, then the launch."""

    files: tuple[ManifestEntry, ...]
    launch: Launch | None


def _check_attester(ak: AkRecord, ek: EkRecord | None) -> None:
    if ak.revoked:
        raise AttesterRevokedError(f"AK {ak.ak_name} is revoked: {ak.revoked_reason or 'revoked'}")
    if ak.ek_id is None:
        return
    if ek is None:
        raise PolicyError(f"AK {ak.ak_name} is bound to EK {ak.ek_id}, which is not enrolled")
    if ek.ek_id != ak.ek_id:
        raise PolicyError(f"EK {ek.ek_id} is not the EK of AK {ak.ak_name} ({ak.ek_id})")
    if ek.revoked:
        raise AttesterRevokedError(
            f"EK {ek.ek_id} of AK {ak.ak_name} is revoked: {ek.revoked_reason or 'revoked'}"
        )


def _decide_key(
    record: DataKeyRecord,
    ordered: Sequence[Approval],
    quoted: Mapping[tuple[int, str], bytes],
    measured: _Measured,
    golden_sets: Mapping[str, GoldenPcrSet],
) -> Approval | tuple[str, DenialCode]:
    """The first approval that grants ``record``, or the exact reason none does and its code."""
    owner = record.owner
    if (WORKLOAD_PCR, REQUIRED_BANK) not in quoted:
        return (
            f"quote does not cover PCR {WORKLOAD_PCR} in {REQUIRED_BANK}",
            DenialCode.EVIDENCE_INVALID,
        )
    naming = [a for a in ordered if a.party == owner and record.key_id in a.key_ids]
    if not naming:
        return (
            f"not approved by {owner}: no active approval by {owner} for this key matches "
            "the measured workload"
        ), DenialCode.NOT_APPROVED
    best: tuple[int, str] = (-1, "")
    best_rank = (-1, 0)
    for approval in naming:
        failure = _failure(approval, quoted, measured, golden_sets)
        if failure is None:
            return approval
        # Among approvals that fail at the same stage, the one whose launch differs in the
        # fewest fields is the one the owner most likely meant (its reason is the useful one).
        rank = (failure[0], -failure[1].count("; ") if failure[0] == _LAUNCH else 0)
        if rank > best_rank:
            best, best_rank = failure, rank
    stage, reason = best
    if stage == _REVOKED:
        ids = ", ".join(sorted(a.approval_id for a in naming))
        return (
            f"not approved by {owner}: every approval by {owner} naming this key is revoked ({ids})"
        ), DenialCode.NOT_APPROVED
    if stage == _PCR:
        value = quoted[(WORKLOAD_PCR, REQUIRED_BANK)].hex()
        return (
            f"not approved by {owner}: measured PCR {WORKLOAD_PCR} ({REQUIRED_BANK} {value}) "
            f"matches no active approval by {owner} for this key"
        ), DenialCode.NOT_APPROVED
    # Past the manifest, only the golden set can fail: the workload itself is approved.
    code = DenialCode.PLATFORM_NOT_ACCEPTED if stage == _GOLDEN else DenialCode.NOT_APPROVED
    return reason, code


def _failure_stage(
    approval: Approval,
    quoted: Mapping[tuple[int, str], bytes],
    measured: _Measured,
) -> int:
    """How far ``approval`` gets before golden values: ``_GOLDEN`` means it matches this
    measurement (active; files, launch and PCR 23 equal)."""
    failure = _failure(approval, quoted, measured, None)
    return _GOLDEN if failure is None else failure[0]


def _failure(
    approval: Approval,
    quoted: Mapping[tuple[int, str], bytes],
    measured: _Measured,
    golden_sets: Mapping[str, GoldenPcrSet] | None,
) -> tuple[int, str] | None:
    """``None`` if ``approval`` allows a release on this evidence, else (stage, exact reason).

    With ``golden_sets`` None, golden sets are not checked (a match up to them is ``None``).
    """
    who = f"approval {approval.approval_id} by {approval.party}"
    if approval.revoked:
        return _REVOKED, f"{who} is revoked"
    pcr_matches = _pcr23_matches(approval, quoted)
    files_equal = _manifest_difference(approval.manifest, measured.files) is None
    if not pcr_matches and not files_equal:
        return _PCR, f"{who}: expected PCR {WORKLOAD_PCR} differs from the quoted value"
    if approval.launch is None:
        return _NO_LAUNCH, (
            f"{who} approves no launch (it was made before launches were measured): approve "
            "the workload again with --command"
        )
    if files_equal:
        if measured.launch is None:
            return _LAUNCH, f"{who}: the event log has no launch event"
        launch_diff = launch_difference(approval.launch, measured.launch)
        if launch_diff is not None:
            return _LAUNCH, f"{who}: launch differs from the approved launch ({launch_diff})"
    if not pcr_matches:
        return _PCR, f"{who}: expected PCR {WORKLOAD_PCR} differs from the quoted value"
    difference = _manifest_difference(approval.manifest, measured.files)
    if difference is not None:
        return _MANIFEST, (
            f"{who}: approved manifest differs from the measured event log ({difference})"
        )
    if golden_sets is None:
        return None
    if approval.golden_set:
        golden = golden_sets.get(approval.golden_set)
        if golden is None or golden.name != approval.golden_set:
            return _GOLDEN, f"golden set {approval.golden_set!r} missing ({who})"
        mismatch = golden_mismatch(golden, quoted)
        if mismatch is not None:
            return _GOLDEN, f"{mismatch} ({who})"
    return None


def _pcr23_matches(approval: Approval, quoted: Mapping[tuple[int, str], bytes]) -> bool:
    # Banks the approval lists but the quote does not cover are not compared: the broker's
    # required banks decide which banks a quote must cover, and sha256 always is compared.
    if REQUIRED_BANK not in approval.expected_pcrs or (WORKLOAD_PCR, REQUIRED_BANK) not in quoted:
        return False
    for bank, expected in approval.expected_pcrs.items():
        value = quoted.get((WORKLOAD_PCR, bank))
        if value is not None and bytes(value) != bytes(expected):
            return False
    return True


def _manifest_difference(
    approved: Sequence[ManifestEntry], measured: Sequence[ManifestEntry]
) -> str | None:
    """``None`` when both manifests list the same files, in the same order, with the same
    digests in every bank both carry (sha256 always); else what differs first."""
    if len(approved) != len(measured):
        return f"{len(approved)} files approved, {len(measured)} measured"
    for n, (a, m) in enumerate(zip(approved, measured, strict=True)):
        if a.path != m.path:
            return f"file {n}: approved {a.path!r}, measured {m.path!r}"
        if REQUIRED_BANK not in a.digests or REQUIRED_BANK not in m.digests:
            return f"file {n} ({a.path!r}): no {REQUIRED_BANK} digest to compare"
        for bank in sorted(set(a.digests) & set(m.digests)):
            if bytes(a.digests[bank]) != bytes(m.digests[bank]):
                return f"file {n} ({a.path!r}): {bank} digest differs"
        # Same digests, so the same data: the approved size was measured from it, and an event
        # log that states another size for it is false (the size is not in PCR 23).
        if a.size != m.size:
            return (
                f"file {n} ({a.path!r}): the event log says {m.size} bytes, the approved file "
                f"with these digests is {a.size} bytes"
            )
    return None


def golden_mismatch(golden: GoldenPcrSet, quoted: Mapping[tuple[int, str], bytes]) -> str | None:
    """``None`` when every PCR that ``golden`` lists is quoted with an accepted value; else the
    exact reason naming the first offending PCR and bank (in index, bank order)."""
    for key in sorted(golden.accepted, key=lambda k: (k.index, k.bank)):
        value = quoted.get((key.index, key.bank))
        if value is None:
            return f"golden set {golden.name!r}: PCR {key.index} ({key.bank}) not quoted"
        if bytes(value) not in golden.accepted[key]:
            return (
                f"golden set {golden.name!r}: PCR {key.index} ({key.bank}) value "
                f"{bytes(value).hex()} is not accepted"
            )
    return None


# --- pure helpers ---------------------------------------------------------------------------


def manifest_from_events(events: Iterable[MeasurementEvent]) -> tuple[ManifestEntry, ...]:
    """The workload manifest an event log measured: its PCR 23 file events, in order."""
    return tuple(
        ManifestEntry(path=e.path, size=e.size, digests=dict(e.digests))
        for e in events
        if e.pcr_index == WORKLOAD_PCR and e.launch is None
    )


def launch_from_events(events: Sequence[MeasurementEvent]) -> Launch | None:
    """The launch an event log measured, or None when it has no launch event.

    Raises:
        PolicyError: more than one launch event, or a launch event that is not the last PCR 23
            event (the sidecar measures the launch after every file, right before the quote).
    """
    workload = [e for e in events if e.pcr_index == WORKLOAD_PCR]
    launches = [n for n, e in enumerate(workload) if e.launch is not None]
    if not launches:
        return None
    if len(launches) > 1:
        raise PolicyError(f"the event log has {len(launches)} launch events; one is measured")
    if launches[0] != len(workload) - 1:
        raise PolicyError("the event log's launch event is not its last PCR 23 event")
    return workload[launches[0]].launch


def approval_pcr23(
    manifest: Sequence[ManifestEntry], banks: Sequence[str], launch: Launch | None = None
) -> dict[str, bytes]:
    """:func:`evidence.manifest.expected_pcr23` for an approval, as a policy error.

    Raises:
        PolicyError: a bank is unsupported, or an entry lacks a digest (or has one of the wrong
            size) for one of ``banks``.
    """
    try:
        return expected_pcr23(manifest, banks, launch)
    except EventLogError as e:
        raise PolicyError(f"cannot compute the expected PCR {WORKLOAD_PCR}: {e}") from e


# --- validation of administrative input -----------------------------------------------------


def validate_approval(
    approval: Approval,
    *,
    keys: Mapping[str, DataKeyRecord],
    parties: Mapping[str, Party],
    golden_sets: Mapping[str, GoldenPcrSet],
    quoted_pcrs: Collection[int] | None = None,
) -> None:
    """Checks a new approval before it is stored.

    ``keys``, ``parties`` and ``golden_sets`` hold (at least) the objects the approval names.
    The expected PCR values must be the ones the manifest and the launch produce, so that a
    stored approval can never match a PCR 23 that its own manifest and launch do not explain.
    ``quoted_pcrs`` are the PCR indices every quote covers (see :func:`check_golden_coverage`);
    when given, the approval's golden set may name no other.

    Raises:
        PolicyError: empty workload name or manifest, no launch, a malformed manifest entry (a
            size that its digests contradict, say), expected PCR values that are missing,
            malformed or inconsistent with the manifest and launch, no key ids or duplicates.
        NotApprovedError: a key id belongs to another party (a party approves only its own keys).
        UnknownPolicyObjectError: a key, recipient party or golden set does not exist.
        UncoveredPcrError: the golden set names a PCR that no quote is sure to cover.
    """
    if not approval.party:
        raise PolicyError("an approval needs the approving party")
    if not approval.workload_name:
        raise PolicyError("an approval needs a workload name")
    if not approval.manifest:
        raise PolicyError("an approval needs a non-empty manifest")
    if approval.launch is None:
        raise PolicyError(
            "an approval needs the launch: approve it with 'cleanroom admin workload approve "
            '... --command "/absolute/program ARGS" [--env NAME=VALUE ...]\' (docs/policy.md)'
        )
    for n, entry in enumerate(approval.manifest):
        if not entry.path:
            raise PolicyError(f"manifest file {n} has an empty path")
        if entry.size < 0:
            raise PolicyError(f"manifest file {n} ({entry.path!r}) has a negative size")
        if REQUIRED_BANK not in entry.digests:
            raise PolicyError(f"manifest file {n} ({entry.path!r}) has no {REQUIRED_BANK} digest")
        for bank, digest in entry.digests.items():
            _check_digest(bank, digest, f"manifest file {n} ({entry.path!r})")
        # Sizes are compared with the measured ones, so an approved size must be the file's:
        # one that its own digests contradict could never match an honest measurement.
        try:
            check_event_size(n, MeasurementEvent(entry.path, entry.size, entry.digests))
        except EventLogError as e:
            raise PolicyError(f"manifest {str(e).replace('event', 'file', 1)}") from e

    if REQUIRED_BANK not in approval.expected_pcrs:
        raise PolicyError(f"an approval needs the expected PCR {WORKLOAD_PCR} in {REQUIRED_BANK}")
    for bank, value in approval.expected_pcrs.items():
        _check_digest(bank, value, f"expected PCR {WORKLOAD_PCR}")
    computed = approval_pcr23(approval.manifest, sorted(approval.expected_pcrs), approval.launch)
    for bank, value in approval.expected_pcrs.items():
        if bytes(value) != computed[bank]:
            raise PolicyError(
                f"expected PCR {WORKLOAD_PCR} ({bank}) is not the value the manifest and the "
                "launch produce"
            )

    if not approval.key_ids:
        raise PolicyError("an approval needs at least one key id")
    if len(set(approval.key_ids)) != len(approval.key_ids):
        raise PolicyError("an approval lists a key id twice")
    for key_id in approval.key_ids:
        record = keys.get(key_id)
        if record is None:
            raise UnknownPolicyObjectError(f"unknown key {key_id!r}")
        if record.owner != approval.party:
            raise NotApprovedError(
                f"key {key_id!r} belongs to {record.owner}, not to {approval.party}"
            )

    if len(set(approval.output_recipients)) != len(approval.output_recipients):
        raise PolicyError("an approval lists an output recipient twice")
    for name in approval.output_recipients:
        if name not in parties:
            raise UnknownPolicyObjectError(f"unknown recipient party {name!r}")

    if approval.golden_set is not None:
        if not approval.golden_set:
            raise PolicyError("an empty golden set name; use None for no golden set")
        if approval.golden_set not in golden_sets:
            raise UnknownPolicyObjectError(f"unknown golden set {approval.golden_set!r}")
        if quoted_pcrs is not None:
            check_golden_coverage(golden_sets[approval.golden_set], quoted_pcrs)


def check_golden_coverage(golden: GoldenPcrSet, quoted_pcrs: Collection[int]) -> None:
    """Checks that every PCR ``golden`` names is one that every quote covers.

    ``quoted_pcrs`` are the indices the broker makes every quote cover: PCR 23 and its
    ``boot_pcrs`` (the challenge names them). A sidecar may quote more (``[tpm] extra_pcrs``),
    but the broker cannot know that of every sidecar, so a golden set over any other PCR would
    withhold its keys from every sidecar that does not: it is refused when it is set, and when
    an approval names it.

    Raises:
        UncoveredPcrError: naming the PCRs that no quote is sure to cover, and those quoted.
    """
    uncovered = sorted({k.index for k in golden.accepted} - set(quoted_pcrs))
    if uncovered:
        quoted = ", ".join(str(i) for i in sorted(set(quoted_pcrs)))
        raise UncoveredPcrError(
            f"golden set {golden.name!r} names PCR {', '.join(map(str, uncovered))}, which no "
            f"quote is sure to cover: quotes cover PCR {quoted} (PCR {WORKLOAD_PCR} and the "
            "broker's boot_pcrs); add the PCR to boot_pcrs or remove it from the golden set"
        )


def validate_golden_set(
    golden: GoldenPcrSet, *, quoted_pcrs: Collection[int] | None = None
) -> None:
    """Checks a golden PCR set before it is stored; with ``quoted_pcrs``, also that every quote
    covers its PCRs (:func:`check_golden_coverage`).

    Raises:
        PolicyError: empty name or set, a PCR index outside 0..23, an unknown bank, a PCR with
            no accepted value, or a value of the wrong size for its bank.
        UncoveredPcrError: the set names a PCR that no quote is sure to cover.
    """
    if not golden.name:
        raise PolicyError("a golden set needs a name")
    if not golden.accepted:
        raise PolicyError(f"golden set {golden.name!r} lists no PCR")
    for key, values in golden.accepted.items():
        if not 0 <= key.index <= MAX_PCR_INDEX:
            raise PolicyError(
                f"golden set {golden.name!r}: PCR index {key.index} is outside 0..{MAX_PCR_INDEX}"
            )
        if not values:
            raise PolicyError(
                f"golden set {golden.name!r}: PCR {key.index} ({key.bank}) has no accepted value"
            )
        for value in values:
            _check_digest(key.bank, value, f"golden set {golden.name!r}: PCR {key.index}")
    if quoted_pcrs is not None:
        check_golden_coverage(golden, quoted_pcrs)


def _check_digest(bank: str, value: bytes, where: str) -> None:
    size = BANK_SIZES.get(bank)
    if size is None:
        raise PolicyError(f"{where}: unknown bank {bank!r} (known: {', '.join(BANK_SIZES)})")
    if len(value) != size:
        raise PolicyError(f"{where}: a {bank} value must be {size} bytes, got {len(value)}")

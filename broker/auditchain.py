"""The audit log's hash chain, without I/O: the canonical encoding of a record, its hash,
sealing entries onto a chain head, and checking a chain record by record.

The storage layer (:mod:`broker.storage.repositories.audit`, :mod:`broker.storage.unit`) reads and
writes the rows; :mod:`broker.audit` joins the two. Everything here is a function of its inputs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from broker.errors import StorageError
from broker.model import AuditEntry, AuditRecord

#: The ``previous_hash`` of record 1, and the head of an empty chain.
GENESIS_HASH = "0" * 64

#: Version of the canonical encoding, hashed into every record.
RECORD_FORMAT_VERSION = 1

#: The most records one list_records call returns.
MAX_LIST_LIMIT = 1000

_VERIFY_BATCH = 1000

# json.dumps with any option builds a new encoder per call; these are built once (an encoder
# keeps no state between calls, so threads can share them).
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def format_time(t: datetime) -> str:
    """A record's time as hashed: UTC, ISO 8601, always six fractional digits, ``Z``."""
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError("audit times must be timezone-aware")
    v = t.astimezone(UTC)
    # What strftime("%Y-%m-%dT%H:%M:%S.%fZ") gives, at a fraction of its cost (this runs for
    # every record appended).
    return (
        f"{v.year:04d}-{v.month:02d}-{v.day:02d}T"
        f"{v.hour:02d}:{v.minute:02d}:{v.second:02d}.{v.microsecond:06d}Z"
    )


def canonical_bytes(record: AuditRecord) -> bytes:
    """The bytes that ``record_hash`` is the SHA-256 of: every field but the hash itself.

    A JSON object with sorted keys, no whitespace, strings unescaped beyond what JSON requires,
    UTF-8: for this object (ASCII keys, strings, integers) that is exactly RFC 8785 (JCS)
    canonical JSON, so other tools can recompute it. ``parties`` keeps the caller's order.

    Raises:
        ValueError: a field is not encodable (a naive time, or a string with lone surrogates).
    """
    return _canonical(
        record.sequence,
        record.time,
        record.actor,
        record.action,
        record.subject,
        record.decision,
        record.reason,
        record.evidence_digest,
        record.parties,
        record.previous_hash,
    )


def _canonical(
    sequence: int,
    time: datetime,
    actor: str,
    action: str,
    subject: str,
    decision: str,
    reason: str,
    evidence_digest: str,
    parties: Sequence[str],
    previous_hash: str,
) -> bytes:
    doc: dict[str, Any] = {
        "v": RECORD_FORMAT_VERSION,
        "sequence": sequence,
        "time": format_time(time),
        "actor": actor,
        "action": action,
        "subject": subject,
        "decision": decision,
        "reason": reason,
        "evidence_digest": evidence_digest,
        "parties": list(parties),
        "previous_hash": previous_hash,
    }
    text = _CANONICAL_JSON.encode(doc)
    return text.encode("utf-8")


def compute_record_hash(record: AuditRecord) -> str:
    """The hex SHA-256 of :func:`canonical_bytes` (``record.record_hash`` is not an input).

    Raises:
        ValueError: a field is not encodable.
    """
    return hashlib.sha256(canonical_bytes(record)).hexdigest()


@dataclass(frozen=True)
class ChainReport:
    """The result of a chain verification. ``problem`` is empty when ``valid``."""

    valid: bool
    records_checked: int
    first_bad_sequence: int | None = None
    problem: str = ""


def seal(entry: AuditEntry, sequence: int, time: datetime, previous_hash: str) -> AuditRecord:
    """The record ``entry`` becomes as record ``sequence`` after ``previous_hash``, at ``time``.

    Raises:
        StorageError: a field cannot be encoded (a naive time, a lone surrogate).
    """
    time = time.astimezone(UTC)
    # A party named twice (an approving party that is also an output recipient, say) is named
    # once: the list says who the record concerns, in the caller's order.
    parties = tuple(dict.fromkeys(entry.parties))
    try:
        canonical = _canonical(
            sequence,
            time,
            entry.actor,
            entry.action,
            entry.subject,
            entry.decision,
            entry.reason,
            entry.evidence_digest,
            parties,
            previous_hash,
        )
    except ValueError as e:
        raise StorageError(f"audit entry cannot be encoded: {e}") from e
    return AuditRecord(
        sequence=sequence,
        time=time,
        actor=entry.actor,
        action=entry.action,
        subject=entry.subject,
        decision=entry.decision,
        reason=entry.reason,
        evidence_digest=entry.evidence_digest,
        parties=parties,
        previous_hash=previous_hash,
        record_hash=hashlib.sha256(canonical).hexdigest(),
    )


def seal_all(
    entries: Sequence[AuditEntry], head: tuple[int, str], times: Sequence[datetime]
) -> list[AuditRecord]:
    """``entries`` sealed one after the other onto ``head`` (last sequence and hash).

    Raises:
        StorageError: a field cannot be encoded.
    """
    sequence, previous = head
    out: list[AuditRecord] = []
    for entry, t in zip(entries, times, strict=True):
        sequence += 1
        record = seal(entry, sequence, t, previous)
        previous = record.record_hash
        out.append(record)
    return out


class ChainVerifier:
    """Checks a chain fed to it record by record, in sequence order, and reports the first break.

    Feed each record (:meth:`add`, with the parties the index holds for it, or
    :meth:`undecodable` for a row that could not be read), then :meth:`finish` with the head.
    """

    def __init__(self) -> None:
        self._expected = 1
        self._previous = GENESIS_HASH
        self._checked = 0
        self._broken: ChainReport | None = None

    @property
    def broken(self) -> bool:
        """Whether a break was found (later records are then ignored)."""
        return self._broken is not None

    def _bad(self, sequence: int, problem: str) -> None:
        self._broken = ChainReport(
            valid=False,
            records_checked=self._checked,
            first_bad_sequence=sequence,
            problem=problem,
        )

    def undecodable(self, sequence: int, error: Exception) -> None:
        """Records that the row of ``sequence`` could not be decoded."""
        if self._broken is None:
            self._bad(sequence, f"record cannot be decoded: {error}")

    def add(self, record: AuditRecord, indexed_parties: set[str]) -> None:
        """Checks the next record: its sequence, its link, its hash and its party index."""
        if self._broken is not None:
            return
        expected = self._expected
        if record.sequence != expected:
            if record.sequence > expected:
                self._bad(
                    expected, f"record {expected} is missing (next is {record.sequence}): deleted"
                )
            else:
                self._bad(record.sequence, "sequence out of order")
            return
        if record.previous_hash != self._previous:
            self._bad(
                record.sequence,
                "previous_hash does not match the preceding record: a record was "
                "inserted, deleted or replaced before it",
            )
            return
        try:
            recomputed = compute_record_hash(record)
        except ValueError as e:
            self._bad(record.sequence, f"record cannot be encoded: {e}")
            return
        if recomputed != record.record_hash:
            self._bad(record.sequence, "record_hash does not match the contents: modified")
            return
        if indexed_parties != set(record.parties):
            self._bad(record.sequence, "the party index disagrees with the record")
            return
        self._previous = record.record_hash
        self._expected += 1
        self._checked += 1

    def finish(self, head: tuple[int, str] | None) -> ChainReport:
        """The report, given the chain head row (None when it is missing)."""
        if self._broken is not None:
            return self._broken
        checked = self._checked
        if head is None:
            self._bad(self._expected, "the chain head row is missing")
            return self.finish(head)
        head_seq, head_hash = head
        if head_seq > checked:
            self._bad(checked + 1, f"records {checked + 1}..{head_seq} are missing: truncated")
        elif head_seq < checked:
            self._bad(head_seq + 1, f"records after {head_seq} were added outside the log")
        elif head_hash != self._previous:
            self._bad(head_seq, "the chain head's hash does not match the last record")
        if self._broken is not None:
            return self._broken
        return ChainReport(valid=True, records_checked=checked)

"""What the sidecar remembers between runs: that its AK is enrolled with a broker.

``<state_dir>/enrollment.json`` records the AK name and the broker it was enrolled with. It holds
no secret (the AK's private part never leaves the TPM); it only saves the enrollment round trip
and the EK creation on later runs. If the record is lost, wrong or stale, the sidecar finds out
(the AK in the TPM has another name, or the broker answers "not enrolled") and enrolls again.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sidecar.run.errors import RunSetupError

__all__ = ["ENROLLMENT_FILE", "EnrollmentRecord", "load_enrollment", "save_enrollment"]

_log = logging.getLogger(__name__)

#: The record's file name inside ``[runtime] state_dir``.
ENROLLMENT_FILE = "enrollment.json"


@dataclass(frozen=True)
class EnrollmentRecord:
    """An AK (by TPM name, hex) enrolled with the broker at ``broker`` (HOST:PORT)."""

    ak_name: str
    broker: str
    enrolled_at: str = ""

    def matches(self, *, ak_name: str | None = None, broker: str) -> bool:
        """Whether this record is about ``broker`` (and ``ak_name``, when given)."""
        return self.broker == broker and (ak_name is None or self.ak_name == ak_name)


def load_enrollment(state_dir: str | os.PathLike[str]) -> EnrollmentRecord | None:
    """The recorded enrollment, or None when there is none or it is unreadable (then the
    sidecar enrolls again, which is always safe)."""
    path = Path(state_dir) / ENROLLMENT_FILE
    try:
        doc = json.loads(path.read_bytes())
        return EnrollmentRecord(
            ak_name=str(doc["ak_name"]),
            broker=str(doc["broker"]),
            enrolled_at=str(doc.get("enrolled_at", "")),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        _log.warning("ignoring unreadable enrollment record %s: %s", path, e)
        return None


def save_enrollment(state_dir: str | os.PathLike[str], *, ak_name: str, broker: str) -> Path:
    """Records that ``ak_name`` is enrolled with ``broker``; returns the file written.

    The directory is created mode 0700; the file is replaced atomically.

    Raises:
        RunSetupError: the state directory or file cannot be written.
    """
    directory = Path(state_dir)
    record = {
        "ak_name": ak_name,
        "broker": broker,
        "enrolled_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{ENROLLMENT_FILE}.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=2)
                f.write("\n")
            os.replace(tmp, directory / ENROLLMENT_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise RunSetupError(
            f"cannot write the enrollment record in {directory}: {e.strerror or e}"
        ) from e
    return directory / ENROLLMENT_FILE

"""Rotating the local KEK: ``cleanroom broker kek rotate --config FILE``.

A new random KEK replaces ``state_dir/kek.key``. Every data key the local KEK wraps is unwrapped
with the old KEK and wrapped with the new one inside this process (the plain key only in memory,
zeroed afterwards; each new wrapping is checked by unwrapping it), and in the same unit of work
as those rewraps the database's recorded fingerprint of the local KEK changes to the new one and
an audit record (``kek.rotate``) says so: the rotation commits as a whole or not at all. Only
then does the new key file take the old one's place; the old one is kept as
``kek.key.previous`` for the operator to destroy once backups hold the new one.

Crash safety: the new key is first written to ``kek.key.new``. Killed before the commit, the
database still records the old KEK and the next run starts over (discarding the new file);
killed after the commit but before the files were renamed, the database records the new KEK
and the next run finishes the renames. Either way ``broker serve`` refuses to start with a KEK
that the database does not record, naming both, so nothing is served with the wrong key.

Every broker serving the database must be stopped first: a running broker keeps the old KEK
in memory and could not unwrap what this command rewrapped. Replicas with their own
``state_dir`` get a copy of the new ``kek.key`` before they start again.
"""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from broker.config import BrokerConfig
from broker.core.compose import build_local_kek_rotator
from broker.core.custody import KEK_ROTATE_ACTION
from broker.custody import (
    KEK_SIZE,
    LOCAL_KEK_FILE,
    LOCAL_KEK_REF,
    LocalKek,
    _create_secret_file,
)
from broker.errors import KekError
from broker.storage.store import Store

#: Who the audit record names.
ROTATE_ACTOR: Final = "cleanroom broker kek rotate"
NEW_SUFFIX: Final = ".new"
PREVIOUS_SUFFIX: Final = ".previous"


@dataclass(frozen=True)
class LocalKekRotation:
    """What a rotation did."""

    database: str
    kek_file: Path
    previous_file: Path
    old_fingerprint: str
    new_fingerprint: str
    rewrapped: int
    #: True when this run only finished an interrupted rotation's file renames.
    resumed: bool = False


def _swap_files(kek_file: Path, new_file: Path, previous_file: Path) -> None:
    """``kek.key`` -> ``kek.key.previous``, ``kek.key.new`` -> ``kek.key`` (each a rename in
    one directory, then the directory synced).

    Raises:
        KekError: a rename failed.
    """
    try:
        if kek_file.exists():
            os.replace(kek_file, previous_file)
        os.replace(new_file, kek_file)
        fd = os.open(kek_file.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise KekError(f"cannot put the new KEK in place at {kek_file}: {e.strerror or e}") from e


def rotate_local_kek(config: BrokerConfig) -> LocalKekRotation:
    """Replaces the local KEK with a new random one (see the module docstring).

    Raises:
        StorageError: the database is missing or failed (nothing changed then).
        KekError: the KEK file is missing or is not the KEK the database records, a data key
            does not unwrap with it, or a file cannot be written (nothing committed unless the
            message says the database already records the new KEK).
    """
    state = config.state_path
    kek_file = state / LOCAL_KEK_FILE
    new_file = kek_file.with_name(LOCAL_KEK_FILE + NEW_SUFFIX)
    previous_file = kek_file.with_name(LOCAL_KEK_FILE + PREVIOUS_SUFFIX)
    with Store.open(config.database_url, migrate=False, require_existing=True) as store:
        recorded = store.kek_fingerprints().get(LOCAL_KEK_REF)
        if recorded is None:
            raise KekError(
                f"the database {store.display_url} records no local KEK: run "
                "`cleanroom broker init --config FILE` first"
            )
        if new_file.exists():
            with LocalKek.open(new_file, create=False) as pending:
                if hmac.compare_digest(pending.fingerprint, recorded):
                    # The last run committed and stopped before the renames: finish them.
                    with LocalKek.open(kek_file, create=False) as old:
                        old_fingerprint = old.fingerprint
                    _swap_files(kek_file, new_file, previous_file)
                    return LocalKekRotation(
                        store.display_url,
                        kek_file,
                        previous_file,
                        old_fingerprint,
                        recorded,
                        rewrapped=0,
                        resumed=True,
                    )
            # The last run stopped before its commit: its new key wrapped nothing.
            new_file.unlink()
        with LocalKek.open(kek_file, create=False) as old:
            if not hmac.compare_digest(old.fingerprint, recorded):
                raise KekError(
                    f"{kek_file} has fingerprint {old.fingerprint}, but the database "
                    f"{store.display_url} records {recorded}: it is not the KEK to rotate"
                )
            _create_secret_file(new_file, secrets.token_bytes(KEK_SIZE))
            try:
                with LocalKek.open(new_file, create=False) as new:
                    count = build_local_kek_rotator(store).rewrap_all(old, new, actor=ROTATE_ACTOR)
                    new_fingerprint = new.fingerprint
            except BaseException:
                # Nothing committed: the database still records the old KEK.
                new_file.unlink(missing_ok=True)
                raise
            old_fingerprint = old.fingerprint
        _swap_files(kek_file, new_file, previous_file)
        return LocalKekRotation(
            store.display_url, kek_file, previous_file, old_fingerprint, new_fingerprint, count
        )


__all__ = ["KEK_ROTATE_ACTION", "LocalKekRotation", "rotate_local_kek"]

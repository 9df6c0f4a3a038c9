"""Where the workload's outputs go: sealed as they arrive, committed only when complete.

An :class:`OutputSink` opens one :class:`OutputWriter` per output. The writer seals the plaintext
with a fresh data key to the recipients that the approved workload names (``SealWriter`` from
:mod:`sealing.envelope`), so plaintext never reaches storage, and makes the output visible only
on :meth:`OutputWriter.commit`; :meth:`OutputWriter.abort` discards it.

:class:`LocalDirectoryOutput` stores ``<directory>/<name>.sealed``. It writes a temporary file
in the same directory and links it into place on commit (refusing to replace an existing
output), so an interrupted stream never leaves a file that looks complete; even a temporary file
left behind by a crash fails to open because it lacks its final segment.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NamedTuple, Protocol, cast, runtime_checkable

from sealing.envelope import DEFAULT_CHUNK_SIZE, SealWriter
from sealing.errors import SealingError
from sealing.keys import DATA_KEY_SIZE, RecipientPublicKey
from sidecar.dataplane.errors import OutputExistsError, OutputNameError, OutputStoreError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = [
    "SEALED_SUFFIX",
    "LocalDirectoryOutput",
    "OutputReceipt",
    "OutputSink",
    "OutputWriter",
    "Recipient",
    "SealedOutput",
    "check_output_name",
    "committed_receipt",
    "start_sealing",
]

_log = logging.getLogger(__name__)

#: Appended to every output name in storage.
SEALED_SUFFIX = ".sealed"

# Limits that keep a name a sane relative path on every filesystem we target.
_MAX_NAME_BYTES = 1024
_MAX_COMPONENT_BYTES = 255 - len(SEALED_SUFFIX)
_MAX_DEPTH = 16

_PARTIAL_PREFIX = ".partial-"


class Recipient(NamedTuple):
    """A party that may open the outputs, and its HPKE public key."""

    party: str
    key: RecipientPublicKey


@dataclass(frozen=True)
class OutputReceipt:
    """What a committed output became.

    Attributes:
        name: the output's name as the workload gave it.
        location: where the sealed stream is stored (a path or URL).
        plaintext_bytes: plaintext bytes sealed.
        sealed_bytes: size of the sealed stream.
        recipients: the parties it is sealed to.
        key_id: the key id in the sealed stream's header (the data key itself is discarded).
    """

    name: str
    location: str
    plaintext_bytes: int
    sealed_bytes: int
    recipients: tuple[str, ...]
    key_id: str


def start_sealing(
    raw: BinaryIO,
    *,
    name: str,
    recipients: Sequence[Recipient],
    chunk_size: int,
    discard: Callable[[], None],
) -> tuple[str, SealWriter]:
    """A :class:`SealWriter` over ``raw`` under a fresh data key, and the output's new key id.

    The data key lives in a bytearray wiped as soon as the writer derived its stream keys,
    whatever happens. On failure ``discard`` (which drops ``raw``) runs before the error
    propagates.

    Raises:
        OutputStoreError: sealing cannot start (a bad recipient key, ``raw`` failing).
    """
    key_id = f"output-{secrets.token_hex(16)}"
    data_key = bytearray(os.urandom(DATA_KEY_SIZE))
    try:
        writer = SealWriter(
            raw,
            # Any bytes-like key works (the envelope copies it); a bytearray can be wiped.
            data_key=cast(bytes, data_key),
            key_id=key_id,
            recipients=[r.key for r in recipients],
            chunk_size=chunk_size,
        )
    except (SealingError, OSError) as e:
        discard()
        raise OutputStoreError(f"output {name!r}: cannot start sealing: {e}") from e
    except BaseException:
        discard()
        raise
    finally:
        data_key[:] = bytes(DATA_KEY_SIZE)
    return key_id, writer


def committed_receipt(
    *,
    name: str,
    location: str,
    plaintext_bytes: int,
    sealed_bytes: int,
    recipients: tuple[str, ...],
    key_id: str,
) -> OutputReceipt:
    """The receipt of a committed output, logged (sizes and parties only, never content)."""
    receipt = OutputReceipt(
        name=name,
        location=location,
        plaintext_bytes=plaintext_bytes,
        sealed_bytes=sealed_bytes,
        recipients=recipients,
        key_id=key_id,
    )
    _log.info(
        "output %r sealed to %s: %d plaintext bytes, %d sealed bytes at %s",
        name,
        ", ".join(recipients),
        plaintext_bytes,
        sealed_bytes,
        location,
    )
    return receipt


@runtime_checkable
class OutputWriter(Protocol):
    """One output being written. Exactly one of :meth:`commit` and :meth:`abort` ends it."""

    @property
    def name(self) -> str:
        """The output's name."""
        ...

    def write(self, data: ReadableBuffer) -> None:
        """Seals and stores ``data`` (buffered up to one chunk).

        Raises:
            OutputStoreError: sealing or storing failed; the output is then aborted.
        """
        ...

    def commit(self) -> OutputReceipt:
        """Finishes the sealed stream and makes the output visible under its name.

        Raises:
            OutputExistsError: an output of that name appeared meanwhile.
            OutputStoreError: finishing or storing failed; nothing is left visible.
        """
        ...

    def abort(self) -> None:
        """Discards the output. Idempotent, never raises."""
        ...


@runtime_checkable
class OutputSink(Protocol):
    """The output location (a local directory; Azure Blob later)."""

    def open_output(self, name: str, *, recipients: Sequence[Recipient]) -> OutputWriter:
        """Starts an output named ``name`` sealed to ``recipients``.

        Raises:
            OutputNameError: the name is not an acceptable relative name.
            OutputExistsError: an output of that name exists or is being written.
            OutputStoreError: the output cannot be created.
        """
        ...


def check_output_name(name: str) -> tuple[str, ...]:
    """Splits an output name into its path components after checking that it stays inside the
    output location.

    Accepted: a relative path of ``/``-separated components, none empty, ``.`` or ``..``, without
    NUL or other control characters, at most 16 deep and 1,024 bytes long.

    Raises:
        OutputNameError: the name is unacceptable (the message says why).
    """
    if not isinstance(name, str) or not name:
        raise OutputNameError("an output name must not be empty")
    shown = repr(name[:80])
    if "\x00" in name:
        raise OutputNameError(f"output name {shown} contains NUL")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise OutputNameError(f"output name {shown} contains control characters")
    if name.startswith("/"):
        raise OutputNameError(f"output name {shown} is absolute; give a relative name")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise OutputNameError(f"output name {shown} is not valid Unicode") from e
    if len(encoded) > _MAX_NAME_BYTES:
        raise OutputNameError(f"output name {shown}... is longer than {_MAX_NAME_BYTES} bytes")
    parts = tuple(name.split("/"))
    if len(parts) > _MAX_DEPTH:
        raise OutputNameError(f"output name {shown} is more than {_MAX_DEPTH} levels deep")
    for part in parts:
        if part in ("", ".", ".."):
            raise OutputNameError(
                f"output name {shown} has an empty, '.' or '..' component; "
                "outputs must stay inside the output directory"
            )
        if len(part.encode("utf-8")) > _MAX_COMPONENT_BYTES:
            raise OutputNameError(f"output name {shown} has a component that is too long")
    if parts[-1].startswith(_PARTIAL_PREFIX):
        raise OutputNameError(f"output name {shown} uses the reserved prefix {_PARTIAL_PREFIX!r}")
    return parts


class LocalDirectoryOutput:
    """Stores each output sealed as ``<directory>/<name>.sealed``.

    Subdirectories named in an output name are created (mode 0755 before umask); any existing
    component that is a symlink or not a directory is refused, so a name cannot lead outside
    ``directory``. Files are created mode 0600 while written and get ``file_mode`` on commit.
    An existing ``<name>.sealed`` is refused, unless ``replace`` (``[outputs] replace``): then
    it is replaced atomically when the new output commits.

    Raises:
        OutputStoreError: ``directory`` does not exist and cannot be created, or is not a
            directory.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        file_mode: int = 0o644,
        replace: bool = False,
    ) -> None:
        self._directory = Path(directory)
        self._chunk_size = chunk_size
        self._file_mode = file_mode
        self._replace = replace
        self._lock = threading.Lock()
        self._active: set[tuple[str, ...]] = set()
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputStoreError(
                f"cannot create output directory {self._directory}: {e.strerror or e}"
            ) from e
        if not self._directory.is_dir():
            raise OutputStoreError(f"output location {self._directory} is not a directory")

    @property
    def directory(self) -> Path:
        """The output directory."""
        return self._directory

    def open_output(self, name: str, *, recipients: Sequence[Recipient]) -> OutputWriter:
        """Starts the output ``name``; see :meth:`OutputSink.open_output`.

        Raises:
            OutputNameError: the name is unacceptable or leads through a symlink.
            OutputExistsError: ``<name>.sealed`` exists or the name is being written.
            OutputStoreError: the temporary file cannot be created or sealing cannot start.
        """
        parts = check_output_name(name)
        if not recipients:
            raise OutputStoreError(f"output {name!r}: no recipients to seal it to")
        with self._lock:
            if parts in self._active:
                raise OutputExistsError(f"output {name!r} is already being written")
            self._active.add(parts)
        try:
            dir_fd = self._open_parent(name, parts[:-1])
            # The output owns dir_fd from here on and closes it however it ends.
            return _LocalSealedOutput(
                owner=self,
                name=name,
                parts=parts,
                dir_fd=dir_fd,
                final=parts[-1] + SEALED_SUFFIX,
                recipients=recipients,
            )
        except BaseException:
            self._release(parts)
            raise

    def _release(self, parts: tuple[str, ...]) -> None:
        with self._lock:
            self._active.discard(parts)

    def _open_parent(self, name: str, dirs: tuple[str, ...]) -> int:
        """Opens (creating as needed) the directory that will hold the output, one component at
        a time relative to the previous one and without following symlinks."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        try:
            fd = os.open(self._directory, flags)
        except OSError as e:
            raise OutputStoreError(
                f"cannot open output directory {self._directory}: {e.strerror or e}"
            ) from e
        try:
            for i, part in enumerate(dirs):
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                except OSError as e:
                    raise OutputStoreError(
                        f"output {name!r}: cannot create directory {'/'.join(dirs[: i + 1])!r}: "
                        f"{e.strerror or e}"
                    ) from e
                try:
                    child = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise OutputNameError(
                            f"output {name!r}: {'/'.join(dirs[: i + 1])!r} is a symlink or not "
                            "a directory; outputs must stay inside the output directory"
                        ) from e
                    raise OutputStoreError(
                        f"output {name!r}: cannot open directory {'/'.join(dirs[: i + 1])!r}: "
                        f"{e.strerror or e}"
                    ) from e
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def __repr__(self) -> str:
        return f"LocalDirectoryOutput({str(self._directory)!r})"


class SealedOutput:
    """What every sealed output writer shares: sealing as the data arrives, the finished-state
    checks, the commit's error handling and receipt, and the abort.

    A subclass opens its raw sink, calls :meth:`_start_sealing` over it, and provides
    :meth:`_commit_raw` (make the complete output visible; return its sealed size),
    :meth:`_discard` (drop the raw sink, then :meth:`_finish`) and :meth:`_finish` (release
    the name, once); :meth:`_after_commit` runs once the output is in place.
    """

    #: The logger that records discarded outputs (each storage logs under its own name).
    _logger: logging.Logger = _log
    _name: str
    _parties: tuple[str, ...]
    _location: str
    _done: bool
    _writer: SealWriter
    key_id: str

    def _start_sealing(
        self, raw: BinaryIO, *, recipients: Sequence[Recipient], chunk_size: int
    ) -> None:
        """Seals into ``raw`` under a fresh data key (:func:`start_sealing`).

        Raises:
            OutputStoreError: sealing cannot start (the output is then discarded).
        """
        self.key_id, self._writer = start_sealing(
            raw,
            name=self._name,
            recipients=recipients,
            chunk_size=chunk_size,
            discard=self._discard,
        )

    @property
    def name(self) -> str:
        return self._name

    @property
    def plaintext_bytes(self) -> int:
        """Plaintext bytes accepted so far."""
        return self._writer.plaintext_size

    def write(self, data: ReadableBuffer) -> None:
        """Seals ``data``; see :meth:`OutputWriter.write`.

        Raises:
            OutputStoreError: the output is finished, or sealing or writing failed (the output
                is then discarded).
        """
        if self._done:
            raise OutputStoreError(f"output {self._name!r} is already finished")
        try:
            self._writer.write(data)
        except (SealingError, OSError) as e:
            self.abort()
            raise OutputStoreError(f"output {self._name!r}: cannot write: {e}") from e

    def commit(self) -> OutputReceipt:
        """Writes the final segment and makes the output visible (:meth:`_commit_raw`).

        Raises:
            OutputExistsError: the output appeared meanwhile (nothing is replaced).
            OutputStoreError: finishing or committing failed (the output is discarded).
        """
        if self._done:
            raise OutputStoreError(f"output {self._name!r} is already finished")
        try:
            sealed_bytes = self._commit_raw()
        except OutputExistsError:
            self.abort()
            raise
        except (SealingError, OSError) as e:
            self.abort()
            raise OutputStoreError(f"output {self._name!r}: cannot commit: {e}") from e
        except BaseException:
            self.abort()
            raise
        self._after_commit()
        return committed_receipt(
            name=self._name,
            location=self._location,
            plaintext_bytes=self._writer.plaintext_size,
            sealed_bytes=sealed_bytes,
            recipients=self._parties,
            key_id=self.key_id,
        )

    def abort(self) -> None:
        """Discards the output; nothing is committed. Idempotent, never raises."""
        if self._done:
            return
        self._writer.abort()
        self._discard()
        self._logger.info("output %r discarded (not completed)", self._name)

    def _commit_raw(self) -> int:
        """Writes the final segment (``self._writer.close()``), makes the complete sealed output
        visible and returns its size in bytes.

        Raises:
            OutputExistsError: the output appeared meanwhile.
            SealingError, OSError: finishing or committing failed.
        """
        raise NotImplementedError

    def _after_commit(self) -> None:
        self._finish()

    def _discard(self) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError


class _LocalSealedOutput(SealedOutput):
    """One output being sealed into a temporary file of its final directory."""

    def __init__(
        self,
        *,
        owner: LocalDirectoryOutput,
        name: str,
        parts: tuple[str, ...],
        dir_fd: int,
        final: str,
        recipients: Sequence[Recipient],
    ) -> None:
        self._owner = owner
        self._name = name
        self._parts = parts
        self._dir_fd = dir_fd
        self._final = final
        self._parties = tuple(r.party for r in recipients)
        self._done = False
        self._location = str(owner.directory.joinpath(*parts[:-1], final))
        try:
            self._check_absent()
        except BaseException:
            self._finish()
            raise
        self._tmp = f"{_PARTIAL_PREFIX}{secrets.token_hex(12)}"
        try:
            fd = os.open(
                self._tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dir_fd,
            )
        except OSError as e:
            self._finish()
            raise OutputStoreError(
                f"output {name!r}: cannot create a temporary file: {e.strerror or e}"
            ) from e
        # Unbuffered: SealWriter hands over one whole segment per write.
        self._file = os.fdopen(fd, "wb", buffering=0)
        self._start_sealing(self._file, recipients=recipients, chunk_size=owner._chunk_size)

    def _check_absent(self) -> None:
        try:
            st = os.stat(self._final, dir_fd=self._dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        except OSError as e:
            raise OutputStoreError(
                f"output {self._name!r}: cannot check {self._final!r}: {e}"
            ) from e
        if stat.S_ISLNK(st.st_mode):
            raise OutputExistsError(f"output {self._name!r}: {self._final!r} is a symlink")
        if not (self._owner._replace and stat.S_ISREG(st.st_mode)):
            raise OutputExistsError(
                f"output {self._name!r}: {self._final!r} is already an existing output"
            )

    def _commit_raw(self) -> int:
        """Writes the final segment, syncs, and links the file into place.

        Raises:
            OutputExistsError: ``<name>.sealed`` appeared meanwhile (nothing is replaced).
            SealingError, OSError: finishing, syncing or linking failed.
        """
        try:
            self._writer.close()
            fd = self._file.fileno()
            os.fchmod(fd, self._owner._file_mode)
            os.fsync(fd)
            sealed_bytes = os.fstat(fd).st_size
            self._file.close()
            if self._owner._replace:
                # Told to replace: rename() swaps the complete output in atomically; a reader
                # sees the old output or the new one, never a mix.
                os.rename(self._tmp, self._final, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
            else:
                # link() refuses to replace an existing name, unlike rename(): two sessions
                # writing the same output cannot silently overwrite each other.
                os.link(
                    self._tmp,
                    self._final,
                    src_dir_fd=self._dir_fd,
                    dst_dir_fd=self._dir_fd,
                    follow_symlinks=False,
                )
        except FileExistsError as e:
            raise OutputExistsError(
                f"output {self._name!r}: {self._final!r} appeared while it was written"
            ) from e
        return sealed_bytes

    def _after_commit(self) -> None:
        try:
            if not self._owner._replace:  # rename() left no temporary name behind
                os.unlink(self._tmp, dir_fd=self._dir_fd)
            os.fsync(self._dir_fd)
        except OSError as e:
            # The output is in place and complete; a leftover temporary name is harmless.
            _log.warning("output %r: cleaning up after commit failed: %s", self._name, e)
        finally:
            self._finish()

    def _discard(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass
        try:
            os.unlink(self._tmp, dir_fd=self._dir_fd)
        except OSError:
            pass
        self._finish()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            os.close(self._dir_fd)
        except OSError:
            pass
        self._owner._release(self._parts)

    def __repr__(self) -> str:
        return f"<sealed output {self._name!r}>"

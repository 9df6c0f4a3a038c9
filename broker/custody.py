"""Key custody: key-encryption keys (KEKs) that wrap data keys at rest, and registration.

Data keys are stored only wrapped by a KEK (:class:`Kek`). The wrap binds the key id and the
owner party as associated data, so a wrapped key copied into another record (another key id or
owner) fails to unwrap instead of being released under the wrong name. :class:`LocalKek` keeps
an AES-256-GCM key in a 0600 file; other providers (Azure Key Vault) plug into
:class:`KekRegistry` by a ref prefix such as ``"azurekv:"``.

Parties hand their data keys to the broker sealed with HPKE to the broker's registration key
(:func:`load_or_create_registration_key`); the layout of what they seal (the HPKE info binding
the key id and the owner) is :mod:`broker.keyseal`'s.

Plain data keys never go into logs or exception messages. Python cannot guarantee that a key is
erased from memory (immutable ``bytes`` copies are made by the crypto library and freed by the
garbage collector whenever it likes); where this module hands out a plain key it does so in a
``bytearray`` that is zeroed when the caller is done (:func:`plain_data_key`), which shortens
the key's life in memory but is not a guarantee.
"""

from __future__ import annotations

import errno
import hmac
import os
import secrets
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.errors import CustodyError, KekError
from broker.keyseal import DATA_KEY_SIZE, check_data_key, encode_info, zero
from cleanroom.closing import Closeable
from sealing.errors import SealingError
from sealing.keys import (
    KEM_X25519,
    RecipientPrivateKey,
    generate_recipient_key,
    load_private_key,
    write_private_key,
)

if TYPE_CHECKING:
    from broker.model import DataKeyRecord

#: Size of the local KEK (AES-256-GCM).
KEK_SIZE = 32

#: The ref of :class:`LocalKek` in :attr:`DataKeyRecord.kek_ref`.
LOCAL_KEK_REF = "local"

#: Version byte of the local wrapped-key format: ``version || nonce(12) || ciphertext+tag``.
WRAP_VERSION = 1
_NONCE_SIZE = 12
_TAG_SIZE = 16
_WRAPPED_SIZE = 1 + _NONCE_SIZE + DATA_KEY_SIZE + _TAG_SIZE

WRAP_LABEL = b"cleanroom/v1 kek-wrap"
FINGERPRINT_LABEL = b"cleanroom/v1 kek-fingerprint"

#: File names under the broker's state directory.
LOCAL_KEK_FILE = "kek.key"
REGISTRATION_KEY_FILE = "registration.key"


# --- KEKs -----------------------------------------------------------------------------------


class Kek(Protocol):
    """A key-encryption key. ``key_id`` and ``owner`` are bound as AEAD associated data."""

    @property
    def ref(self) -> str:
        """What :attr:`DataKeyRecord.kek_ref` records for keys this KEK wraps."""
        ...

    def wrap(self, data_key: bytes | bytearray, *, key_id: str, owner: str) -> bytes:
        """Raises: KekError, CustodyError."""
        ...

    def unwrap(self, wrapped: bytes, *, key_id: str, owner: str) -> bytes:
        """Raises: KekError (wrong KEK, altered, or another key id or owner)."""
        ...


class LocalKek(Closeable):
    """AES-256-GCM KEK whose key lives in a local file with mode 0600.

    Use :meth:`open`; close it (or use it as a context manager) to drop the key.
    """

    def __init__(self, *, key: bytes | bytearray, path: Path | None = None) -> None:
        """Raises: KekError: the key is not 32 bytes."""
        if len(key) != KEK_SIZE:
            raise KekError(f"the local KEK must be {KEK_SIZE} bytes, got {len(key)}")
        self._aead: AESGCM | None = AESGCM(key)
        self.path = path
        # A MAC of a fixed label under the key identifies the key without revealing it (HMAC
        # is a PRF: the tag says nothing about the key but whether two keys are the same).
        tag = hmac.new(bytes(key), FINGERPRINT_LABEL, "sha256").hexdigest()
        self.fingerprint = f"local:hmac-sha256:{tag[:32]}"

    @property
    def ref(self) -> str:
        return LOCAL_KEK_REF

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = True) -> LocalKek:
        """Loads the KEK from ``path``, creating a fresh random one there first if allowed.

        A new file is created with ``O_CREAT|O_EXCL`` and mode 0600 (its directory with 0700
        if missing); when several brokers start at once exactly one key wins and all use it.

        Raises:
            KekError: the file is missing (and ``create`` is false), is not a regular file, is
                readable or writable by group or others, is owned by another user, has the
                wrong size, or cannot be read or written.
        """
        p = Path(path)
        if create and not p.exists():
            _create_secret_file(p, secrets.token_bytes(KEK_SIZE))
        key = _read_secret_file(p, KEK_SIZE)
        try:
            return cls(key=key, path=p)
        finally:
            zero(key)

    def _cipher(self) -> AESGCM:
        if self._aead is None:
            raise KekError("the local KEK is closed")
        return self._aead

    def wrap(self, data_key: bytes | bytearray, *, key_id: str, owner: str) -> bytes:
        """Wraps a 32-byte data key: ``version || random nonce || AES-GCM(ciphertext || tag)``.

        Raises:
            CustodyError: the data key is not 32 bytes, or the key id or owner is empty.
            KekError: the KEK is closed.
        """
        check_data_key(data_key)
        aad = _wrap_aad(WRAP_VERSION, key_id, owner)
        nonce = secrets.token_bytes(_NONCE_SIZE)
        return bytes([WRAP_VERSION]) + nonce + self._cipher().encrypt(nonce, data_key, aad)

    def unwrap(self, wrapped: bytes, *, key_id: str, owner: str) -> bytes:
        """Unwraps a key wrapped by :meth:`wrap` for the same ``key_id`` and ``owner``.

        Raises:
            KekError: the wrapped key is malformed, of an unknown version, was wrapped by
                another KEK or for another key id or owner, or was altered; or the KEK is closed.
        """
        what = f"wrapped data key {key_id!r} of {owner!r}"
        if len(wrapped) != _WRAPPED_SIZE:
            raise KekError(f"{what} is {len(wrapped)} bytes, expected {_WRAPPED_SIZE}")
        if wrapped[0] != WRAP_VERSION:
            raise KekError(f"{what} has unknown format version {wrapped[0]}")
        try:
            aad = _wrap_aad(wrapped[0], key_id, owner)
        except CustodyError as e:
            raise KekError(f"{what}: {e}") from e
        nonce = wrapped[1 : 1 + _NONCE_SIZE]
        try:
            return self._cipher().decrypt(nonce, wrapped[1 + _NONCE_SIZE :], aad)
        except InvalidTag as e:
            raise KekError(
                f"{what} does not unwrap: another KEK wrapped it, it belongs to another key id "
                "or owner, or it was altered"
            ) from e

    def close(self) -> None:
        """Drops the key (the AES-GCM object holding it)."""
        self._aead = None


def _wrap_aad(version: int, key_id: str, owner: str) -> bytes:
    # The version is authenticated too, so a future format cannot be confused with this one.
    return encode_info(WRAP_LABEL + bytes([version]), key_id, owner)


KekFactory = Callable[[str], Kek]


class KekRegistry(Closeable):
    """Resolves a :attr:`DataKeyRecord.kek_ref` to the :class:`Kek` that unwraps it.

    KEKs with a fixed ref (``"local"``) are added with :meth:`add`; providers that serve many
    refs (``"azurekv:https://vault/keys/name/version"``) register a factory for their prefix
    with :meth:`add_provider`, and the KEK each ref resolves to is cached. Thread-safe.
    """

    def __init__(
        self,
        *,
        default_ref: str = LOCAL_KEK_REF,
        keks: Iterable[Kek] = (),
        providers: Mapping[str, KekFactory] | None = None,
    ) -> None:
        self.default_ref = default_ref
        self._keks: dict[str, Kek] = {}
        self._providers: dict[str, KekFactory] = dict(providers or {})
        self._lock = threading.Lock()
        for kek in keks:
            self.add(kek)

    @classmethod
    def open_local(
        cls,
        state_dir: str | os.PathLike[str],
        *,
        default_ref: str = LOCAL_KEK_REF,
        create: bool = True,
    ) -> KekRegistry:
        """A registry holding the :class:`LocalKek` of ``state_dir/kek.key`` (created if new
        and ``create``).

        Raises:
            KekError: the KEK file is unusable or (without ``create``) missing (see
                :meth:`LocalKek.open`).
        """
        kek = LocalKek.open(Path(state_dir) / LOCAL_KEK_FILE, create=create)
        return cls(default_ref=default_ref, keks=[kek])

    def add(self, kek: Kek) -> None:
        """Raises: KekError: a KEK with the same ref is already registered."""
        with self._lock:
            if kek.ref in self._keks:
                raise KekError(f"a KEK with ref {kek.ref!r} is already registered")
            self._keks[kek.ref] = kek

    def add_provider(self, prefix: str, factory: KekFactory) -> None:
        """Lets ``factory(ref)`` build the KEK for every ref starting with ``prefix``.

        Raises:
            KekError: the prefix is empty or already has a provider.
        """
        if not prefix:
            raise KekError("a KEK provider needs a non-empty ref prefix")
        with self._lock:
            if prefix in self._providers:
                raise KekError(f"a KEK provider for {prefix!r} is already registered")
            self._providers[prefix] = factory

    def get(self, ref: str) -> Kek:
        """The KEK for ``ref``.

        Raises:
            KekError: no KEK or provider serves ``ref``, or the provider failed to build it.
        """
        with self._lock:
            kek = self._keks.get(ref)
            if kek is not None:
                return kek
            # The longest matching prefix wins, so "azurekv:" and a more specific provider
            # can coexist.
            matches = [p for p in self._providers if ref.startswith(p)]
            if not matches:
                raise KekError(f"no KEK is configured for ref {ref!r}")
            factory = self._providers[max(matches, key=len)]
            try:
                kek = factory(ref)
            except KekError:
                raise
            except Exception as e:
                raise KekError(f"the KEK provider for {ref!r} failed: {e}") from e
            self._keks[ref] = kek
            return kek

    @property
    def default(self) -> Kek:
        """The KEK new data keys are wrapped with.

        Raises:
            KekError: the default ref cannot be resolved.
        """
        return self.get(self.default_ref)

    def close(self) -> None:
        """Closes every KEK that can be closed (drops their keys), then every provider that can
        be closed (a Key Vault provider closes the credential it made). Idempotent."""
        with self._lock:
            keks = list(self._keks.values())
            self._keks.clear()
            providers = list(self._providers.values())
        for closable in (*keks, *providers):
            close = getattr(closable, "close", None)
            if callable(close):
                close()


#: Key id and owner of the random key :func:`check_kek` wraps (never a real data key's).
_CHECK_KEY_ID = "cleanroom-kek-check"
_CHECK_OWNER = "cleanroom-broker"


def check_kek(kek: Kek) -> str:
    """Proves that ``kek`` wraps and unwraps, with a random key that is then dropped.

    A KEK with a ``check()`` method of its own (:class:`broker.kek_azure.KeyVaultKek`, which
    also bypasses its unwrap cache) is asked to run it. Returns what the check found in use:
    the versioned Key Vault key id, or the KEK's ref.

    Raises:
        KekError: the KEK cannot wrap, or what it wrapped does not unwrap to the same key.
        CustodyError: the KEK refused the probe key.
    """
    own_check = getattr(kek, "check", None)
    if callable(own_check):
        return str(own_check())
    probe = secrets.token_bytes(DATA_KEY_SIZE)
    wrapped = kek.wrap(probe, key_id=_CHECK_KEY_ID, owner=_CHECK_OWNER)
    back = kek.unwrap(wrapped, key_id=_CHECK_KEY_ID, owner=_CHECK_OWNER)
    if not hmac.compare_digest(back, probe):
        raise KekError(f"the KEK {kek.ref!r} did not round-trip a key")
    return kek.ref


def kek_fingerprint(kek: Kek) -> str:
    """What identifies ``kek`` without revealing it, for the database to record and every
    broker to compare at start: for the local KEK an HMAC of a fixed label under the key, for a
    Key Vault KEK the key's identifier without a version (a rotation inside the key keeps it).
    A KEK without a ``fingerprint`` attribute is known by its ref."""
    fingerprint = getattr(kek, "fingerprint", None)
    return str(fingerprint) if fingerprint else kek.ref


@contextmanager
def plain_data_key(kek: Kek, record: DataKeyRecord) -> Iterator[bytearray]:
    """Unwraps ``record`` with ``kek`` and yields the plain key, zeroed when the block ends.

    Raises:
        KekError: the key does not unwrap.
        CustodyError: the unwrapped key is not 32 bytes.
    """
    if kek.ref != record.kek_ref:
        raise KekError(
            f"data key {record.key_id!r} is wrapped by {record.kek_ref!r}, not {kek.ref!r}"
        )
    key = bytearray(kek.unwrap(record.wrapped_key, key_id=record.key_id, owner=record.owner))
    try:
        check_data_key(key)
        yield key
    finally:
        zero(key)


# --- registration ---------------------------------------------------------------------------


def load_or_create_registration_key(
    path: str | os.PathLike[str], *, kem: int = KEM_X25519, create: bool = True
) -> RecipientPrivateKey:
    """The broker's HPKE key that parties seal their data keys to, created (0600) if new.

    ``kem`` only matters when the key is created; an existing key keeps its own KEM.

    Raises:
        CustodyError: the file is missing (and ``create`` is false), is readable or writable by
            group or others, or cannot be read, parsed or written.
    """
    p = Path(path)
    if create and not p.exists():
        try:
            key = generate_recipient_key(kem=kem)
            tmp = p.with_name(f".{p.name}.{secrets.token_hex(8)}.tmp")
            _ensure_private_dir(p.parent)
            try:
                write_private_key(key, tmp)
                _link_into_place(tmp, p)
            finally:
                tmp.unlink(missing_ok=True)
                key.close()
        except SealingError as e:
            raise CustodyError(f"cannot create the registration key {p}: {e}") from e
        except OSError as e:
            raise CustodyError(f"cannot create the registration key {p}: {e.strerror}") from e
    if not create and not p.exists():
        raise CustodyError(
            f"the registration key {p} does not exist "
            "(create it with `cleanroom broker init --config FILE`)"
        )
    _check_private_file(p, CustodyError)
    try:
        return load_private_key(p)
    except SealingError as e:
        raise CustodyError(f"cannot load the registration key {p}: {e}") from e


# --- secret files ---------------------------------------------------------------------------


def _ensure_private_dir(directory: Path) -> None:
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def _link_into_place(tmp: Path, final: Path) -> None:
    # A hard link appears atomically and fails if the name exists, so a reader never sees a
    # half-written file and, when two processes race, the first one's key wins for both.
    try:
        os.link(tmp, final)
    except FileExistsError:
        pass
    _fsync_dir(final.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _create_secret_file(path: Path, secret: bytes) -> None:
    """Writes ``secret`` to a new file with mode 0600 (O_CREAT|O_EXCL), atomically.

    Raises:
        KekError: the file cannot be written.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        _ensure_private_dir(path.parent)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(secret)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        _link_into_place(tmp, path)
    except OSError as e:
        raise KekError(f"cannot create the KEK file {path}: {e.strerror or e}") from e
    finally:
        tmp.unlink(missing_ok=True)


def _check_private_file(path: Path, error: type[CustodyError]) -> os.stat_result:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError as e:
        raise error(f"{path} does not exist") from e
    except OSError as e:
        raise error(f"cannot inspect {path}: {e.strerror or e}") from e
    _check_private_stat(path, st, error)
    return st


def _check_private_stat(path: Path, st: os.stat_result, error: type[CustodyError]) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise error(
            f"{path} has mode {mode:04o}: a key file must not be readable or writable by group "
            f"or others; fix it with 'chmod 600 {path}' after checking who may have read it"
        )
    if st.st_uid != os.geteuid():
        raise error(f"{path} is owned by uid {st.st_uid}, not by this process (uid {os.geteuid()})")


def _read_secret_file(path: Path, size: int) -> bytearray:
    """Reads exactly ``size`` bytes from a private (0600, own) regular file into a bytearray.

    Raises:
        KekError: the file is missing, not private, not a regular file or of the wrong size.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise KekError(
            f"the KEK file {path} does not exist "
            "(create it with `cleanroom broker init --config FILE`)"
        ) from e
    except OSError as e:
        raise KekError(f"cannot open the KEK file {path}: {e.strerror or e}") from e
    try:
        # Checked on the open descriptor, so the file checked is the file read.
        _check_private_stat(path, os.fstat(fd), KekError)
        buffer = bytearray(size + 1)
        view = memoryview(buffer)
        filled = 0
        while filled < len(buffer):
            n = os.readv(fd, [view[filled:]])
            if n == 0:
                break
            filled += n
        view.release()
        if filled != size:
            zero(buffer)
            raise KekError(
                f"the KEK file {path} must hold exactly {size} bytes"
                + (f", it holds {filled}" if filled < size else "")
            )
        del buffer[size:]
        return buffer
    except OSError as e:
        raise KekError(f"cannot read the KEK file {path}: {e.strerror or e}") from e
    finally:
        os.close(fd)

"""Certificate revocation lists (CRLs) for the clean room's mTLS identities.

The CA made by ``cleanroom pki init`` signs one CRL, ``crl.pem`` in its directory:
:func:`revoke` adds a certificate's serial to it, :func:`refresh` re-signs it with a new
nextUpdate. Both re-sign the whole list with the CA key, bump its CRL number and write it
atomically, so a reader (the broker) sees the old list or the new one, never half of one.

:class:`RevocationList` is the reader's side: it loads one or more CRL files, accepts each
only if a CA certificate of the trust bundle signed it and it is not past its nextUpdate, and
then answers "is this certificate revoked?" by (issuer, serial) with one dictionary lookup.
:class:`CrlWatcher` keeps a :class:`RevocationList` current for a long-running server: it
re-reads the files when they change, looking at most once per ``check_interval``, and fails
closed (every check raises) while a file is unreadable, unsigned or stale.

grpcio's Python TLS has no CRL option, so servers check revocation after the handshake, per
call, with the certificate the peer presented (see ``broker/server/interceptor.py``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

from pki.ca import CLOCK_SKEW, load_ca, write_file_atomic
from pki.errors import (
    CertificateFileError,
    CertificateRevokedError,
    CrlError,
    CrlExpiredError,
    CrlFileError,
    CrlSignatureError,
    UntrustedCertificateError,
)
from pki.tls import load_certificates, read_bounded_file

log = logging.getLogger(__name__)

#: The CRL's file name in the PKI directory (next to ``ca.crt``).
CRL_FILE: Final = "crl.pem"
#: A CRL is public; anyone may read it.
CRL_FILE_MODE: Final = 0o644
#: Days from signing to the CRL's nextUpdate, unless told otherwise.
DEFAULT_CRL_DAYS: Final = 7
#: A CRL file larger than this is refused rather than parsed (a CRL of 100,000 entries is
#: about 4 MiB).
MAX_CRL_FILE_SIZE: Final = 16 << 20
#: How often, at most, :class:`CrlWatcher` looks at the files' modification times.
DEFAULT_CHECK_INTERVAL: Final = 1.0
_LOCK_FILE: Final = ".crl.lock"

#: Revocation reasons by the names the CLI takes (RFC 5280 reason codes). ``certificateHold``
#: is left out on purpose: a revocation here is final.
REASONS: Final[Mapping[str, x509.ReasonFlags | None]] = {
    # RFC 5280 asks CAs not to write the "unspecified" code; the entry simply has no reason.
    "unspecified": None,
    "key-compromise": x509.ReasonFlags.key_compromise,
    "ca-compromise": x509.ReasonFlags.ca_compromise,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
    "privilege-withdrawn": x509.ReasonFlags.privilege_withdrawn,
}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _fmt(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


# --- reading and trusting one CRL ----------------------------------------------------------


def read_crl(path: Path | str) -> x509.CertificateRevocationList:
    """Reads a CRL file (PEM, or DER) without judging whether it can be trusted.

    Raises:
        CrlFileError: the file is missing, unreadable, not a regular file, too large or not a
            CRL.
    """
    p = Path(path)
    data = read_bounded_file(p, max_size=MAX_CRL_FILE_SIZE, kind="a CRL", error=CrlFileError)
    try:
        if b"-----BEGIN X509 CRL-----" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as e:
        raise CrlFileError(f"{p} is not a certificate revocation list: {e}") from e


def _may_sign_crls(ca: x509.Certificate) -> bool:
    try:
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True  # No keyUsage extension: every use is allowed (RFC 5280, 4.2.1.3).
    return usage.crl_sign


def crl_signer(
    crl: x509.CertificateRevocationList, cas: Sequence[x509.Certificate], *, what: str = "CRL"
) -> x509.Certificate:
    """The CA certificate of ``cas`` that signed ``crl``.

    Raises:
        CrlSignatureError: no CA of ``cas`` with the CRL's issuer name (and the right to sign
            CRLs) has a key under which the CRL's signature verifies.
    """
    for ca in cas:
        if ca.subject != crl.issuer or not _may_sign_crls(ca):
            continue
        try:
            if crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
                return ca
        except (TypeError, ValueError, InvalidSignature):
            continue
    raise CrlSignatureError(
        f"{what} (issuer {crl.issuer.rfc4514_string()!r}) is not signed by a CA of the trust bundle"
    )


def _check_fresh(crl: x509.CertificateRevocationList, now: dt.datetime, what: str) -> dt.datetime:
    next_update = crl.next_update_utc
    if next_update is None:
        raise CrlExpiredError(f"{what} has no nextUpdate time, so it cannot be judged fresh")
    if now > next_update:
        raise CrlExpiredError(
            f"{what} is stale: its nextUpdate was {_fmt(next_update)} "
            "(re-sign it with `cleanroom pki crl`)"
        )
    return next_update


# --- the reader's side ---------------------------------------------------------------------


@dataclass(frozen=True)
class RevokedEntry:
    """One revoked certificate as a CRL lists it."""

    issuer: str  #: The issuing CA's name (RFC 4514).
    serial: int
    revoked_at: dt.datetime
    reason: str | None  #: The RFC 5280 reason code's name, or None when the entry has none.
    source: str  #: The CRL file that lists it.

    def error(self) -> CertificateRevokedError:
        """The error that refuses a certificate because of this entry."""
        return CertificateRevokedError(
            f"certificate serial {self.serial:#x} of {self.issuer!r} was revoked on "
            f"{_fmt(self.revoked_at)} (reason: {self.reason or 'unspecified'}; {self.source})",
            serial=self.serial,
            issuer=self.issuer,
            reason=self.reason,
            source=self.source,
        )


@functools.lru_cache(maxsize=4096)
def _issuer_and_serial(der: bytes) -> tuple[bytes, int]:
    # Peers present the same certificate on every call; parsing it once keeps the revocation
    # check at a dictionary lookup per call.
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as e:
        raise CertificateFileError(f"the certificate cannot be parsed: {e}") from e
    return cert.issuer.public_bytes(), cert.serial_number


def _entry_reason(entry: x509.RevokedCertificate) -> str | None:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
    except x509.ExtensionNotFound:
        return None


class RevocationList:
    """The revoked certificates of one or more verified CRLs, keyed by (issuer, serial).

    Build it with :meth:`load`. A certificate whose CA has no CRL among the files is never
    reported revoked: configure a CRL for every CA whose certificates can be revoked.
    """

    __slots__ = ("_revoked", "files", "next_update")

    def __init__(
        self,
        *,
        revoked: Mapping[tuple[bytes, int], RevokedEntry],
        next_update: dt.datetime | None,
        files: tuple[Path, ...] = (),
    ) -> None:
        self._revoked = dict(revoked)
        #: The earliest nextUpdate of the CRLs (None when there are none): past it, the list is
        #: stale.
        self.next_update = next_update
        self.files = files

    @classmethod
    def load(
        cls,
        crl_files: Sequence[Path | str],
        ca_certs: Sequence[x509.Certificate],
        *,
        now: dt.datetime | None = None,
    ) -> RevocationList:
        """Reads and verifies every CRL file, then indexes their entries.

        Raises:
            CrlFileError: a file is missing, unreadable or not a CRL, or it is an indirect CRL
                (entries of other issuers), which is not supported.
            CrlSignatureError: no CA of ``ca_certs`` signed a CRL.
            CrlExpiredError: a CRL is past its nextUpdate, or has none.
        """
        when = now if now is not None else _now()
        revoked: dict[tuple[bytes, int], RevokedEntry] = {}
        earliest: dt.datetime | None = None
        paths = tuple(Path(f) for f in crl_files)
        for path in paths:
            crl = read_crl(path)
            crl_signer(crl, ca_certs, what=f"CRL {path}")
            next_update = _check_fresh(crl, when, f"CRL {path}")
            earliest = next_update if earliest is None else min(earliest, next_update)
            issuer_der = crl.issuer.public_bytes()
            issuer = crl.issuer.rfc4514_string()
            for entry in crl:
                try:
                    entry.extensions.get_extension_for_class(x509.CertificateIssuer)
                except x509.ExtensionNotFound:
                    pass
                else:
                    # An entry naming another issuer would be keyed wrongly here; refusing the
                    # file is safer than silently not revoking.
                    raise CrlFileError(f"CRL {path} is an indirect CRL, which is not supported")
                revoked[(issuer_der, entry.serial_number)] = RevokedEntry(
                    issuer=issuer,
                    serial=entry.serial_number,
                    revoked_at=entry.revocation_date_utc,
                    reason=_entry_reason(entry),
                    source=str(path),
                )
        return cls(revoked=revoked, next_update=earliest, files=paths)

    def __len__(self) -> int:
        return len(self._revoked)

    def entries(self) -> tuple[RevokedEntry, ...]:
        """Every revoked certificate, in no particular order."""
        return tuple(self._revoked.values())

    def lookup(self, cert: x509.Certificate) -> RevokedEntry | None:
        """The entry that revokes ``cert``, or None."""
        return self._revoked.get((cert.issuer.public_bytes(), cert.serial_number))

    def is_revoked(self, cert: x509.Certificate) -> bool:
        """Whether a CRL of the list revokes ``cert`` (a lookup; :meth:`check` raises)."""
        return self.lookup(cert) is not None

    def check(self, cert: x509.Certificate) -> None:
        """Raises: CertificateRevokedError: a CRL of the list revokes ``cert``."""
        entry = self.lookup(cert)
        if entry is not None:
            raise entry.error()

    def check_der(self, der: bytes) -> None:
        """:meth:`check` for a DER certificate, parsed once per distinct certificate.

        Raises:
            CertificateRevokedError: a CRL of the list revokes the certificate.
            CertificateFileError: the bytes are not a certificate.
        """
        entry = self._revoked.get(_issuer_and_serial(der))
        if entry is not None:
            raise entry.error()

    def is_stale(self, now: dt.datetime | None = None) -> bool:
        """Whether a CRL of the list is past its nextUpdate at ``now``."""
        when = now if now is not None else _now()
        return self.next_update is not None and when > self.next_update


# --- keeping a list current in a server ------------------------------------------------------


@dataclass(frozen=True)
class _State:
    current: RevocationList
    problem: CrlError | None


_FileStamp = tuple[tuple[int, int, int, int], ...]


class CrlWatcher:
    """A :class:`RevocationList` that follows its files, for a long-running server.

    :meth:`check_der` is meant for every call: it costs a clock read and a dictionary lookup.
    At most once per ``check_interval`` seconds, one calling thread also stats the files; when
    one changed (mtime, size or inode) the whole list is reloaded and verified again, and when
    none changed the list is checked against its nextUpdate.

    It fails closed: while a file is missing, unreadable, unsigned by the trust bundle or
    stale, every :meth:`check_der` raises that :class:`~pki.errors.CrlError` (logged once,
    when the problem appears), and checks succeed again as soon as the files are good. The
    operator's intent is the file on disk, so the broker never keeps applying an older list
    than the one written there: a revocation that the broker cannot read must not look like
    one that took effect.
    """

    def __init__(
        self,
        *,
        crl_files: Sequence[Path | str],
        ca_certs: Sequence[x509.Certificate],
        check_interval: float = DEFAULT_CHECK_INTERVAL,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], dt.datetime] = _now,
    ) -> None:
        """Loads the files once; a problem here is raised, not deferred.

        Raises:
            CrlFileError, CrlSignatureError, CrlExpiredError: as :meth:`RevocationList.load`.
        """
        self.files = tuple(Path(f) for f in crl_files)
        self._cas = tuple(ca_certs)
        self._interval = check_interval
        self._monotonic = monotonic
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp: _FileStamp | None = self._stamp_files()
        self._state = _State(RevocationList.load(self.files, self._cas, now=clock()), None)
        self._next_check = monotonic() + check_interval

    @classmethod
    def from_files(
        cls,
        *,
        crl_files: Sequence[Path | str],
        ca_file: Path | str,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
    ) -> CrlWatcher:
        """A watcher whose CRLs must be signed by a CA of the PEM bundle ``ca_file``.

        Raises:
            CertificateFileError: the bundle is unreadable or malformed.
            CrlFileError, CrlSignatureError, CrlExpiredError: as :meth:`RevocationList.load`.
        """
        return cls(
            crl_files=crl_files,
            ca_certs=load_certificates(ca_file),
            check_interval=check_interval,
        )

    @property
    def current(self) -> RevocationList:
        """The list last loaded successfully."""
        return self._state.current

    @property
    def problem(self) -> CrlError | None:
        """Why checks fail right now, or None when the list is usable."""
        return self._state.problem

    def check_der(self, der: bytes) -> None:
        """Refuses a revoked certificate, or any certificate while the CRLs are unusable.

        Raises:
            CertificateRevokedError: the certificate is revoked.
            CrlError: a CRL file is unusable or stale (fail closed); the subclass says why.
            CertificateFileError: the bytes are not a certificate.
        """
        if self._monotonic() >= self._next_check:
            self.poll()
        state = self._state
        if state.problem is not None:
            # A fresh exception per call: one instance raised in many threads at once would
            # share (and garble) its traceback.
            raise type(state.problem)(str(state.problem))
        state.current.check_der(der)

    def poll(self) -> None:
        """Reloads changed files and checks freshness now (if no other thread is doing so)."""
        if not self._lock.acquire(blocking=False):
            return  # another thread is polling; this call uses the state it finds
        try:
            self._next_check = self._monotonic() + self._interval
            self._poll_locked()
        finally:
            self._lock.release()

    def _poll_locked(self) -> None:
        try:
            stamp = self._stamp_files()
        except CrlFileError as e:
            self._stamp = None
            self._fail(e)
            return
        now = self._clock()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                fresh = RevocationList.load(self.files, self._cas, now=now)
            except CrlError as e:
                self._fail(e)
                return
            recovered = self._state.problem is not None
            self._state = _State(fresh, None)
            log.log(
                logging.WARNING if recovered else logging.INFO,
                "certificate revocation lists reloaded: %d revoked certificate(s)%s",
                len(fresh),
                " (checks work again)" if recovered else "",
            )
            return
        state = self._state
        if state.problem is None and state.current.is_stale(now):
            assert state.current.next_update is not None
            self._fail(
                CrlExpiredError(
                    "a certificate revocation list is stale: its nextUpdate was "
                    f"{_fmt(state.current.next_update)} (re-sign it with `cleanroom pki crl`)"
                )
            )

    def _fail(self, problem: CrlError) -> None:
        old = self._state.problem
        self._state = _State(self._state.current, problem)
        if old is None or str(old) != str(problem):
            log.error(
                "refusing every client certificate until the revocation lists are usable: %s",
                problem,
            )

    def _stamp_files(self) -> _FileStamp:
        out = []
        for path in self.files:
            try:
                st = path.stat()
            except FileNotFoundError:
                raise CrlFileError(f"{path} does not exist") from None
            except OSError as e:
                raise CrlFileError(f"cannot read {path}: {e.strerror or e}") from e
            out.append((st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev))
        return tuple(out)


# --- the CA's side --------------------------------------------------------------------------


@dataclass(frozen=True)
class CrlInfo:
    """What :func:`revoke` or :func:`refresh` wrote."""

    path: Path
    number: int  #: The CRL number (grows with every signing).
    entries: int  #: How many certificates it revokes.
    next_update: dt.datetime


@dataclass(frozen=True)
class Revocation:
    """The result of :func:`revoke`."""

    crl: CrlInfo
    serial: int
    #: False when the certificate was already on the list (its entry is kept as it was).
    newly_revoked: bool


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    # Two revocations at once would each read the old list and one would be lost; an exclusive
    # lock on a file in the PKI directory serialises them (and a concurrent refresh).
    try:
        fd = os.open(directory / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise CrlFileError(f"cannot lock the CRL in {directory}: {e.strerror or e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _existing_crl(path: Path, ca_cert: x509.Certificate) -> x509.CertificateRevocationList | None:
    if not (path.exists() or path.is_symlink()):
        return None
    crl = read_crl(path)
    # Re-signing a list this CA did not sign would launder someone else's entries (or hide a
    # mix-up of PKI directories); staleness does not matter here, re-signing cures it.
    crl_signer(crl, [ca_cert], what=f"the existing {path}")
    return crl


def _crl_number(crl: x509.CertificateRevocationList | None) -> int:
    if crl is None:
        return 1
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    except x509.ExtensionNotFound:
        return 1


def _sign(
    directory: Path,
    *,
    days: int,
    now: dt.datetime | None,
    add: Callable[
        [x509.Certificate, x509.CertificateRevocationList | None, dt.datetime],
        list[x509.RevokedCertificate],
    ],
) -> CrlInfo:
    if days <= 0:
        raise CrlError("the CRL's validity (days) must be positive")
    ca_key, ca_cert = load_ca(directory)
    path = directory / CRL_FILE
    when = now if now is not None else _now()
    with _locked(directory):
        old = _existing_crl(path, ca_cert)
        entries = list(old) if old is not None else []
        entries += add(ca_cert, old, when)
        number = _crl_number(old)
        next_update = when + dt.timedelta(days=days)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            # Backdated like certificates, for readers whose clock runs a little behind.
            .last_update(when - CLOCK_SKEW)
            .next_update(next_update)
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        for entry in entries:
            builder = builder.add_revoked_certificate(entry)
        crl = builder.sign(ca_key, hashes.SHA256())
        write_file_atomic(path, crl.public_bytes(serialization.Encoding.PEM), mode=CRL_FILE_MODE)
    return CrlInfo(path=path, number=number, entries=len(entries), next_update=next_update)


def revoke(
    pki_dir: Path,
    cert_file: Path | str,
    *,
    reason: str = "unspecified",
    days: int = DEFAULT_CRL_DAYS,
    now: dt.datetime | None = None,
) -> Revocation:
    """Adds the certificate in ``cert_file`` to the CRL of the CA in ``pki_dir`` and re-signs it.

    The CRL is ``pki_dir/crl.pem`` (created when missing), valid for ``days``. Revoking a
    certificate that is already listed keeps its original entry and only re-signs the list.

    Raises:
        CrlError: an unknown ``reason``, ``days`` not positive, or ``cert_file`` holds the CA
            certificate itself.
        CertificateFileError: ``cert_file`` or the CA files are missing or malformed.
        UntrustedCertificateError: the certificate was not issued by the CA in ``pki_dir``.
        IssuanceError: the CA key does not match the CA certificate.
        CrlFileError, CrlSignatureError: the existing ``crl.pem`` is unreadable or was not
            signed by this CA.
        PKIFileError: the CRL cannot be written.
    """
    if reason not in REASONS:
        raise CrlError(f"unknown revocation reason {reason!r} (one of {', '.join(REASONS)})")
    flag = REASONS[reason]
    cert = load_certificates(cert_file)[0]
    newly = False

    def add(
        ca_cert: x509.Certificate, old: x509.CertificateRevocationList | None, when: dt.datetime
    ) -> list[x509.RevokedCertificate]:
        nonlocal newly
        if cert == ca_cert:
            raise CrlError(f"{cert_file} is the CA certificate; rotate the CA instead")
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise UntrustedCertificateError(
                f"{cert_file} was not issued by the CA in {pki_dir}"
            ) from e
        if old is not None and old.get_revoked_certificate_by_serial_number(cert.serial_number):
            return []
        newly = True
        builder = (
            x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(when)
        )
        if flag is not None:
            builder = builder.add_extension(x509.CRLReason(flag), critical=False)
        return [builder.build()]

    info = _sign(pki_dir, days=days, now=now, add=add)
    return Revocation(crl=info, serial=cert.serial_number, newly_revoked=newly)


def refresh(
    pki_dir: Path, *, days: int = DEFAULT_CRL_DAYS, now: dt.datetime | None = None
) -> CrlInfo:
    """Re-signs the CRL of the CA in ``pki_dir`` with a nextUpdate ``days`` from now.

    Creates an empty CRL when there is none yet, so that a broker can be given one before
    anything is revoked.

    Raises:
        CrlError: ``days`` is not positive.
        CertificateFileError: the CA files are missing or malformed.
        IssuanceError: the CA key does not match the CA certificate.
        CrlFileError, CrlSignatureError: the existing ``crl.pem`` is unreadable or was not
            signed by this CA.
        PKIFileError: the CRL cannot be written.
    """
    return _sign(pki_dir, days=days, now=now, add=lambda ca, old, when: [])


__all__ = [
    "CRL_FILE",
    "DEFAULT_CHECK_INTERVAL",
    "DEFAULT_CRL_DAYS",
    "REASONS",
    "CrlInfo",
    "CrlWatcher",
    "Revocation",
    "RevocationList",
    "RevokedEntry",
    "crl_signer",
    "read_crl",
    "refresh",
    "revoke",
]

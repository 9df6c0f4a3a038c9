"""The TPM adapter: ESAPI through tpm2-pytss, doing what the manual recipe did with tpm2-tools.

Every transient object and session this module creates is flushed before the method that made
it returns (the AK kept as a key blob stays loaded until :meth:`Tpm.close`): without a resource
manager (swtpm, or ``/dev/tpm0``) anything left behind fills the TPM's few object slots for
every later process. The EK is re-created from the endorsement seed whenever it is needed; the
TPM derives the same key each time, so nothing has to stay loaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_HT,
    TPM2_PT_NV,
    TPM2_RC,
    TPM2_SE,
    TPM2B_DATA,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_NV_PUBLIC,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMA_NV,
    TPMA_OBJECT,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMS_NV_PUBLIC,
    TPMT_HA,
    TPMT_SIG_SCHEME,
    TPMU_HA,
    TSS2_Exception,
)
from tpm2_pytss.utils import NoSuchIndex, NVReadEK, create_ek_template

from evidence.errors import MeasurementError
from evidence.launch import Launch
from evidence.pcr import (
    BANK_SIZES,
    WORKLOAD_PCR,
    Measurement,
    MeasurementEvent,
    digest_file,
    launch_event,
    replay,
)
from sidecar.config import TpmConfig
from sidecar.errors import (
    AkMismatchError,
    CredentialActivationError,
    InvalidNonceError,
    PcrMismatchError,
    PcrNotAvailableError,
    PcrResetError,
    QuoteError,
    TpmCommandError,
    TpmError,
    TpmLockoutError,
    TpmUnavailableError,
    WorkloadMeasurementError,
)
from sidecar.tpm.files import write_file, write_tools_quote_files
from sidecar.tpm.interface import AkInfo, EkInfo, PcrKey, QuoteResult

log = logging.getLogger("sidecar.tpm")

#: TCG EK credential profile NV indices of the EK certificates the sidecar reads.
EK_CERT_INDEX: Mapping[str, int] = {"rsa": 0x01C00002, "ecc": 0x01C0000A}
_EK_TEMPLATE_NAME = {"rsa": "EK-RSA2048", "ecc": "EK-ECC256"}

#: The largest qualifying data a quote takes (TPM2B_DATA holds one TPMU_HA: a SHA-512 digest).
MAX_QUALIFYING_DATA = 64

_HIGHEST_PCR = 23
_BANK_ALG: Mapping[str, int] = {
    "sha1": TPM2_ALG.SHA1,
    "sha256": TPM2_ALG.SHA256,
    "sha384": TPM2_ALG.SHA384,
}
_ALG_BANK: Mapping[int, str] = {int(v): k for k, v in _BANK_ALG.items()}
_BANK_ORDER: Mapping[str, int] = {bank: i for i, bank in enumerate(_BANK_ALG)}

# tpm2_createak's attributes: a restricted signing key that never leaves this TPM, whose
# private part the TPM generated, used with its (empty) password.
_AK_ATTRIBUTES = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
)
_AK_SPEC = {"rsa": "rsa2048:rsassa-sha256:null", "ecc": "ecc256:ecdsa-sha256:null"}
_AK_SCHEME = {"rsa": TPM2_ALG.RSASSA, "ecc": TPM2_ALG.ECDSA}
# Retries when a PCR changes between TPM2_Quote and TPM2_PCR_Read (another process extending).
_QUOTE_ATTEMPTS = 3
_TCTI_LAYER = 10 << 16
_LAYER_MASK = 0xFF << 16
# TPM response codes come from the TPM itself (layer 0) or through a resource manager, which
# passes them on in its own layer (11).
_TPM_LAYERS = (0, 11 << 16)

#: The one-line explanation of a dictionary-attack lockout: its cause and the fixes.
LOCKOUT_HINT = (
    "the TPM is in dictionary-attack lockout (too many failed authorizations, or unclean "
    "shutdowns of the TPM) and refuses to use the AK; clear it with "
    "'tpm2_dictionarylockout --clear-lockout' (with the lockout authorization, -p, if one is "
    "set), or wait for the TPM's recovery time (tpm2_getcap properties-variable shows "
    "TPM2_PT_LOCKOUT_COUNTER and TPM2_PT_LOCKOUT_INTERVAL)"
)


def is_lockout(rc: int) -> bool:
    """True when ``rc`` (a TSS2 response code) says the TPM is in dictionary-attack lockout or
    rate-limits the failure counter's writes."""
    return rc & _LAYER_MASK in _TPM_LAYERS and rc & 0xFFFF in (
        int(TPM2_RC.LOCKOUT),
        int(TPM2_RC.NV_RATE),
    )


def _ak_template(algorithm: str) -> Any:
    return TPM2B_PUBLIC.parse(
        _AK_SPEC[algorithm], objectAttributes=_AK_ATTRIBUTES, nameAlg="sha256"
    )


def _template_of(public: Any) -> bytes:
    """The public area with its key bytes removed: what the creation template fixed."""
    copy, _ = TPM2B_PUBLIC.unmarshal(public.marshal())
    area = copy.publicArea
    if area.type == TPM2_ALG.RSA:
        area.unique.rsa = b""
    elif area.type == TPM2_ALG.ECC:
        area.unique.ecc.x = b""
        area.unique.ecc.y = b""
    return bytes(copy.publicArea.marshal())


def _selection_string(selection: Mapping[str, Iterable[int]]) -> str:
    parts = []
    for bank, indices in selection.items():
        chosen = sorted(set(indices))
        if chosen:
            parts.append(f"{bank}:{','.join(str(i) for i in chosen)}")
    return "+".join(parts)


def _selection_keys(selection: Any) -> list[PcrKey]:
    """The (index, bank) pairs of a TPML_PCR_SELECTION in the order the TPM hashes them."""
    keys: list[PcrKey] = []
    for sel in selection:
        bank = _ALG_BANK.get(int(sel.hash))
        if bank is None:
            raise TpmError(f"the TPM returned PCRs of an unsupported bank ({sel.hash})")
        bitmap = bytes(sel.pcrSelect)[: sel.sizeofSelect]
        for index in range(len(bitmap) * 8):
            if bitmap[index // 8] & (1 << (index % 8)):
                keys.append((index, bank))
    return keys


def _check_quoted(requested: set[PcrKey], quoted: Sequence[PcrKey]) -> None:
    """Raises PcrNotAvailableError unless the TPM quoted exactly the requested PCRs."""
    got = set(quoted)
    if got == requested:
        return

    def listing(keys: Iterable[PcrKey]) -> str:
        by_bank: dict[str, list[int]] = {}
        for index, bank in sorted(keys, key=lambda k: (_BANK_ORDER.get(k[1], 99), k[0])):
            by_bank.setdefault(bank, []).append(index)
        return _selection_string(by_bank) or "nothing"

    missing = requested - got
    if missing:
        banks = sorted({bank for _, bank in missing}, key=lambda b: _BANK_ORDER.get(b, 99))
        raise PcrNotAvailableError(
            f"the TPM did not quote {listing(missing)} (asked for {listing(requested)}, "
            f"quoted {listing(got)}): is the {' and '.join(banks)} PCR bank allocated in this "
            "TPM? (tpm2_getcap pcrs lists the allocated banks)"
        )
    raise PcrNotAvailableError(
        f"the TPM quoted {listing(got - requested)}, which was not asked for "
        f"(asked for {listing(requested)})"
    )


def _check_pcr_index(index: int) -> None:
    if not 0 <= index <= _HIGHEST_PCR:
        raise TpmError(f"PCR index {index} is outside 0..{_HIGHEST_PCR}")


def _check_bank(bank: str) -> int:
    alg = _BANK_ALG.get(bank)
    if alg is None:
        raise TpmError(f"unsupported PCR bank {bank!r} (supported: {', '.join(_BANK_ALG)})")
    return alg


@dataclass
class _LoadedAk:
    handle: Any
    public: Any
    transient: bool
    info: AkInfo


class Tpm:
    """A TPM reached through one TCTI: EK, AK, PCRs and quotes for the sidecar.

    Use as a context manager (``with Tpm(config) as tpm:``); the ESAPI context and its TCTI
    connection are opened on entry and closed, after flushing what is still loaded, on exit.

    Raises:
        TpmUnavailableError: (on entry) the TCTI cannot be initialised or the TPM not reached.
    """

    #: Writes a :class:`QuoteResult` as tpm2_quote's three files (see :mod:`sidecar.tpm.files`).
    write_tools_quote_files = staticmethod(write_tools_quote_files)

    def __init__(self, config: TpmConfig | None = None) -> None:
        self._config = config if config is not None else TpmConfig()
        self._esapi: Any = None
        self._ak: _LoadedAk | None = None

    @property
    def config(self) -> TpmConfig:
        return self._config

    # --- lifecycle ---------------------------------------------------------------------------

    def open(self) -> Tpm:
        """Opens the ESAPI context on the configured TCTI.

        Raises:
            TpmUnavailableError: the TCTI cannot be loaded or initialised (for swtpm and the
                device TCTIs this is where a TPM that is not running or not present shows up).
        """
        if self._esapi is not None:
            return self
        tcti = self._config.tcti
        try:
            self._esapi = ESAPI(tcti)
        except TSS2_Exception as e:
            raise TpmUnavailableError(f"cannot reach the TPM through TCTI {tcti!r}: {e}") from e
        except (ValueError, RuntimeError, OSError) as e:
            raise TpmUnavailableError(f"cannot load TCTI {tcti!r}: {e}") from e
        log.debug("opened TPM at TCTI %s", tcti)
        return self

    def close(self) -> None:
        """Flushes the AK if it was loaded from a key blob and closes the ESAPI context."""
        if self._esapi is None:
            return
        try:
            if self._ak is not None:
                if self._ak.transient:
                    self._flush(self._ak.handle)
                else:
                    # A persistent object stays in the TPM; only ESAPI's record of it goes.
                    self._esapi.tr_close(self._ak.handle)
        except TSS2_Exception as e:
            log.warning("could not release the AK handle: %s", e)
        finally:
            self._ak = None
            self._esapi.close()
            self._esapi = None

    def __enter__(self) -> Tpm:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- helpers -----------------------------------------------------------------------------

    @property
    def _ctx(self) -> Any:
        if self._esapi is None:
            raise TpmError("the TPM is not open (use 'with Tpm(config) as tpm:')")
        return self._esapi

    def _translate(self, e: TSS2_Exception, what: str) -> TpmError:
        """The sidecar error for a TSS exception raised while doing ``what``."""
        if int(e.rc) & _LAYER_MASK == _TCTI_LAYER:
            return TpmUnavailableError(
                f"lost the TPM at TCTI {self._config.tcti!r} while {what}: {e}"
            )
        if is_lockout(int(e.rc)):
            return TpmLockoutError(
                f"{what} failed: {LOCKOUT_HINT} (TPM response 0x{int(e.rc):x})", rc=int(e.rc)
            )
        return TpmCommandError(f"{what} failed: {e}", rc=int(e.rc))

    @contextmanager
    def _tss(self, what: str) -> Iterator[None]:
        """Turns a TSS exception raised while doing ``what`` into the sidecar's errors."""
        try:
            yield
        except TSS2_Exception as e:
            raise self._translate(e, what) from e

    def _flush(self, handle: Any) -> None:
        try:
            self._ctx.flush_context(handle)
        except TSS2_Exception as e:
            # Raising here would hide the error that brought us to a finally block; the test
            # suite checks that no handle stays behind.
            log.error("could not flush TPM handle %s: %s", handle, e)

    @contextmanager
    def _transient(self, handle: Any) -> Iterator[Any]:
        try:
            yield handle
        finally:
            self._flush(handle)

    def _handles(self, handle_type: int) -> set[int]:
        """Handles of one type (NV index, persistent object) that exist in the TPM now."""
        found: set[int] = set()
        prop = handle_type << 24
        more = True
        with self._tss("listing TPM handles"):
            while more:
                more, data = self._ctx.get_capability(TPM2_CAP.HANDLES, prop, 64)
                batch = [int(h) for h in data.data.handles if int(h) >> 24 == handle_type]
                if not batch:
                    break
                found.update(batch)
                prop = max(batch) + 1
        return found

    @contextmanager
    def _ek(self) -> Iterator[tuple[Any, Any, bytes | None]]:
        """Creates the EK (transient) from the standard template; yields handle, public, cert."""
        algorithm = self._config.ek_algorithm
        present = self._handles(TPM2_HT.NV_INDEX)
        with self._tss("reading the EK template and certificate from NV"):
            reader = NVReadEK(self._ctx)

            def nv_read(index: int) -> bytes:
                # Probing absent indices through ESAPI works but floods the TSS log with
                # errors, so look them up in the list of defined indices first.
                if int(index) not in present:
                    raise NoSuchIndex(index)
                return bytes(reader(index))

            cert, template = create_ek_template(_EK_TEMPLATE_NAME[algorithm], nv_read)
        with self._tss(f"creating the {algorithm.upper()} EK"):
            handle, public, _, _, _ = self._ctx.create_primary(
                TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
            )
        with self._transient(handle):
            yield handle, public, (bytes(cert) if cert else None)

    @contextmanager
    def _ek_policy_session(self) -> Iterator[Any]:
        """A policy session satisfying the EK's policy: PolicySecret(endorsement hierarchy)."""
        with self._tss("starting the EK policy session"):
            session = self._ctx.start_auth_session(
                tpm_key=ESYS_TR.NONE,
                bind=ESYS_TR.NONE,
                session_type=TPM2_SE.POLICY,
                symmetric=None,
                auth_hash=TPM2_ALG.SHA256,
            )
        with self._transient(session):
            with self._tss("satisfying the EK policy (PolicySecret on the endorsement hierarchy)"):
                self._ctx.policy_secret(ESYS_TR.ENDORSEMENT, session)
            yield session

    def _ak_info(self, public: Any, *, handle: int | None, created: bool) -> AkInfo:
        algorithm: Literal["rsa", "ecc"] = self._config.ak_algorithm
        return AkInfo(
            algorithm=algorithm,
            public=bytes(public.marshal()),
            pem=bytes(public.to_pem()),
            name=bytes(public.get_name()),
            handle=handle,
            created=created,
        )

    def _check_ak(self, public: Any, where: str) -> None:
        expected = _template_of(_ak_template(self._config.ak_algorithm))
        if _template_of(public) != expected:
            raise AkMismatchError(
                f"{where} holds a key that is not the sidecar's {self._config.ak_algorithm.upper()}"
                " AK (restricted signing key, tpm2_createak template); choose another AK handle"
                " or file, or remove that key"
            )

    def _create_ak_under(self, ek: Any) -> tuple[Any, Any]:
        """TPM2_Create of the AK under the EK; returns (private, public)."""
        template = _ak_template(self._config.ak_algorithm)
        with self._ek_policy_session() as session, self._tss("creating the AK under the EK"):
            private, public, _, _, _ = self._ctx.create(
                ek, TPM2B_SENSITIVE_CREATE(), template, session1=session
            )
        return private, public

    def _load_ak_under(self, ek: Any, private: Any, public: Any, what: str) -> Any:
        with self._ek_policy_session() as session, self._tss(what):
            return self._ctx.load(ek, private, public, session1=session)

    def _ensure_ak(self) -> _LoadedAk:
        if self._ak is None:
            self.create_or_load_ak()
        assert self._ak is not None
        return self._ak

    # --- EK and AK ---------------------------------------------------------------------------

    def create_ek(self) -> EkInfo:
        """Creates the EK from the TCG template (RSA 2048 or ECC P-256, per the config) and reads
        its certificate from NV (0x01C00002 for RSA, 0x01C0000A for ECC) when present.

        Raises:
            TpmCommandError: the TPM refuses to create the EK or to read NV.
            TpmUnavailableError: the TPM stopped answering.
        """
        with self._ek() as (_, public, cert):
            info = EkInfo(
                algorithm=self._config.ek_algorithm,
                public=bytes(public.marshal()),
                name=bytes(public.get_name()),
                certificate=cert,
                certificate_index=EK_CERT_INDEX[self._config.ek_algorithm],
            )
        log.debug("EK %s, certificate %s", info.name_hex, "present" if cert else "absent")
        return info

    def create_or_load_ak(self) -> AkInfo:
        """Loads the AK from its persistent handle or key blob, creating it there on first use.

        A new AK is created under the EK with the EK's policy session, like ``tpm2_createak``,
        and made persistent (``ak_handle``) or saved as a key blob (``ak_context_file``). The
        same AK, with the same name, is returned after a restart of the TPM or the process.

        Raises:
            AkMismatchError: the handle or file holds a key that is not this AK type.
            TpmCommandError: the TPM refuses to create, load or persist the key.
            FileWriteError: the key blob file cannot be written.
        """
        if self._ak is not None:
            return self._ak.info
        if self._config.ak_handle:
            self._ak = self._persistent_ak(self._config.ak_handle)
        else:
            assert self._config.ak_context_file is not None
            self._ak = self._blob_ak(Path(self._config.ak_context_file))
        log.debug("AK %s (%s)", self._ak.info.name_hex, "new" if self._ak.info.created else "kept")
        return self._ak.info

    def _persistent_ak(self, handle: int) -> _LoadedAk:
        where = f"persistent handle 0x{handle:08x}"
        if handle in self._handles(TPM2_HT.PERSISTENT):
            with self._tss(f"reading the AK at {where}"):
                tr = self._ctx.tr_from_tpmpublic(handle)
                try:
                    public, _, _ = self._ctx.read_public(tr)
                    self._check_ak(public, where)
                except BaseException:
                    self._ctx.tr_close(tr)
                    raise
            return _LoadedAk(tr, public, False, self._ak_info(public, handle=handle, created=False))
        with self._ek() as (ek, _, _):
            private, public = self._create_ak_under(ek)
            transient = self._load_ak_under(ek, private, public, "loading the new AK")
        with self._transient(transient), self._tss(f"persisting the AK at {where}"):
            tr = self._ctx.evict_control(ESYS_TR.OWNER, transient, handle)
        return _LoadedAk(tr, public, False, self._ak_info(public, handle=handle, created=True))

    def _blob_ak(self, path: Path) -> _LoadedAk:
        created = not path.exists()
        with self._ek() as (ek, _, _):
            if created:
                private, public = self._create_ak_under(ek)
                # The blob is the TPM2B_PUBLIC followed by the TPM2B_PRIVATE. The private part
                # is wrapped by the EK, so only this TPM can load it; a tpm2-tools context file
                # (a saved TPMS_CONTEXT) would not survive a TPM reset.
                write_file(path, bytes(public.marshal()) + bytes(private.marshal()), mode=0o600)
            else:
                public, private = self._read_blob(path)
                self._check_ak(public, str(path))
            handle = self._load_ak_under(
                ek, private, public, f"loading the AK blob {path} under the EK"
            )
        return _LoadedAk(handle, public, True, self._ak_info(public, handle=None, created=created))

    @staticmethod
    def _read_blob(path: Path) -> tuple[Any, Any]:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise AkMismatchError(f"cannot read the AK blob {path}: {e.strerror or e}") from e
        try:
            public, used = TPM2B_PUBLIC.unmarshal(data)
            private, used_private = TPM2B_PRIVATE.unmarshal(data[used:])
        except (TSS2_Exception, ValueError, TypeError) as e:
            raise AkMismatchError(f"{path} is not an AK key blob: {e}") from e
        if used + used_private != len(data):
            raise AkMismatchError(f"{path} is not an AK key blob: trailing bytes")
        return public, private

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """Recovers the secret a verifier sealed to this AK's name and the EK (MakeCredential).

        ``credential_blob`` is a marshalled TPM2B_ID_OBJECT and ``encrypted_secret`` a
        marshalled TPM2B_ENCRYPTED_SECRET.

        Raises:
            CredentialActivationError: the inputs are malformed, or the TPM refuses them (made
                for another AK name or another EK).
            TpmUnavailableError: the TPM stopped answering.
        """
        try:
            credential, used = TPM2B_ID_OBJECT.unmarshal(credential_blob)
            secret, used_secret = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        except (TSS2_Exception, ValueError, TypeError) as e:
            raise CredentialActivationError(
                "credential blob or encrypted secret is not a marshalled TPM2B_ID_OBJECT / "
                f"TPM2B_ENCRYPTED_SECRET: {e}"
            ) from e
        if used != len(credential_blob) or used_secret != len(encrypted_secret):
            raise CredentialActivationError(
                "credential blob or encrypted secret has trailing bytes"
            )
        ak = self._ensure_ak()
        with self._ek() as (ek, _, _), self._ek_policy_session() as session:
            try:
                recovered = self._ctx.activate_credential(
                    ak.handle, ek, credential, secret, session1=ESYS_TR.PASSWORD, session2=session
                )
            except TSS2_Exception as e:
                if int(e.rc) & _LAYER_MASK == _TCTI_LAYER or is_lockout(int(e.rc)):
                    raise self._translate(e, "activating a credential") from e
                if e.error == TPM2_RC.INTEGRITY:
                    reason = (
                        "the credential was not made for this AK name and EK "
                        "(integrity check failed)"
                    )
                else:
                    reason = f"the TPM refused it ({e}); was it made for this TPM's EK?"
                raise CredentialActivationError(
                    f"credential activation failed: {reason}", rc=int(e.rc)
                ) from e
        return bytes(recovered)

    # --- PCRs --------------------------------------------------------------------------------

    def reset_pcr(self, index: int = WORKLOAD_PCR) -> None:
        """Resets a PCR to zeros in every bank (``tpm2_pcrreset``).

        Raises:
            PcrResetError: the platform does not allow resetting this PCR at locality 0 (on a
                PC-client TPM only PCR 16 and 23 are resettable there).
            TpmCommandError: another TPM failure.
        """
        _check_pcr_index(index)
        try:
            self._ctx.pcr_reset(ESYS_TR(index))
        except TSS2_Exception as e:
            if e.error == TPM2_RC.LOCALITY:
                # Worded for PCR 23 too: the PC client profile makes it resettable at
                # locality 0, but not every platform's (virtual) TPM follows that profile.
                raise PcrResetError(
                    f"the platform does not allow resetting PCR {index} at this locality "
                    "(the TPM PC client profile allows it at locality 0 for PCR 16 and 23 only, "
                    f"and some platforms not even for those): {e}",
                    rc=int(e.rc),
                ) from e
            raise self._translate(e, f"resetting PCR {index}") from e
        log.debug("reset PCR %d", index)

    def extend(self, index: int, digests: Mapping[str, bytes]) -> None:
        """Extends ``PCR[index]`` in each bank of ``digests`` (``tpm2_pcrextend``).

        Raises:
            TpmError: an unsupported bank or a digest of the wrong size.
            TpmCommandError: the TPM refuses (for instance a bank it has not allocated).
        """
        _check_pcr_index(index)
        values = []
        for bank, digest in digests.items():
            alg = _check_bank(bank)
            if len(digest) != BANK_SIZES[bank]:
                raise TpmError(f"a {bank} digest must be {BANK_SIZES[bank]} bytes")
            values.append(TPMT_HA(hashAlg=alg, digest=TPMU_HA(**{bank: digest})))
        if not values:
            raise TpmError("extend needs at least one digest")
        with self._tss(f"extending PCR {index}"):
            self._ctx.pcr_extend(ESYS_TR(index), TPML_DIGEST_VALUES(values))

    def read_pcrs(self, selection: Mapping[str, Iterable[int]]) -> dict[PcrKey, bytes]:
        """Reads PCR values (``tpm2_pcrread``), e.g. ``{"sha1": [23], "sha256": [23]}``.

        TPM2_PCR_Read answers at most eight values per call, so larger selections are read in
        several calls.

        Raises:
            TpmError: an unsupported bank or PCR index.
            PcrNotAvailableError: the TPM returns no value for a requested PCR (the bank is
                not allocated).
            TpmCommandError: the TPM refuses.
        """
        remaining: dict[str, set[int]] = {}
        for bank, indices in selection.items():
            _check_bank(bank)
            wanted = set(indices)
            for index in wanted:
                _check_pcr_index(index)
            if wanted:
                remaining[bank] = wanted
        values: dict[PcrKey, bytes] = {}
        while any(remaining.values()):
            request = _selection_string(remaining)
            with self._tss(f"reading PCRs {request}"):
                _, returned, digests = self._ctx.pcr_read(TPML_PCR_SELECTION.parse(request))
            keys = _selection_keys(returned)
            progress = False
            for key, digest in zip(keys, digests, strict=True):
                index, bank = key
                if index in remaining.get(bank, set()):
                    values[key] = bytes(digest)
                    remaining[bank].discard(index)
                    progress = True
            if not progress:
                raise PcrNotAvailableError(
                    f"the TPM returned no values for PCRs {request}: "
                    "is that PCR bank allocated in this TPM?"
                )
        return values

    def measure(
        self,
        files: Sequence[str | os.PathLike[str]],
        names: Sequence[str] | None = None,
        *,
        launch: Launch | None = None,
    ) -> Measurement:
        """Measures files into PCR 23, in order, in every configured bank, with an event log,
        then the launch event of ``launch`` when given.

        PCR 23 is reset first; each file is read once in chunks, digested in every bank and
        extended. ``names`` are the paths recorded in the event log (default: as given). The
        PCR is then read back and compared with the event log's replay.

        Raises:
            WorkloadMeasurementError: a file is missing, unreadable or not a regular file (the
                message names it), or names and files differ in length.
            PcrMismatchError: PCR 23 does not equal the replay: something else extended it.
            PcrResetError: the platform does not allow resetting PCR 23.
            TpmCommandError: another TPM failure.
        """
        if names is not None and len(names) != len(files):
            raise WorkloadMeasurementError("names and files must have the same length")
        banks = self._config.banks
        self.reset_pcr(WORKLOAD_PCR)
        events: list[MeasurementEvent] = []
        for i, path in enumerate(files):
            try:
                size, digests = digest_file(path, banks)
            except MeasurementError as e:
                raise WorkloadMeasurementError(str(e)) from e
            self.extend(WORKLOAD_PCR, digests)
            events.append(
                MeasurementEvent(
                    path=str(names[i]) if names is not None else os.fspath(path),
                    size=size,
                    digests=digests,
                )
            )
        if launch is not None:
            event = launch_event(launch, banks)
            self.extend(WORKLOAD_PCR, event.digests)
            events.append(event)
        expected = replay(events, banks)
        actual = self.read_pcrs({bank: [WORKLOAD_PCR] for bank in banks})
        for bank in banks:
            if actual[(WORKLOAD_PCR, bank)] != expected[bank]:
                raise PcrMismatchError(
                    f"PCR {WORKLOAD_PCR} ({bank}) is {actual[(WORKLOAD_PCR, bank)].hex()} but the "
                    f"event log replays to {expected[bank].hex()}: something else extended PCR "
                    f"{WORKLOAD_PCR} while measuring"
                )
        return Measurement(events=tuple(events), pcrs=expected)

    # --- quotes ------------------------------------------------------------------------------

    def quote(self, qualifying_data: bytes, pcrs: Sequence[int] = (WORKLOAD_PCR,)) -> QuoteResult:
        """Quotes ``pcrs`` in every configured bank with the AK (``tpm2_quote``).

        ``qualifying_data`` becomes the quote's extraData (1 to 64 bytes: a nonce, or the
        binding digest of :func:`evidence.binding.qualifying_data`). The PCR values are read
        after the quote and checked against its PCR digest; the quote is retried if a PCR
        changed in between.

        Raises:
            InvalidNonceError: ``qualifying_data`` is empty or longer than 64 bytes.
            QuoteError: the PCRs kept changing between quoting and reading them.
            PcrNotAvailableError: the TPM quoted other PCRs than those asked for (it leaves out
                a bank it has not allocated); the message names what is missing.
            TpmCommandError: the TPM refuses (AK problems, other failures).
        """
        if not 1 <= len(qualifying_data) <= MAX_QUALIFYING_DATA:
            raise InvalidNonceError(
                f"qualifying data (nonce) must be 1 to {MAX_QUALIFYING_DATA} bytes, "
                f"got {len(qualifying_data)}"
            )
        if not pcrs:
            raise QuoteError("a quote needs at least one PCR")
        for index in pcrs:
            _check_pcr_index(index)
        ak = self._ensure_ak()
        banks = self._config.banks
        selection = TPML_PCR_SELECTION.parse(_selection_string({b: pcrs for b in banks}))
        requested = {(index, bank) for bank in banks for index in pcrs}
        scheme = TPMT_SIG_SCHEME(scheme=_AK_SCHEME[self._config.ak_algorithm])
        scheme.details.any.hashAlg = TPM2_ALG.SHA256
        for _ in range(_QUOTE_ATTEMPTS):
            with self._tss("quoting PCRs with the AK"):
                attest, signature = self._ctx.quote(
                    ak.handle, selection, TPM2B_DATA(qualifying_data), scheme
                )
            attest_bytes = bytes(attest)
            with self._tss("decoding the quote"):
                info, _ = TPMS_ATTEST.unmarshal(attest_bytes)
            quoted = info.attested.quote
            # An independent copy: quoted.pcrSelect is a view into memory owned by ``info``.
            quoted_selection, _ = TPML_PCR_SELECTION.unmarshal(quoted.pcrSelect.marshal())
            quoted_digest = bytes(quoted.pcrDigest)
            order = tuple(_selection_keys(quoted_selection))
            # The TPM silently leaves out what it cannot quote (a bank it has not allocated),
            # and still signs the rest: a quote over less than was asked must not pass as one.
            _check_quoted(requested, order)
            by_bank: dict[str, list[int]] = {}
            for index, bank in order:
                by_bank.setdefault(bank, []).append(index)
            values = self.read_pcrs(by_bank)
            # The TPM hashes the selected values in selection order with the signing scheme's
            # hash (SHA-256 for both AK types).
            digest = hashlib.sha256(b"".join(values[key] for key in order)).digest()
            if digest == quoted_digest:
                return QuoteResult(
                    attest=attest_bytes,
                    signature=bytes(signature.marshal()),
                    pcr_selection=quoted_selection,
                    pcr_values=values,
                    pcr_order=order,
                    qualifying_data=bytes(qualifying_data),
                )
            log.info("PCRs changed between TPM2_Quote and TPM2_PCR_Read; quoting again")
        raise QuoteError(
            f"the quoted PCRs kept changing between quoting and reading them "
            f"({_QUOTE_ATTEMPTS} attempts): something else is extending them"
        )

    # --- NV indices (an Azure vTPM's HCL report) ---------------------------------------------

    def _nv_buffer_max(self) -> int:
        with self._tss("reading TPM_PT_NV_BUFFER_MAX"):
            _more, data = self._ctx.get_capability(
                TPM2_CAP.TPM_PROPERTIES, int(TPM2_PT_NV.BUFFER_MAX), 1
            )
        props = [
            p for p in data.data.tpmProperties if int(p.property) == int(TPM2_PT_NV.BUFFER_MAX)
        ]
        # 512 bytes is below every TPM's buffer, should the property be missing.
        return int(props[0].value) if props else 512

    def nv_read(self, index: int) -> bytes:
        """Reads the whole NV index ``index``, authorised by the owner hierarchy (empty auth),
        as ``tpm2_nvread -C o`` does.

        Raises:
            TpmCommandError: the index does not exist or the TPM refuses the read.
            TpmUnavailableError: the TPM cannot be reached.
        """
        if index not in self._handles(TPM2_HT.NV_INDEX):
            raise TpmCommandError(f"NV index 0x{index:08x} is not defined in this TPM")
        chunk = self._nv_buffer_max()
        with self._tss(f"reading NV index 0x{index:08x}"):
            nv = self._ctx.tr_from_tpmpublic(index)
            try:
                public, _name = self._ctx.nv_read_public(nv)
                size = int(public.nvPublic.dataSize)
                out = bytearray()
                while len(out) < size:
                    n = min(chunk, size - len(out))
                    out += bytes(self._ctx.nv_read(nv, n, len(out), auth_handle=ESYS_TR.OWNER))
            finally:
                self._ctx.tr_close(nv)
        return bytes(out)

    def nv_write(self, index: int, data: bytes) -> None:
        """Writes ``data`` at offset 0 of NV index ``index`` with owner authorisation
        (``tpm2_nvwrite -C o``), first defining it (owner read/write and auth read/write, the
        size of ``data``) when it does not exist, as Azure's guest attestation does for the
        user-data index 0x01400002.

        Raises:
            TpmCommandError: the TPM refuses to define or write the index.
            TpmUnavailableError: the TPM cannot be reached.
        """
        if index not in self._handles(TPM2_HT.NV_INDEX):
            attrs = TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD
            public = TPM2B_NV_PUBLIC(
                nvPublic=TPMS_NV_PUBLIC(
                    nvIndex=index, nameAlg=TPM2_ALG.SHA256, attributes=attrs, dataSize=len(data)
                )
            )
            with self._tss(f"defining NV index 0x{index:08x}"):
                handle = self._ctx.nv_define_space(None, public, auth_handle=ESYS_TR.OWNER)
                self._ctx.tr_close(handle)
        chunk = self._nv_buffer_max()
        with self._tss(f"writing NV index 0x{index:08x}"):
            nv = self._ctx.tr_from_tpmpublic(index)
            try:
                # One TPM2_NV_Write carries at most TPM_PT_NV_BUFFER_MAX bytes.
                for offset in range(0, len(data), chunk):
                    part = data[offset : offset + chunk]
                    self._ctx.nv_write(nv, part, offset, auth_handle=ESYS_TR.OWNER)
            finally:
                self._ctx.tr_close(nv)


def open_tpm(config: TpmConfig) -> Tpm:
    """Returns an open :class:`Tpm` for ``config`` (use it as a context manager).

    Raises:
        TpmUnavailableError: the TPM cannot be reached through ``config.tcti``.
    """
    return Tpm(config).open()

"""The sidecar's side of enrollment and attestation with the broker.

:func:`enroll` proves the AK to the broker by credential activation (StartEnrollment,
ActivateCredential in the TPM, CompleteEnrollment). :class:`Attester` answers challenges: it
quotes PCR 23 (and whatever else the challenge names) with qualifying data that binds the
broker's nonce, a fresh ephemeral HPKE key and the sidecar's own TLS client certificate, sends
the quote with the event log, and opens the released data keys with the ephemeral key into a
:class:`~sidecar.dataplane.KeyRing`. :meth:`Attester.reattest` is the key ring's re-attestation
callback: the same again with the files measured at start (the current PCR 23 is quoted; if
anything extended it since, the broker refuses and the data stops).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from broker.client import (
    BrokerClient,
    BrokerClientError,
    DeadlineExceededError,
    FailedPreconditionError,
    PermissionDeniedError,
    UnavailableError,
    UnimplementedError,
)
from broker.errors import CustodyError
from broker.keyseal import open_release
from cleanroom.v1 import attestation_pb2, common_pb2
from evidence.binding import qualifying_data, snp_enrollment_binding
from evidence.errors import EvidenceError
from evidence.proto import bank_from_pb, bank_to_pb
from sealing.errors import SealingError
from sealing.keys import RecipientPrivateKey, RecipientPublicKey, generate_recipient_key
from sidecar.dataplane.keyring import KeyRing
from sidecar.errors import InvalidNonceError
from sidecar.run.errors import (
    AttestationDeniedError,
    BrokerUnreachableError,
    EnrollmentFailedError,
    RunError,
)

if TYPE_CHECKING:
    # Only for types: importing sidecar.tpm loads tpm2-pytss, which the runner imports later,
    # while the first broker round trip is in flight.
    from sidecar.snp import SnpCollector
    from sidecar.tpm.interface import AkInfo, TpmDevice

__all__ = [
    "Attestation",
    "Attester",
    "broker_error",
    "denial_text",
    "enroll",
    "is_not_enrolled",
]

_log = logging.getLogger(__name__)

#: What :func:`broker_error` is told while attesting.
ATTESTATION = "the attestation"

#: Challenge-quote-attest cycles when the broker answers Attest with UNAVAILABLE.
ATTEST_ATTEMPTS = 3
#: Pause before the second cycle (seconds), doubled for each later one.
ATTEST_RETRY_PAUSE = 0.5


def denial_text(reason: int, audit_record: int) -> str:
    """What the broker said of a denial, as the sidecar prints it: ``NOT_APPROVED; audit
    record 42`` (the reason's name without its ``DENIAL_REASON_`` prefix)."""
    try:
        name = attestation_pb2.DenialReason.Name(reason).removeprefix("DENIAL_REASON_")  # type: ignore[arg-type]
    except ValueError:  # a reason added in a newer broker
        name = f"reason {reason}"
    record = f"audit record {audit_record}" if audit_record else "no audit record"
    return f"{name}; {record}"


def _denial_summary(denial: attestation_pb2.AttestDenial) -> str:
    text = denial_text(denial.reason, denial.audit_record)
    if denial.denied_keys:
        keys = ", ".join(
            f"{k.key_id!r} {denial_text(k.reason, k.audit_record)}" for k in denial.denied_keys
        )
        text += f"; withheld: {keys}"
    return text


def broker_error(e: BrokerClientError, *, target: str, doing: str) -> RunError:
    """The run error for a failed broker call made while ``doing`` (one line).

    Unreachable and timed-out brokers become :class:`BrokerUnreachableError`; refusals become
    :class:`AttestationDeniedError`; the rest keep the broker's message. A refused attestation
    states only what the broker said of it: its coarse reason and the audit record that holds
    the exact one (``AttestDenial``), never a guess at the cause.
    """
    if isinstance(e, UnavailableError):
        return BrokerUnreachableError(
            f"cannot reach the broker at {target} while {doing}, after retries: {e.details}"
        )
    if isinstance(e, DeadlineExceededError):
        return BrokerUnreachableError(f"the broker at {target} did not answer in time ({doing})")
    if isinstance(e, PermissionDeniedError) and doing == ATTESTATION:
        if e.denial is not None:
            return AttestationDeniedError(
                f"the broker denied the release ({_denial_summary(e.denial)})"
            )
        # A broker that sends no AttestDenial says nothing more; its audit log has the reason.
        return AttestationDeniedError(
            f"the broker denied the release ({e.details}; no audit record given)"
        )
    if isinstance(e, PermissionDeniedError | FailedPreconditionError):
        said = f" ({_denial_summary(e.denial)})" if e.denial is not None else ""
        return AttestationDeniedError(f"the broker refused {doing}: {e.details}{said}")
    return RunError(f"broker call failed while {doing}: {e}")


def is_not_enrolled(e: BrokerClientError) -> bool:
    """Whether the broker answered that the AK is not enrolled (it forgot it, or never knew)."""
    return isinstance(e, FailedPreconditionError) and "not enrolled" in e.details


def enroll(
    tpm: TpmDevice,
    client: BrokerClient,
    ak: AkInfo,
    *,
    snp: SnpCollector | None = None,
    certificate_der: bytes = b"",
) -> str:
    """Enrolls ``ak`` by credential activation under the TPM's EK; returns the AK name (hex).

    The broker checks the EK certificate (from NV) against its trusted EK CAs, seals a secret to
    the AK's name under the EK (MakeCredential), and the TPM releases it only if this AK and
    that EK live in it together (ActivateCredential). With ``snp`` (an Azure SEV-SNP
    confidential VM), an HCL report naming the EK and the AK, bound to them and to the
    sidecar's TLS certificate ``certificate_der``, is sent too: the broker may take it instead
    of an EK certificate.

    Raises:
        EnrollmentFailedError: the broker refused the EK or AK, or the secret did not match.
        BrokerUnreachableError: the broker cannot be reached.
        TpmError: the TPM failed (creating the EK, activating the credential).
    """
    ek = tpm.create_ek()
    target = client.target
    snp_evidence = None
    if snp is not None:
        binding = snp_enrollment_binding(
            ek_public=ek.public, ak_public=ak.public, tls_certificate_der=certificate_der
        )
        snp_evidence = snp.collect(tpm, binding)
    try:
        start = client.start_enrollment(
            ek_public=ek.public,
            ak_public=ak.public,
            ek_certificate=ek.certificate or b"",
            snp_evidence=snp_evidence,
        )
    except BrokerClientError as e:
        raise _enrollment_error(e, target, "starting enrollment") from e
    secret = tpm.activate_credential(bytes(start.credential_blob), bytes(start.encrypted_secret))
    try:
        ak_name = client.complete_enrollment(enrollment_id=start.enrollment_id, secret=secret)
    except BrokerClientError as e:
        raise _enrollment_error(e, target, "completing enrollment") from e
    if ak_name != ak.name_hex:
        raise EnrollmentFailedError(
            f"the broker enrolled AK {ak_name}, but this TPM's AK is {ak.name_hex}"
        )
    _log.info("AK %s enrolled with the broker at %s by credential activation", ak_name, target)
    return ak_name


def _enrollment_error(e: BrokerClientError, target: str, doing: str) -> RunError:
    if isinstance(e, UnavailableError | DeadlineExceededError):
        return broker_error(e, target=target, doing=doing)
    return EnrollmentFailedError(f"the broker at {target} refused the enrollment: {e.details}")


@dataclass(frozen=True)
class Attestation:
    """One successful attestation (the released keys went into the key ring, not here).

    Attributes:
        session_id: the broker's session id.
        expires_at: when the broker wants a new attestation (aware, broker's clock).
        owners: key id -> owning party of each released key.
        denied: key ids the broker withheld.
        recipients: (party, public key) pairs the outputs are sealed to.
        withheld: key id -> what the broker said of each withheld key (:func:`denial_text`).
    """

    session_id: str
    expires_at: datetime | None
    owners: dict[str, str]
    denied: tuple[str, ...]
    recipients: tuple[tuple[str, RecipientPublicKey], ...]
    withheld: Mapping[str, str] = field(default_factory=dict)


class Attester:
    """Answers the broker's challenges for one run (thread-safe; one attestation at a time).

    Args:
        tpm: the open TPM, with the enrolled AK loaded.
        client: the broker client (mTLS with ``certificate_der``'s certificate).
        ak_name: the enrolled AK's name, hex.
        event_log: the measurement of the workload's files, sent with every quote.
        certificate_der: the sidecar's own TLS client certificate, DER; bound into the quote.
        banks: the PCR banks the TPM quotes (``[tpm] banks``).
        pcrs: PCRs always quoted (PCR 23 and ``[tpm] extra_pcrs``).
        key_ids: the data keys to ask for.
    """

    def __init__(
        self,
        *,
        tpm: TpmDevice,
        client: BrokerClient,
        ak_name: str,
        event_log: common_pb2.EventLog,
        certificate_der: bytes,
        banks: Sequence[str],
        pcrs: Sequence[int],
        key_ids: Sequence[str],
        snp: SnpCollector | None = None,
    ) -> None:
        self._tpm = tpm
        # On an Azure SEV-SNP confidential VM: the hardware evidence sent with every quote.
        self._snp = snp
        self._client = client
        self._ak_name = ak_name
        self._event_log = event_log
        self._certificate_der = certificate_der
        self._banks = tuple(banks)
        self._pcrs = tuple(pcrs)
        self._key_ids = tuple(key_ids)
        self._lock = threading.Lock()
        self._sessions: list[str] = []
        #: Challenge-quote-attest cycles tried when Attest is answered UNAVAILABLE.
        self.attempts = ATTEST_ATTEMPTS
        #: Pause before the second cycle, doubled for each later one (seconds).
        self.retry_pause = ATTEST_RETRY_PAUSE
        #: Attest on one AttestStream call when no challenge is in hand (False once the broker
        #: turned out not to offer it).
        self.use_stream = True
        self._sleep: Callable[[float], None] = time.sleep

    @property
    def session_ids(self) -> tuple[str, ...]:
        """Every session this run attested, oldest first."""
        with self._lock:
            return tuple(self._sessions)

    def challenge(self) -> attestation_pb2.GetChallengeResponse:
        """Asks the broker for a nonce.

        Raises:
            BrokerClientError: as :meth:`BrokerClient.get_challenge` (callers map it).
        """
        return self._client.get_challenge(self._ak_name)

    def _quoted_pcrs(self, challenge: attestation_pb2.GetChallengeResponse) -> list[int]:
        wanted = set(self._pcrs)
        for selection in challenge.pcr_selection:
            try:
                bank = bank_from_pb(selection.bank)
            except EvidenceError as e:
                raise AttestationDeniedError(f"the broker's challenge names {e}") from e
            if bank not in self._banks:
                raise AttestationDeniedError(
                    f"the broker wants PCRs quoted in the {bank} bank, which [tpm] banks "
                    f"({', '.join(self._banks)}) does not include"
                )
            wanted.update(int(i) for i in selection.indices)
        return sorted(wanted)

    def attest(
        self, keyring: KeyRing, *, challenge: attestation_pb2.GetChallengeResponse | None = None
    ) -> Attestation:
        """Quotes, attests and puts the released keys into ``keyring`` (replacing its keys).

        ``challenge`` is a challenge fetched ahead of time; without it one is asked for now.
        The key ring's expiry is set to the new attestation's.

        ``Attest`` itself is never resent: the broker burns the nonce before it looks at the
        evidence. When the broker answers it with UNAVAILABLE (a transient fault such as its
        database or a Key Vault KEK being briefly unavailable), the whole cycle runs again with
        a new challenge, a new quote and a new ephemeral key, up to :attr:`attempts` times with
        a growing pause.

        Raises:
            AttestationDeniedError: the broker refused the challenge or the evidence, or a
                released key did not open with the ephemeral key.
            BrokerUnreachableError: the broker cannot be reached, or stayed unavailable for
                every attempt.
            TpmError, QuoteError: the TPM failed.
        """
        with self._lock:
            target = self._client.target
            for attempt in range(1, self.attempts + 1):
                try:
                    attestation, opened = self._attest_once(challenge, target)
                    break
                except UnavailableError as e:
                    if attempt == self.attempts:
                        raise BrokerUnreachableError(
                            f"the broker at {target} could not complete the attestation, "
                            f"{attempt} attempts: {e.details}"
                        ) from e
                    pause = self.retry_pause * 2 ** (attempt - 1)
                    _log.warning(
                        "the broker could not complete the attestation (%s); trying again with "
                        "a new challenge in %.1f s",
                        e.details,
                        pause,
                    )
                    self._sleep(pause)
                    challenge = None
            try:
                keyring.clear()
                for key_id, key in opened.items():
                    keyring.add(key_id, key)
            finally:
                opened.clear()
            keyring.set_valid_until(attestation.expires_at)
        _log.info(
            "attested: session %s, %d key(s) released, %d withheld, valid until %s",
            attestation.session_id,
            len(attestation.owners),
            len(attestation.denied),
            attestation.expires_at.isoformat() if attestation.expires_at else "forever",
        )
        return attestation

    def _attest_once(
        self, challenge: attestation_pb2.GetChallengeResponse | None, target: str
    ) -> tuple[Attestation, dict[str, bytes]]:
        """One challenge-quote-attest cycle; returns the attestation and the opened keys.

        Raises:
            UnavailableError: ``Attest`` (or either step of ``AttestStream``) was answered
                UNAVAILABLE (the caller may start over).
            the rest: as :meth:`attest`.
        """
        # A fresh ephemeral key for every attestation: a released key opens only in the
        # process that made this quote, and only for this session.
        with generate_recipient_key() as ephemeral:
            public = ephemeral.public_key()

            def evidence(
                answered: attestation_pb2.GetChallengeResponse,
            ) -> attestation_pb2.AttestRequest:
                pcrs = self._quoted_pcrs(answered)
                try:
                    qualifying = qualifying_data(
                        nonce=bytes(answered.nonce),
                        kem=public.kem,
                        ephemeral_public_key=public.raw,
                        tls_certificate_der=self._certificate_der,
                    )
                except EvidenceError as e:
                    raise InvalidNonceError(f"cannot bind the quote: {e}") from e
                result = self._tpm.quote(qualifying, pcrs)
                request = attestation_pb2.AttestRequest(
                    ak_name=self._ak_name,
                    nonce=bytes(answered.nonce),
                    event_log=self._event_log,
                    key_ids=self._key_ids,
                )
                if self._snp is not None:
                    request.snp_evidence.CopyFrom(self._snp.collect(self._tpm, qualifying))
                request.quote.attest = result.attest
                request.quote.signature = result.signature
                for index, bank in result.pcr_order:
                    request.quote.pcr_values.add(
                        index=index, bank=bank_to_pb(bank), value=result.pcr_values[(index, bank)]
                    )
                request.ephemeral_key.kem = public.kem  # type: ignore[assignment]
                request.ephemeral_key.public_key = public.raw
                return request

            try:
                response = self._exchange(challenge, evidence, target)
            except UnavailableError:
                raise
            except BrokerClientError as e:
                raise broker_error(e, target=target, doing=ATTESTATION) from e
            # Recorded at once, so that the session is ended even if what follows fails.
            self._sessions.append(response.session_id)
            attestation = self._attestation(response)
            return attestation, self._open_released(response, ephemeral)

    def _exchange(
        self,
        challenge: attestation_pb2.GetChallengeResponse | None,
        evidence: Callable[[attestation_pb2.GetChallengeResponse], attestation_pb2.AttestRequest],
        target: str,
    ) -> attestation_pb2.AttestResponse:
        """Challenge and evidence: one ``AttestStream`` call when no challenge is in hand (it
        costs the broker less than the two unary calls), else the unary ``Attest`` for the
        challenge fetched ahead of time. A broker without ``AttestStream`` (an older version)
        gets the unary calls from then on.

        Raises:
            BrokerClientError: the broker refused (or could not answer) a step; a failed
                unary challenge is mapped already (as :meth:`challenge` is by callers).
        """
        if challenge is None and self.use_stream:
            try:
                return self._client.attest_stream(self._ak_name, evidence)
            except UnimplementedError:
                _log.info("the broker has no AttestStream; using GetChallenge and Attest")
                self.use_stream = False
        if challenge is None:
            try:
                challenge = self.challenge()
            except BrokerClientError as e:
                raise broker_error(e, target=target, doing="a challenge") from e
        request = evidence(challenge)
        return self._client.attest(
            ak_name=request.ak_name,
            nonce=request.nonce,
            quote=request.quote,
            event_log=request.event_log,
            ephemeral_key=request.ephemeral_key,
            key_ids=request.key_ids,
            snp_evidence=request.snp_evidence if request.HasField("snp_evidence") else None,
        )

    def reattest(self, keyring: KeyRing) -> datetime:
        """The key ring's re-attestation callback: attests again and returns the new expiry.

        Keys the broker no longer releases are dropped from the key ring.

        Raises:
            RunError: as :meth:`attest`; the key ring then stops serving data.
        """
        attestation = self.attest(keyring)
        if attestation.expires_at is None:
            raise AttestationDeniedError("the broker's answer has no attestation lifetime")
        return attestation.expires_at

    @staticmethod
    def _open_released(
        response: attestation_pb2.AttestResponse, ephemeral: RecipientPrivateKey
    ) -> dict[str, bytes]:
        opened: dict[str, bytes] = {}
        for released in response.released_keys:
            try:
                opened[released.key_id] = open_release(
                    ephemeral,
                    bytes(released.sealed_key),
                    session_id=response.session_id,
                    key_id=released.key_id,
                    owner=released.owner_party,
                )
            except CustodyError as e:
                opened.clear()
                raise AttestationDeniedError(
                    f"the released key {released.key_id!r} does not open with this sidecar's "
                    f"ephemeral key: {e}"
                ) from e
        return opened

    @staticmethod
    def _attestation(response: attestation_pb2.AttestResponse) -> Attestation:
        recipients: list[tuple[str, RecipientPublicKey]] = []
        for r in response.output_recipients:
            try:
                key = RecipientPublicKey(kem=int(r.key.kem), raw=bytes(r.key.public_key))
            except SealingError as e:
                raise AttestationDeniedError(
                    f"the broker sent an unusable key for output recipient {r.party!r}: {e}"
                ) from e
            recipients.append((r.party, key))
        expires = (
            response.attestation_expires_at.ToDatetime(tzinfo=UTC)
            if response.HasField("attestation_expires_at")
            else None
        )
        return Attestation(
            session_id=response.session_id,
            expires_at=expires,
            owners={k.key_id: k.owner_party for k in response.released_keys},
            denied=tuple(d.key_id for d in response.denied_keys),
            recipients=tuple(recipients),
            withheld={
                d.key_id: denial_text(d.reason, d.audit_record) for d in response.denied_keys
            },
        )

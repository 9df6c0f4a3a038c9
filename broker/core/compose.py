"""The composition root: the one place where the broker core's use cases are wired.

:func:`build_broker` takes what :func:`broker.app.open_broker` opened (the store, the KEKs, the
registration key, the trusted EK CAs) and builds the shared collaborators (the audit log, the
nonces, the SEV-SNP gate) once, then gives each use case only the ones it needs. The gRPC server
(:mod:`broker.server`), the ``cleanroom broker`` commands and the tests all get their broker
from there; ``cleanroom broker kek rotate`` gets the local KEK's rotation from
:func:`build_local_kek_rotator`, and ``cleanroom broker init`` its recording of KEK fingerprints
from :func:`build_kek_fingerprint_recorder`.

:class:`Broker` holds the result: the use cases, which the gRPC servicers call, and the
resources it closes. It also answers each use case's calls itself (``broker.attest(...)`` is
``broker.attestation.attest(...)``), because library users, the demo and the tests drive the
whole broker in process through one object.
"""

from __future__ import annotations

from collections.abc import Sequence

from broker.audit import AuditLog
from broker.azure_snp import SnpGate
from broker.config import BrokerConfig
from broker.core.administration import PolicyAdministration
from broker.core.attestation import Attestation
from broker.core.custody import KekFingerprintRecorder, KeyCustody, LocalKekRotator
from broker.core.enrollment import Enrollment
from broker.core.operations import Operations
from broker.core.trail import AuditTrail, Clock, utcnow
from broker.custody import KekRegistry
from broker.nonces import NonceService
from broker.storage import Store
from cleanroom.closing import Closeable
from sealing.keys import RecipientPrivateKey


class Broker(Closeable):
    """The broker core: its use cases, and the resources it owns.

    Build it with :func:`build_broker` (or open it with :func:`broker.app.open_broker`); close
    it (or use it as a context manager) to drop the KEKs and the registration key and close the
    store.
    """

    def __init__(
        self,
        *,
        config: BrokerConfig,
        clock: Clock,
        store: Store,
        keks: KekRegistry,
        registration_key: RecipientPrivateKey,
        audit: AuditLog,
        nonces: NonceService,
        snp: SnpGate,
        enrollment: Enrollment,
        attestation: Attestation,
        administration: PolicyAdministration,
        custody: KeyCustody,
        operations: Operations,
    ) -> None:
        self.config = config
        self.clock = clock
        # The use cases: what the gRPC servicers call.
        self.enrollment = enrollment
        self.attestation = attestation
        self.administration = administration
        self.custody = custody
        self.operations = operations
        # What the broker owns (closed by close()), and the shared collaborators below the use
        # cases, for in-process tools and tests that inspect the state.
        self.store = store
        self.keks = keks
        self.registration_key = registration_key
        self.audit = audit
        self.nonces = nonces
        self.snp = snp
        # Each use case's calls, answered by the broker itself (see the module docstring).
        self.enroll_ek = enrollment.enroll_ek
        self.enroll_ak = enrollment.enroll_ak
        self.start_enrollment = enrollment.start_enrollment
        self.complete_enrollment = enrollment.complete_enrollment
        self.revoke_ek = enrollment.revoke_ek
        self.revoke_ak = enrollment.revoke_ak
        self.readmit_ek = enrollment.readmit_ek
        self.challenge = attestation.challenge
        self.record_malformed_attest = attestation.record_malformed_attest
        self.attest = attestation.attest
        self.end_session = attestation.end_session
        self.set_golden_set = administration.set_golden_set
        self.delete_golden_set = administration.delete_golden_set
        self.add_party = administration.add_party
        self.register_data_key = administration.register_data_key
        self.approve_workload = administration.approve_workload
        self.revoke_approval = administration.revoke_approval
        self.audit_records = administration.audit_records
        self.list_eks = administration.list_eks
        self.list_aks = administration.list_aks
        self.list_golden_sets = administration.list_golden_sets
        self.list_parties = administration.list_parties
        self.list_data_keys = administration.list_data_keys
        self.list_approvals = administration.list_approvals
        self.verify_audit_log = administration.verify_audit_log
        self.kek_ref_for_party = custody.kek_ref_for_party

    def close(self) -> None:
        """Drops the KEKs and the registration key and closes the store (idempotent)."""
        self.keks.close()
        self.registration_key.close()
        self.store.close()


def build_broker(
    config: BrokerConfig,
    *,
    store: Store,
    keks: KekRegistry,
    registration_key: RecipientPrivateKey,
    trusted_ek_cas: Sequence[bytes] = (),
    clock: Clock = utcnow,
) -> Broker:
    """Wires the broker core over open resources; the broker owns them from here on.

    Raises:
        BrokerConfigError: the ``[broker.azure_snp]`` settings or the AMD roots they name are
            unusable.
    """
    audit = AuditLog(store, clock=clock)
    trail = AuditTrail(audit)
    nonces = NonceService(store, ttl_seconds=config.nonce_ttl_seconds, clock=clock)
    # The AMD roots and the [broker.azure_snp] policy, read once (the root files are small).
    snp = SnpGate.from_config(config.azure_snp)
    custody = KeyCustody(store=store, trail=trail, keks=keks, config=config, clock=clock)
    return Broker(
        config=config,
        clock=clock,
        store=store,
        keks=keks,
        registration_key=registration_key,
        audit=audit,
        nonces=nonces,
        snp=snp,
        enrollment=Enrollment(
            store=store,
            trail=trail,
            config=config,
            snp=snp,
            trusted_ek_cas=trusted_ek_cas,
            clock=clock,
        ),
        attestation=Attestation(
            store=store,
            nonces=nonces,
            trail=trail,
            keks=keks,
            snp=snp,
            config=config,
            clock=clock,
        ),
        administration=PolicyAdministration(
            store=store,
            trail=trail,
            custody=custody,
            registration_key=registration_key,
            config=config,
            clock=clock,
        ),
        custody=custody,
        operations=Operations(store=store, nonces=nonces, audit=audit, config=config, clock=clock),
    )


def build_local_kek_rotator(store: Store, *, clock: Clock = utcnow) -> LocalKekRotator:
    """Wires the local KEK's rotation over an open store, for ``cleanroom broker kek rotate``
    (the broker is stopped: no KEK registry, registration key or nonces are involved)."""
    return LocalKekRotator(store=store, trail=AuditTrail(AuditLog(store, clock=clock)), clock=clock)


def build_kek_fingerprint_recorder(
    store: Store, *, clock: Clock = utcnow
) -> KekFingerprintRecorder:
    """Wires the recording of KEK fingerprints over an open store, for ``cleanroom broker
    init`` (the broker is not running)."""
    return KekFingerprintRecorder(
        store=store, trail=AuditTrail(AuditLog(store, clock=clock)), clock=clock
    )


__all__ = ["Broker", "build_broker", "build_kek_fingerprint_recorder", "build_local_kek_rotator"]

"""The gRPC servicers of ``cleanroom.v1.AttestationService`` and ``cleanroom.v1.AdminService``.

They validate each request (:mod:`broker.server.validate`), convert it, call the core's use
cases (:mod:`broker.core`) as the caller that the guard put in the call context, and convert the
result; they reach nothing below the core (no store, nonces or audit log). They never set
status codes: exceptions travel up to the guard, which maps them in one place
(:mod:`broker.server.status`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc

from broker.client import ATTEST_DENIAL_METADATA
from broker.core.attestation import Evidence
from broker.core.compose import Broker
from broker.errors import AttestationRefusedError, UnknownPolicyObjectError
from broker.server import convert, validate
from broker.server.deadlines import Deadlines
from broker.server.errors import (
    InvalidRequestError,
    RateLimitedError,
    StreamAbandonedError,
    StreamStepError,
)
from broker.server.interceptor import REQUEST_ID_METADATA, current_call
from broker.server.metrics import BrokerMetrics
from broker.server.ratelimit import TokenBucketLimiter
from broker.server.status import attestation_reason_class, reason_label
from broker.server.status_report import ProcessInfo, status_pb
from cleanroom import __version__
from cleanroom.v1 import admin_pb2, admin_pb2_grpc, attestation_pb2, attestation_pb2_grpc
from evidence.proto import bank_to_pb, event_log_from_pb, manifest_from_pb
from pki.identity import SpiffeId

log = logging.getLogger("cleanroom.broker.rpc")

#: ListAuditRecords page size when the request leaves ``limit`` at 0.
DEFAULT_AUDIT_PAGE = 100
#: A token bucket holds this many seconds' worth of its rate (the config's "burst of 10x").
BURST_SECONDS = 10.0

_GET_CHALLENGE_METHOD = "/cleanroom.v1.AttestationService/GetChallenge"
_ATTEST_METHOD = "/cleanroom.v1.AttestationService/Attest"


class AttestationServicer(attestation_pb2_grpc.AttestationServiceServicer):
    """Enrollment, challenges, attestation and session end, for sidecars."""

    def __init__(
        self,
        broker: Broker,
        *,
        metrics: BrokerMetrics,
        peer_limiter: TokenBucketLimiter | None = None,
        ak_limiter: TokenBucketLimiter | None = None,
        deadlines: Deadlines | None = None,
    ) -> None:
        """``deadlines`` ends the ``AttestStream`` calls whose evidence does not come before
        their nonce expires (the server passes the one it closes at shutdown)."""
        self.enrollment = broker.enrollment
        self.attestation = broker.attestation
        self.metrics = metrics
        self.deadlines = deadlines or Deadlines()
        config = broker.config
        self.max_event_log_entries = config.max_event_log_entries
        self.nonce_ttl_seconds = config.nonce_ttl_seconds
        self.peer_limiter = peer_limiter or TokenBucketLimiter(
            rate=config.challenge_rate_per_peer,
            burst=max(1.0, config.challenge_rate_per_peer * BURST_SECONDS),
        )
        self.ak_limiter = ak_limiter or TokenBucketLimiter(
            rate=config.challenge_rate_per_ak,
            burst=max(1.0, config.challenge_rate_per_ak * BURST_SECONDS),
        )

    def StartEnrollment(
        self, request: attestation_pb2.StartEnrollmentRequest, context: grpc.ServicerContext
    ) -> attestation_pb2.StartEnrollmentResponse:
        validate.check_start_enrollment(request)
        challenge = self.enrollment.start_enrollment(
            current_call().caller,
            ek_public=bytes(request.ek_public),
            ek_certificate=bytes(request.ek_certificate) or None,
            ak_public=bytes(request.ak_public),
            hcl_report=bytes(request.snp_evidence.hcl_report),
            vcek=bytes(request.snp_evidence.vcek),
            peer_certificate_der=current_call().peer.certificate_der,
        )
        return attestation_pb2.StartEnrollmentResponse(
            enrollment_id=challenge.enrollment_id,
            credential_blob=challenge.credential_blob,
            encrypted_secret=challenge.encrypted_secret,
            expires_at=convert.timestamp(challenge.expires_at),
        )

    def CompleteEnrollment(
        self, request: attestation_pb2.CompleteEnrollmentRequest, context: grpc.ServicerContext
    ) -> attestation_pb2.CompleteEnrollmentResponse:
        validate.check_complete_enrollment(request)
        record = self.enrollment.complete_enrollment(
            current_call().caller, enrollment_id=request.enrollment_id, secret=bytes(request.secret)
        )
        return attestation_pb2.CompleteEnrollmentResponse(ak_name=record.ak_name)

    def GetChallenge(
        self, request: attestation_pb2.GetChallengeRequest, context: grpc.ServicerContext
    ) -> attestation_pb2.GetChallengeResponse:
        validate.check_get_challenge(request)
        caller = current_call().caller
        # The peer's bucket first: a sidecar cycling through AK names is still held to its own
        # rate, and an AK shared by a burst of peers is held to the AK's.
        if not self.peer_limiter.try_acquire(str(caller)):
            self.metrics.rate_limited.labels("peer").inc()
            raise RateLimitedError("too many challenges from this caller; retry later")
        if not self.ak_limiter.try_acquire(request.ak_name):
            self.metrics.rate_limited.labels("ak").inc()
            raise RateLimitedError("too many challenges for this AK; retry later")
        challenge = self.attestation.challenge(caller, request.ak_name)
        response = attestation_pb2.GetChallengeResponse(
            nonce=challenge.nonce, expires_at=convert.timestamp(challenge.expires_at)
        )
        for bank in sorted(challenge.pcr_selection):
            response.pcr_selection.add(
                bank=bank_to_pb(bank), indices=sorted(challenge.pcr_selection[bank])
            )
        return response

    def Attest(
        self, request: attestation_pb2.AttestRequest, context: grpc.ServicerContext
    ) -> attestation_pb2.AttestResponse:
        call = current_call()
        try:
            try:
                ephemeral_key = validate.check_attest(
                    request, max_event_log_entries=self.max_event_log_entries
                )
            except InvalidRequestError as e:
                self._audit_malformed(call.caller, request, e)
                raise
            evidence = Evidence(
                ak_name=request.ak_name,
                nonce=bytes(request.nonce),
                attest=bytes(request.quote.attest),
                signature=bytes(request.quote.signature),
                pcr_values=convert.pcr_values_from_pb(request.quote.pcr_values),
                event_log=event_log_from_pb(
                    request.event_log, max_events=self.max_event_log_entries
                ),
                ephemeral_key=ephemeral_key,
                key_ids=tuple(request.key_ids),
                # The quote's qualifying data must bind the certificate of this very
                # connection, so a quote relayed over another sidecar's channel is refused.
                peer_certificate_der=call.peer.certificate_der,
                hcl_report=bytes(request.snp_evidence.hcl_report),
                vcek=bytes(request.snp_evidence.vcek),
            )
            outcome = self.attestation.attest(call.caller, evidence)
        except AttestationRefusedError as e:
            self.metrics.attestations.labels("deny", attestation_reason_class(e)).inc()
            if e.code is not None:
                # The coarse reason and the record that holds the exact one go back with the
                # status, in the trailing metadata (the guard keeps it when it aborts).
                context.set_trailing_metadata(
                    (
                        (REQUEST_ID_METADATA, call.request_id),
                        (ATTEST_DENIAL_METADATA, _denial_pb(e).SerializeToString()),
                    )
                )
            raise
        except Exception as e:
            self.metrics.attestations.labels("deny", attestation_reason_class(e)).inc()
            raise
        self.metrics.attestations.labels("allow", "partial" if outcome.denied else "full").inc()
        if outcome.released:
            self.metrics.key_releases.labels("released", "approved").inc(len(outcome.released))
        for withheld in outcome.denied:
            self.metrics.key_releases.labels("withheld", reason_label(withheld.code)).inc()
        response = attestation_pb2.AttestResponse(
            session_id=outcome.session_id,
            attestation_expires_at=convert.timestamp(outcome.expires_at),
        )
        for key in outcome.released:
            response.released_keys.add(
                key_id=key.key_id, owner_party=key.owner, sealed_key=key.sealed
            )
        # Exact reasons stay in the audit log: the sidecar learns each withheld key's coarse
        # reason and the record that holds the exact one.
        for withheld in outcome.denied:
            response.denied_keys.add(
                key_id=withheld.key_id,
                reason=convert.denial_reason_pb(withheld.code),
                audit_record=withheld.audit_record,
            )
        for party in outcome.output_recipients:
            response.output_recipients.add(
                party=party.name, key=convert.recipient_key_pb(party.kem, party.public_key)
            )
        return response

    def AttestStream(
        self,
        request_iterator: Iterator[attestation_pb2.AttestStreamRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[attestation_pb2.AttestStreamResponse]:
        """GetChallenge and Attest on one stream: the same checks, records, limits and
        refusals as the two unary calls, and the evidence must answer this stream's challenge.

        A stream that ends (or is cancelled at the nonce's expiry) after its challenge and
        before its evidence burns the nonce, so no challenge handed out on a stream stays
        usable once its stream is gone.
        """
        first = next(request_iterator, None)
        if first is None:
            return
        if first.WhichOneof("step") != "challenge":
            raise StreamStepError(
                _GET_CHALLENGE_METHOD,
                InvalidRequestError("", "an AttestStream starts with a challenge request"),
            )
        try:
            challenge = self.GetChallenge(first.challenge, context)
        except Exception as e:
            raise StreamStepError(_GET_CHALLENGE_METHOD, e) from e
        ak_name = first.challenge.ak_name
        nonce = bytes(challenge.nonce)
        # The evidence could not be accepted after the nonce expires: a client still silent
        # then is cancelled, which frees this worker thread.
        deadline = self.deadlines.schedule(self.nonce_ttl_seconds, context.cancel)
        answered = False
        try:
            yield attestation_pb2.AttestStreamResponse(challenge=challenge)
            call = current_call()
            try:
                second = next(request_iterator, None)
            except InvalidRequestError as e:
                # Bytes that are no message at all, where the evidence was due: a refused
                # attestation, recorded as the unary Attest records its unparseable requests.
                self._audit_malformed(call.caller, attestation_pb2.AttestRequest(), e)
                raise StreamStepError(_ATTEST_METHOD, e) from e
            if second is None:
                raise StreamAbandonedError("the client ended the stream before its evidence")
            try:
                if second.WhichOneof("step") != "attest":
                    raise InvalidRequestError(
                        "", "the second message of an AttestStream must be the evidence"
                    )
                evidence = second.attest
                if evidence.ak_name != ak_name or bytes(evidence.nonce) != nonce:
                    raise InvalidRequestError(
                        "attest", "the evidence must answer the challenge of this stream"
                    )
            except InvalidRequestError as e:
                self._audit_malformed(call.caller, second.attest, e)
                raise StreamStepError(_ATTEST_METHOD, e) from e
            # From here the nonce is the core's: it burns it whatever the verdict.
            answered = True
            try:
                response = self.Attest(evidence, context)
            except Exception as e:
                raise StreamStepError(_ATTEST_METHOD, e) from e
            deadline.cancel()
            yield attestation_pb2.AttestStreamResponse(attest=response)
        finally:
            deadline.cancel()
            if not answered:
                self._burn_unanswered(nonce, ak_name)

    def _burn_unanswered(self, nonce: bytes, ak_name: str) -> None:
        try:
            self.attestation.discard_challenge(nonce, ak_name)
        except Exception:
            # The database failed: the nonce still expires with its TTL.
            log.warning("the nonce of an abandoned AttestStream was not burned", exc_info=True)

    def _audit_malformed(
        self, caller: SpiffeId, request: attestation_pb2.AttestRequest, error: InvalidRequestError
    ) -> None:
        """Records an ``Attest`` refused by validation as the core records its own refusals
        (action ``attest``, decision ``deny``), with the validation message as the reason.

        The AK name is the subject only when it is well formed: a malformed one could be
        anything up to the message size limit, and its problem is in the reason anyway.
        """
        try:
            validate.check_ak_name(request.ak_name)
            subject = request.ak_name
        except InvalidRequestError:
            subject = ""
        try:
            self.attestation.record_malformed_attest(
                caller,
                ak_name=subject,
                attest=bytes(request.quote.attest),
                signature=bytes(request.quote.signature),
                reason=str(error),
            )
        except Exception:
            # The request is refused either way, and the refusal must stay INVALID_ARGUMENT: a
            # failed audit write must not change the answer, but it must be visible.
            log.exception("cannot record a malformed attestation in the audit log")

    def EndSession(
        self, request: attestation_pb2.EndSessionRequest, context: grpc.ServicerContext
    ) -> attestation_pb2.EndSessionResponse:
        validate.check_end_session(request)
        self.attestation.end_session(
            current_call().caller, request.session_id, request.workload_exit_code, request.outputs
        )
        return attestation_pb2.EndSessionResponse()


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """EKs, AKs, golden sets and parties for the operator; keys and approvals for parties."""

    def __init__(self, broker: Broker, *, process: ProcessInfo | None = None) -> None:
        self.enrollment = broker.enrollment
        self.administration = broker.administration
        self.custody = broker.custody
        self.operations = broker.operations
        self.clock = broker.clock
        self.trust_domain = broker.config.trust_domain
        self.process = process or ProcessInfo()

    def GetBrokerInfo(
        self, request: admin_pb2.GetBrokerInfoRequest, context: grpc.ServicerContext
    ) -> admin_pb2.GetBrokerInfoResponse:
        public = self.administration.registration_public_key()
        return admin_pb2.GetBrokerInfoResponse(
            version=__version__,
            registration_key=convert.recipient_key_pb(public.kem, public.raw),
            trust_domain=self.trust_domain,
        )

    def EnrollEk(
        self, request: admin_pb2.EnrollEkRequest, context: grpc.ServicerContext
    ) -> admin_pb2.EnrollEkResponse:
        validate.check_enroll_ek(request)
        record = self.enrollment.enroll_ek(
            current_call().caller,
            ek_public=bytes(request.ek_public),
            certificate=bytes(request.ek_certificate) or None,
            allow_without_certificate=request.allow_without_certificate,
        )
        return admin_pb2.EnrollEkResponse(ek=convert.ek_to_pb(record))

    def RevokeEk(
        self, request: admin_pb2.RevokeEkRequest, context: grpc.ServicerContext
    ) -> admin_pb2.RevokeEkResponse:
        validate.check_revoke_ek(request)
        self.enrollment.revoke_ek(current_call().caller, request.ek_id, request.reason)
        return admin_pb2.RevokeEkResponse()

    def ReadmitEk(
        self, request: admin_pb2.ReadmitEkRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ReadmitEkResponse:
        validate.check_readmit_ek(request)
        was_revoked = self.enrollment.readmit_ek(
            current_call().caller, request.ek_id, request.reason
        )
        return admin_pb2.ReadmitEkResponse(was_revoked=was_revoked)

    def ListEks(
        self, request: admin_pb2.ListEksRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListEksResponse:
        return admin_pb2.ListEksResponse(
            eks=[convert.ek_to_pb(e) for e in self.administration.list_eks()]
        )

    def EnrollAk(
        self, request: admin_pb2.EnrollAkRequest, context: grpc.ServicerContext
    ) -> admin_pb2.EnrollAkResponse:
        validate.check_enroll_ak(request)
        record = self.enrollment.enroll_ak(
            current_call().caller, ak_public=bytes(request.ak_public), ek_id=request.ek_id or None
        )
        return admin_pb2.EnrollAkResponse(ak=convert.ak_to_pb(record))

    def RevokeAk(
        self, request: admin_pb2.RevokeAkRequest, context: grpc.ServicerContext
    ) -> admin_pb2.RevokeAkResponse:
        validate.check_revoke_ak(request)
        self.enrollment.revoke_ak(current_call().caller, request.ak_name, request.reason)
        return admin_pb2.RevokeAkResponse()

    def ListAks(
        self, request: admin_pb2.ListAksRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListAksResponse:
        return admin_pb2.ListAksResponse(
            aks=[convert.ak_to_pb(a) for a in self.administration.list_aks()]
        )

    def SetGoldenPcrSet(
        self, request: admin_pb2.SetGoldenPcrSetRequest, context: grpc.ServicerContext
    ) -> admin_pb2.SetGoldenPcrSetResponse:
        validate.check_set_golden_set(request)
        golden = convert.golden_set_from_pb(request.golden_set, now=self.clock())
        stored = self.administration.set_golden_set(current_call().caller, golden)
        return admin_pb2.SetGoldenPcrSetResponse(golden_set=convert.golden_set_to_pb(stored))

    def ListGoldenPcrSets(
        self, request: admin_pb2.ListGoldenPcrSetsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListGoldenPcrSetsResponse:
        return admin_pb2.ListGoldenPcrSetsResponse(
            golden_sets=[
                convert.golden_set_to_pb(g) for g in self.administration.list_golden_sets()
            ]
        )

    def DeleteGoldenPcrSet(
        self, request: admin_pb2.DeleteGoldenPcrSetRequest, context: grpc.ServicerContext
    ) -> admin_pb2.DeleteGoldenPcrSetResponse:
        validate.check_delete_golden_set(request)
        self.administration.delete_golden_set(current_call().caller, request.name)
        return admin_pb2.DeleteGoldenPcrSetResponse()

    def AddParty(
        self, request: admin_pb2.AddPartyRequest, context: grpc.ServicerContext
    ) -> admin_pb2.AddPartyResponse:
        validate.check_add_party(request)
        party = self.administration.add_party(
            current_call().caller, convert.party_from_pb(request.party)
        )
        return admin_pb2.AddPartyResponse(party=convert.party_to_pb(party))

    def ListParties(
        self, request: admin_pb2.ListPartiesRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListPartiesResponse:
        return admin_pb2.ListPartiesResponse(
            parties=[convert.party_to_pb(p) for p in self.administration.list_parties()]
        )

    def RegisterDataKey(
        self, request: admin_pb2.RegisterDataKeyRequest, context: grpc.ServicerContext
    ) -> admin_pb2.RegisterDataKeyResponse:
        validate.check_register_data_key(request)
        record = self.administration.register_data_key(
            current_call().caller,
            key_id=request.key_id,
            sealed_data_key=bytes(request.sealed_data_key),
            description=request.description,
        )
        return admin_pb2.RegisterDataKeyResponse(key=convert.data_key_to_pb(record))

    def ListDataKeys(
        self, request: admin_pb2.ListDataKeysRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListDataKeysResponse:
        keys = self.administration.list_data_keys(current_call().caller)
        return admin_pb2.ListDataKeysResponse(keys=[convert.data_key_to_pb(k) for k in keys])

    def ApproveWorkload(
        self, request: admin_pb2.ApproveWorkloadRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ApproveWorkloadResponse:
        validate.check_approve_workload(request)
        approval = self.administration.approve_workload(
            current_call().caller,
            workload_name=request.manifest.name,
            manifest=manifest_from_pb(request.manifest),
            launch=convert.launch_from_manifest_pb(request.manifest),
            key_ids=tuple(request.key_ids),
            output_recipients=tuple(request.output_recipients),
            golden_set=request.golden_set or None,
            require_snp=request.require_snp,
        )
        return admin_pb2.ApproveWorkloadResponse(approval=convert.approval_to_pb(approval))

    def RevokeApproval(
        self, request: admin_pb2.RevokeApprovalRequest, context: grpc.ServicerContext
    ) -> admin_pb2.RevokeApprovalResponse:
        validate.check_revoke_approval(request)
        self.administration.revoke_approval(current_call().caller, request.approval_id)
        return admin_pb2.RevokeApprovalResponse()

    def ListApprovals(
        self, request: admin_pb2.ListApprovalsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListApprovalsResponse:
        approvals = self.administration.list_approvals(current_call().caller)
        return admin_pb2.ListApprovalsResponse(
            approvals=[convert.approval_to_pb(a) for a in approvals]
        )

    def ListAuditRecords(
        self, request: admin_pb2.ListAuditRecordsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListAuditRecordsResponse:
        validate.check_list_audit_records(request)
        records = self.administration.audit_records(
            current_call().caller,
            after=request.after_sequence,
            limit=request.limit or DEFAULT_AUDIT_PAGE,
        )
        return admin_pb2.ListAuditRecordsResponse(
            records=[convert.audit_record_to_pb(r) for r in records]
        )

    def VerifyAuditLog(
        self, request: admin_pb2.VerifyAuditLogRequest, context: grpc.ServicerContext
    ) -> admin_pb2.VerifyAuditLogResponse:
        report = self.administration.verify_audit_log(current_call().caller)
        return admin_pb2.VerifyAuditLogResponse(
            valid=report.valid,
            records_checked=report.records_checked,
            first_bad_sequence=report.first_bad_sequence or 0,
            problem=report.problem,
        )

    # --- key custody (operator) -------------------------------------------------------------

    def SetPartyKek(
        self, request: admin_pb2.SetPartyKekRequest, context: grpc.ServicerContext
    ) -> admin_pb2.SetPartyKekResponse:
        validate.check_set_party_kek(request)
        record = self.custody.set_party_kek(
            request.party, request.kek_ref, actor=current_call().caller
        )
        return admin_pb2.SetPartyKekResponse(
            party_kek=convert.party_kek_to_pb(
                party=record.party,
                kek_ref=record.kek_ref,
                source="imported",
                checked_key=record.checked_key,
                updated_at=record.updated_at,
            )
        )

    def ListPartyKeks(
        self, request: admin_pb2.ListPartyKeksRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListPartyKeksResponse:
        return admin_pb2.ListPartyKeksResponse(
            party_keks=[
                convert.party_kek_to_pb(
                    party=c.party,
                    kek_ref=c.kek_ref,
                    source=c.source,
                    checked_key=c.checked_key,
                    updated_at=c.updated_at,
                )
                for c in self.custody.party_keks()
            ]
        )

    def RewrapDataKey(
        self, request: admin_pb2.RewrapDataKeyRequest, context: grpc.ServicerContext
    ) -> admin_pb2.RewrapDataKeyResponse:
        validate.check_rewrap_data_key(request)
        try:
            previous = self.custody.current_kek_ref(request.key_id)
        except UnknownPolicyObjectError:
            previous = ""  # rotate_data_key refuses it, with an audit record
        record = self.custody.rotate_data_key(
            request.key_id, request.new_kek_ref, actor=current_call().caller
        )
        return admin_pb2.RewrapDataKeyResponse(
            key=convert.data_key_to_pb(record), previous_kek_ref=previous
        )

    def CheckKek(
        self, request: admin_pb2.CheckKekRequest, context: grpc.ServicerContext
    ) -> admin_pb2.CheckKekResponse:
        validate.check_check_kek(request)
        checked = self.custody.check_kek(request.kek_ref, actor=current_call().caller)
        return admin_pb2.CheckKekResponse(kek_ref=request.kek_ref, checked_key=checked)

    def GetStatus(
        self, request: admin_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> admin_pb2.GetStatusResponse:
        return status_pb(
            self.operations.store_status(),
            self.process,
            default_kek=self.custody.default_kek_ref,
            trust_domain=self.trust_domain,
        )


__all__ = ["DEFAULT_AUDIT_PAGE", "AdminServicer", "AttestationServicer"]


def _denial_pb(e: AttestationRefusedError) -> attestation_pb2.AttestDenial:
    """What the refused sidecar learns of a denial: coarse codes and audit record numbers."""
    assert e.code is not None
    denial = attestation_pb2.AttestDenial(
        reason=convert.denial_reason_pb(e.code), audit_record=e.audit_record
    )
    for withheld in e.withheld:
        denial.denied_keys.add(
            key_id=withheld.key_id,
            reason=convert.denial_reason_pb(withheld.code),
            audit_record=withheld.audit_record,
        )
    return denial

"""The broker's gate for the AMD SEV-SNP hardware root behind an Azure vTPM.

:class:`SnpGate` holds the trusted AMD roots and the ``[broker.azure_snp]`` policy, and checks the
HCL report and VCEK a sidecar sends with its quote (:mod:`broker.snp` does the verification). The
report must be fresh: its runtime claims' ``user-data`` must be
:func:`broker.snp.user_data_for` of the quote's qualifying data, which commits to this
attestation's nonce.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from broker import snp
from broker.config import AzureSnpConfig, read_config_file
from broker.errors import BrokerConfigError, SnpError, SnpMalformedError, SnpPolicyError
from evidence.binding import snp_enrollment_binding

__all__ = ["MAX_ROOT_FILE_BYTES", "SnpGate"]

#: An AMD root file is a few certificates; anything larger is the wrong file.
MAX_ROOT_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class SnpGate:
    """Verifies SEV-SNP evidence and applies the broker-wide SNP policy."""

    required: bool
    roots: snp.AmdRoots
    policy: snp.SnpPolicy
    #: Whether a verified HCL report may vouch for an EK at enrollment.
    enroll: bool = False

    @classmethod
    def from_config(cls, config: AzureSnpConfig) -> SnpGate:
        """The pinned AMD roots plus ``trusted_root_files``, and the configured policy.

        Raises:
            BrokerConfigError: a root file is unreadable, too large or not an AMD root.
        """
        roots = snp.pinned_amd_roots()
        for name in config.trusted_root_files:
            path = Path(name)
            data = read_config_file(path, max_bytes=MAX_ROOT_FILE_BYTES, what="azure_snp root file")
            try:
                roots = roots + snp.load_amd_roots(data, what=f"azure_snp root file {path}")
            except SnpError as e:
                raise BrokerConfigError(str(e)) from e
        policy = snp.SnpPolicy(
            allowed_measurements=frozenset(bytes.fromhex(m) for m in config.allowed_measurements),
            min_tcb=dict(config.min_tcb),
            forbid_debug=not config.allow_debug,
            vm_configuration=dict(config.require_vm_configuration),
            max_vmpl=config.max_vmpl,
        )
        return cls(required=config.required, roots=roots, policy=policy, enroll=config.enroll)

    def check(
        self, *, hcl_report: bytes, vcek: bytes, ak: object, qualifying_data: bytes
    ) -> snp.SnpClaims | None:
        """Verifies the evidence for the AK ``ak`` (a ``cryptography`` key) and this quote's
        ``qualifying_data``; returns the claims, or None when no evidence was sent and none
        is required.

        Raises:
            SnpPolicyError: evidence is required but absent, or the claims fail policy.
            SnpError: the evidence fails verification (see :func:`broker.snp.verify_hcl_report`).
        """
        if not hcl_report and not vcek:
            if self.required:
                raise SnpPolicyError("required: no SEV-SNP evidence (HCL report and VCEK) sent")
            return None
        if not hcl_report or not vcek:
            raise SnpMalformedError("an HCL report and a VCEK must be sent together")
        claims = snp.verify_hcl_report(
            hcl_report=hcl_report,
            vcek=vcek,
            roots=self.roots,
            ak=ak,
            expected_user_data=snp.user_data_for(qualifying_data),
        )
        snp.check_snp_policy(claims, self.policy)
        return claims

    def check_enrollment(
        self,
        *,
        hcl_report: bytes,
        vcek: bytes,
        ek: object,
        ak: object,
        ek_public: bytes,
        ak_public: bytes,
        tls_certificate_der: bytes,
    ) -> snp.SnpClaims:
        """Verifies enrollment evidence: an HCL report whose runtime claims name ``ek`` and
        ``ak`` (``cryptography`` keys) and whose ``user-data`` binds this request (the EK and
        AK publics as sent and the caller's TLS certificate), then the SNP policy.

        Raises:
            SnpPolicyError: enrollment through SEV-SNP is not enabled, or the claims fail policy.
            SnpError: the evidence fails verification or names other keys.
        """
        if not self.enroll:
            raise SnpPolicyError("enroll: EKs vouched by SEV-SNP evidence are not accepted")
        if not hcl_report or not vcek:
            raise SnpMalformedError("an HCL report and a VCEK must be sent together")
        binding = snp_enrollment_binding(
            ek_public=ek_public, ak_public=ak_public, tls_certificate_der=tls_certificate_der
        )
        claims = snp.verify_hcl_report(
            hcl_report=hcl_report,
            vcek=vcek,
            roots=self.roots,
            ak=ak,
            expected_user_data=snp.user_data_for(binding),
        )
        snp.check_ek_binding(claims, ek)
        snp.check_snp_policy(claims, self.policy)
        return claims

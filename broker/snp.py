"""Pure verification of the AMD SEV-SNP hardware root behind an Azure confidential VM's vTPM.

On an Azure SEV-SNP confidential VM the vTPM exposes an *HCL report* at NV index 0x01400001: a
32-byte header, the 1184-byte SNP attestation report that the AMD secure processor signed with
the chip's VCEK (or the cloud's VLEK), then the runtime claims (JSON) whose hash is the report's
REPORT_DATA. The runtime claims name the vTPM's attestation key (``HCLAkPub``), so a verified
HCL report says: *this AK lives in a vTPM inside an SEV-SNP guest with this launch measurement,
on a genuine AMD chip at this TCB*.

:func:`verify_hcl_report` runs every check in a fixed order, each with its own error (all under
:class:`~broker.errors.SnpError`): parse (``SnpMalformedError``), report version and signature
algorithm (``SnpUnsupportedError``), the VCEK certificate (``SnpCertificateError``), its chain to
a trusted AMD root (``SnpChainError``), the report signature (``SnpSignatureError``), the VCEK's
TCB extensions against REPORTED_TCB (``SnpTcbError``) and its hwID against CHIP_ID
(``SnpChipIdError``), REPORT_DATA against the runtime claims (``SnpReportDataError``), the
runtime claims themselves (``SnpRuntimeClaimsError``), the AK binding (``SnpAkBindingError``) and
the freshness of ``user-data`` (``SnpFreshnessError``). Policy over the verified claims
(measurements, minimum TCB, debug, VM configuration) is :func:`check_snp_policy`.

No I/O happens here except reading the pinned AMD roots shipped as package data
(:func:`pinned_amd_roots`), which is cached.

Layout references: AMD's SEV-SNP ABI specification (ATTESTATION_REPORT, TCB_VERSION) and AMD's
VCEK certificate specification (the 1.3.6.1.4.1.3704 extensions).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import struct
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import SignatureAlgorithmOID

from broker.errors import (
    SnpAkBindingError,
    SnpCertificateError,
    SnpChainError,
    SnpChipIdError,
    SnpEkBindingError,
    SnpFreshnessError,
    SnpMalformedError,
    SnpPolicyError,
    SnpReportDataError,
    SnpRuntimeClaimsError,
    SnpSignatureError,
    SnpTcbError,
    SnpUnsupportedError,
)
from evidence.binding import snp_user_data

__all__ = [
    "AMD_PRODUCTS",
    "HCL_REPORT_NV_INDEX",
    "USER_DATA_NV_INDEX",
    "AmdRoot",
    "AmdRoots",
    "HclReport",
    "SnpClaims",
    "SnpPolicy",
    "SnpReport",
    "TcbVersion",
    "check_ak_binding",
    "check_ek_binding",
    "check_snp_policy",
    "load_amd_roots",
    "parse_hcl_report",
    "pinned_amd_roots",
    "user_data_for",
    "verify_hcl_report",
]

#: The vTPM NV index that holds the HCL report (read it after writing the user data).
HCL_REPORT_NV_INDEX: Final = 0x01400001
#: The vTPM NV index whose 64 bytes the next HCL report carries as ``user-data``.
USER_DATA_NV_INDEX: Final = 0x01400002
#: Product lines whose AMD roots ship with the package.
AMD_PRODUCTS: Final = ("Milan", "Genoa", "Turin")

# HCL report layout: header, SNP report, runtime-claims header, runtime claims.
_HCL_HEADER_SIZE: Final = 32
_HCL_SIGNATURE: Final = b"HCLA"
_SNP_REPORT_SIZE: Final = 1184
_CLAIMS_HEADER_SIZE: Final = 20
_IGVM_REPORT_TYPE_SNP: Final = 2
# Runtime-claims hash types and the REPORT_DATA prefix each one fills.
_CLAIMS_HASHES: Final = {1: ("sha256", 32), 2: ("sha384", 48), 3: ("sha512", 64)}
#: Runtime claims larger than this are refused before parsing JSON.
_MAX_CLAIMS_BYTES: Final = 64 * 1024

# SNP ATTESTATION_REPORT field offsets (AMD SEV-SNP ABI specification).
_SIGNED_SIZE: Final = 0x2A0
_SIG_COMPONENT_SIZE: Final = 72
_SIG_ALGO_ECDSA_P384_SHA384: Final = 1
_MIN_REPORT_VERSION: Final = 2
_MAX_REPORT_VERSION: Final = 5
_POLICY_DEBUG_BIT: Final = 1 << 19
_POLICY_SMT_BIT: Final = 1 << 16
_POLICY_MIGRATE_MA_BIT: Final = 1 << 18
_SIGNING_KEY_VCEK: Final = 0
_SIGNING_KEY_VLEK: Final = 1
_SIGNING_KEY_NAMES: Final = {_SIGNING_KEY_VCEK: "VCEK", _SIGNING_KEY_VLEK: "VLEK"}
_TURIN_FAMILY: Final = 0x1A

# AMD's VCEK/VLEK certificate extensions.
_AMD_OID: Final = "1.3.6.1.4.1.3704.1"
_OID_PRODUCT_NAME: Final = x509.ObjectIdentifier(f"{_AMD_OID}.2")
_OID_BOOTLOADER: Final = x509.ObjectIdentifier(f"{_AMD_OID}.3.1")
_OID_TEE: Final = x509.ObjectIdentifier(f"{_AMD_OID}.3.2")
_OID_SNP: Final = x509.ObjectIdentifier(f"{_AMD_OID}.3.3")
_OID_MICROCODE: Final = x509.ObjectIdentifier(f"{_AMD_OID}.3.8")
_OID_FMC: Final = x509.ObjectIdentifier(f"{_AMD_OID}.3.9")
_OID_HWID: Final = x509.ObjectIdentifier(f"{_AMD_OID}.4")

_SHA384: Final = hashes.SHA384()


# --- typed report -------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class TcbVersion:
    """One TCB_VERSION: the security patch levels of the chip's firmware components.

    ``fmc`` exists on Turin only (``None`` elsewhere). ``raw`` is the 64-bit field as reported.
    """

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None
    raw: int = field(default=0, compare=False)

    @classmethod
    def from_raw(cls, raw: int, *, turin: bool) -> TcbVersion:
        """Splits the 64-bit field: Milan and Genoa keep BOOT_LOADER, TEE, SNP, MICROCODE in
        bytes 0, 1, 6, 7; Turin has FMC, BOOT_LOADER, TEE, SNP in bytes 0-3, MICROCODE in 7."""
        b = raw.to_bytes(8, "little")
        if turin:
            return cls(bootloader=b[1], tee=b[2], snp=b[3], microcode=b[7], fmc=b[0], raw=raw)
        return cls(bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7], raw=raw)

    def components(self) -> dict[str, int]:
        """The components by name (``fmc`` only when present)."""
        out = {
            "bootloader": self.bootloader,
            "tee": self.tee,
            "snp": self.snp,
            "microcode": self.microcode,
        }
        if self.fmc is not None:
            out["fmc"] = self.fmc
        return out

    def below(self, minimum: Mapping[str, int]) -> list[str]:
        """The components that are below ``minimum`` (missing components count as 0)."""
        mine = self.components()
        return [
            f"{name} {mine.get(name, 0)} < {floor}"
            for name, floor in sorted(minimum.items())
            if mine.get(name, 0) < floor
        ]


@dataclass(frozen=True)
class SnpReport:
    """The fields of an SNP ATTESTATION_REPORT that the verifier and policy use."""

    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: int
    #: 0 for the VCEK, 1 for a VLEK (bits 2-4 of the flags word).
    signing_key: int
    mask_chip_key: bool
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    reported_tcb: TcbVersion
    #: CPUID family, model and stepping (report version 3 and later; ``None`` before).
    cpuid: tuple[int, int, int] | None
    chip_id: bytes
    committed_tcb: TcbVersion
    launch_tcb: TcbVersion
    #: The bytes the signature covers (0 .. 0x29F) and the signature's r and s.
    signed_bytes: bytes = field(repr=False)
    signature_r: int = field(repr=False)
    signature_s: int = field(repr=False)

    @property
    def debug(self) -> bool:
        """POLICY bit 19: the guest may be debugged (the host can read its memory)."""
        return bool(self.policy & _POLICY_DEBUG_BIT)

    @property
    def turin(self) -> bool:
        return self.cpuid is not None and self.cpuid[0] == _TURIN_FAMILY


@dataclass(frozen=True)
class HclReport:
    """A parsed HCL report: the SNP report and the runtime claims it commits to."""

    snp: SnpReport
    #: The runtime claims exactly as hashed into REPORT_DATA, and their hash algorithm.
    runtime_claims_bytes: bytes = field(repr=False)
    claims_hash: str
    report_type: int


@dataclass(frozen=True)
class SnpClaims:
    """What a verified HCL report proves: the typed claims policy decides on."""

    measurement: bytes
    policy: int
    debug: bool
    vmpl: int
    guest_svn: int
    report_version: int
    reported_tcb: TcbVersion
    committed_tcb: TcbVersion
    launch_tcb: TcbVersion
    chip_id: bytes
    host_data: bytes
    report_data: bytes
    #: "vcek" or "vlek", and the product line of the AMD root that the chain ends in.
    signing_key: str
    product: str
    #: The runtime claims' ``vm-configuration`` (secure-boot, tpm-enabled, console-enabled...).
    vm_configuration: Mapping[str, Any]
    #: The 64 bytes of ``user-data`` (what was last written to NV index 0x01400002).
    user_data: bytes
    #: The vTPM's AK as the runtime claims name it (``HCLAkPub``).
    ak_public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey = field(repr=False)
    runtime_claims: Mapping[str, Any] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view (bytes as hex), for the CLI and the audit trail."""
        return {
            "report_version": self.report_version,
            "measurement": self.measurement.hex(),
            "policy": f"0x{self.policy:x}",
            "debug": self.debug,
            "vmpl": self.vmpl,
            "guest_svn": self.guest_svn,
            "reported_tcb": self.reported_tcb.components(),
            "committed_tcb": self.committed_tcb.components(),
            "launch_tcb": self.launch_tcb.components(),
            "chip_id": self.chip_id.hex(),
            "host_data": self.host_data.hex(),
            "report_data": self.report_data.hex(),
            "signing_key": self.signing_key,
            "product": self.product,
            "vm_configuration": dict(self.vm_configuration),
            "user_data": self.user_data.hex(),
        }


# --- parsing ------------------------------------------------------------------------------


def _u32(data: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", data, off)[0])


def _u64(data: bytes, off: int) -> int:
    return int(struct.unpack_from("<Q", data, off)[0])


def parse_snp_report(report: bytes) -> SnpReport:
    """Parses one 1184-byte SNP ATTESTATION_REPORT (no check of its signature).

    Raises:
        SnpMalformedError: the report is not 1184 bytes.
        SnpUnsupportedError: the version is outside 2..5 or the signature algorithm is not
            ECDSA P-384 with SHA-384.
    """
    if len(report) != _SNP_REPORT_SIZE:
        raise SnpMalformedError(f"SNP report is {len(report)} bytes, not {_SNP_REPORT_SIZE}")
    version = _u32(report, 0x00)
    if not _MIN_REPORT_VERSION <= version <= _MAX_REPORT_VERSION:
        raise SnpUnsupportedError(
            f"SNP report version {version} is not supported "
            f"({_MIN_REPORT_VERSION}..{_MAX_REPORT_VERSION})"
        )
    sig_algo = _u32(report, 0x34)
    if sig_algo != _SIG_ALGO_ECDSA_P384_SHA384:
        raise SnpUnsupportedError(
            f"SNP report signature algorithm {sig_algo} is not ECDSA P-384 with SHA-384"
        )
    # The CPUID fields exist from version 3; in version 2 these bytes are reserved (zero).
    cpuid = (report[0x188], report[0x189], report[0x18A]) if version >= 3 else None
    turin = cpuid is not None and cpuid[0] == _TURIN_FAMILY
    flags = _u32(report, 0x48)

    def tcb(off: int) -> TcbVersion:
        return TcbVersion.from_raw(_u64(report, off), turin=turin)

    sig = report[_SIGNED_SIZE:]
    return SnpReport(
        version=version,
        guest_svn=_u32(report, 0x04),
        policy=_u64(report, 0x08),
        family_id=report[0x10:0x20],
        image_id=report[0x20:0x30],
        vmpl=_u32(report, 0x30),
        signature_algo=sig_algo,
        current_tcb=tcb(0x38),
        platform_info=_u64(report, 0x40),
        signing_key=(flags >> 2) & 0x7,
        mask_chip_key=bool(flags & 0x2),
        report_data=report[0x50:0x90],
        measurement=report[0x90:0xC0],
        host_data=report[0xC0:0xE0],
        id_key_digest=report[0xE0:0x110],
        author_key_digest=report[0x110:0x140],
        report_id=report[0x140:0x160],
        reported_tcb=tcb(0x180),
        cpuid=cpuid,
        chip_id=report[0x1A0:0x1E0],
        committed_tcb=tcb(0x1E0),
        launch_tcb=tcb(0x1F0),
        signed_bytes=report[:_SIGNED_SIZE],
        # r and s are little-endian, each in a 72-byte field (P-384 needs only 48).
        signature_r=int.from_bytes(sig[:_SIG_COMPONENT_SIZE], "little"),
        signature_s=int.from_bytes(sig[_SIG_COMPONENT_SIZE : 2 * _SIG_COMPONENT_SIZE], "little"),
    )


def parse_hcl_report(data: bytes) -> HclReport:
    """Parses an HCL report (the contents of NV index 0x01400001), with bounds checks.

    Trailing bytes after the runtime claims are allowed: the NV index is larger than the report
    and the vTPM pads it.

    Raises:
        SnpMalformedError: too short, not an HCL report, not an SNP report, or the runtime
            claims do not fit.
        SnpUnsupportedError: see :func:`parse_snp_report`, or an unknown claims hash type.
    """
    data = bytes(data)
    fixed = _HCL_HEADER_SIZE + _SNP_REPORT_SIZE + _CLAIMS_HEADER_SIZE
    if len(data) < fixed:
        raise SnpMalformedError(f"HCL report is {len(data)} bytes, shorter than {fixed}")
    if data[:4] != _HCL_SIGNATURE:
        raise SnpMalformedError("HCL report does not start with the 'HCLA' signature")
    snp = parse_snp_report(data[_HCL_HEADER_SIZE : _HCL_HEADER_SIZE + _SNP_REPORT_SIZE])
    off = _HCL_HEADER_SIZE + _SNP_REPORT_SIZE
    data_size, _claims_version, report_type, hash_type, var_size = struct.unpack_from(
        "<5I", data, off
    )
    if report_type != _IGVM_REPORT_TYPE_SNP:
        raise SnpMalformedError(f"HCL report type {report_type} is not SNP (2)")
    if hash_type not in _CLAIMS_HASHES:
        raise SnpUnsupportedError(f"runtime claims hash type {hash_type} is not supported")
    if var_size > _MAX_CLAIMS_BYTES:
        raise SnpMalformedError(f"runtime claims are {var_size} bytes, more than allowed")
    if data_size != var_size + _CLAIMS_HEADER_SIZE:
        raise SnpMalformedError(
            f"runtime claims header says {data_size} bytes for {var_size} bytes of claims"
        )
    start = off + _CLAIMS_HEADER_SIZE
    if start + var_size > len(data):
        raise SnpMalformedError(
            f"runtime claims ({var_size} bytes) run past the end of the HCL report"
        )
    return HclReport(
        snp=snp,
        runtime_claims_bytes=data[start : start + var_size],
        claims_hash=_CLAIMS_HASHES[hash_type][0],
        report_type=report_type,
    )


# --- AMD roots ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AmdRoot:
    """One product line's AMD root: the ARK and the keys it signs (ASK for VCEKs, ASVK for
    VLEKs). Trust is pinned to the exact ARK certificate."""

    product: str
    ark: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]


@dataclass(frozen=True)
class AmdRoots:
    """The set of AMD roots a verifier trusts."""

    roots: tuple[AmdRoot, ...]

    def __add__(self, other: AmdRoots) -> AmdRoots:
        return AmdRoots(roots=self.roots + other.roots)

    @property
    def products(self) -> tuple[str, ...]:
        return tuple(r.product for r in self.roots)


def _load_certs(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        with warnings.catch_warnings():
            # AMD's certificates use serial number 0, which cryptography warns about.
            warnings.simplefilter("ignore")
            return x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise SnpChainError(f"{what} holds no valid PEM certificates") from e


def _check_issued(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    """Checks that ``issuer`` signed ``cert`` with RSA-PSS over SHA-384, as AMD signs."""
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS or not isinstance(
        cert.signature_hash_algorithm, hashes.SHA384
    ):
        raise SnpChainError(f"{what} is not signed with RSA-PSS over SHA-384")
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as e:
        subject = issuer.subject.rfc4514_string()
        raise SnpChainError(f"{what} is not signed by {subject}") from e


def load_amd_roots(pem: bytes, *, what: str = "AMD root file") -> AmdRoots:
    """Reads AMD roots from PEM: each self-signed certificate is an ARK; every other one must
    be signed by an ARK in the same data (ASK, ASVK). The product is the ARK's common name
    after ``ARK-`` (``ARK-Milan`` gives ``Milan``).

    Raises:
        SnpChainError: no certificates, no ARK, an ARK that is not self-signed, or an
            intermediate signed by no ARK in the file.
    """
    certs = _load_certs(pem, what)
    arks = [c for c in certs if c.issuer == c.subject]
    if not arks:
        raise SnpChainError(f"{what} holds no self-signed ARK")
    roots = []
    for ark in arks:
        _check_issued(ark, ark, f"{what}: ARK {ark.subject.rfc4514_string()}")
        cn = ark.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        name = str(cn[0].value) if cn else ark.subject.rfc4514_string()
        product = name.removeprefix("ARK-")
        inter = tuple(c for c in certs if c.issuer == ark.subject and c is not ark)
        for c in inter:
            _check_issued(c, ark, f"{what}: {c.subject.rfc4514_string()}")
        roots.append(AmdRoot(product=product, ark=ark, intermediates=inter))
    orphans = [
        c for c in certs if c.issuer != c.subject and all(c.issuer != a.subject for a in arks)
    ]
    if orphans:
        raise SnpChainError(
            f"{what}: {orphans[0].subject.rfc4514_string()} is signed by no ARK in the file"
        )
    return AmdRoots(roots=tuple(roots))


@functools.cache
def pinned_amd_roots() -> AmdRoots:
    """AMD's roots for Milan, Genoa and Turin, as shipped with the package (ASK, ARK, ASVK as
    AMD's Key Distribution Service publishes them).

    Raises:
        SnpChainError: the package data is damaged.
    """
    roots = AmdRoots(roots=())
    # Next to this module, not resources.files("broker"): a directory named broker/ in the
    # working directory (the demo's state folder) must not stand in for the package's data.
    base = Path(__file__).with_name("amd_roots")
    for product in AMD_PRODUCTS:
        pem = (base / f"{product.lower()}.pem").read_bytes()
        roots = roots + load_amd_roots(pem, what=f"pinned {product} roots")
    return roots


# --- the VCEK -----------------------------------------------------------------------------


def _load_vcek(der: bytes) -> x509.Certificate:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if der.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificate(der)
            return x509.load_der_x509_certificate(der)
    except ValueError as e:
        raise SnpCertificateError("VCEK is not a valid X.509 certificate") from e


@dataclass(frozen=True)
class _Chained:
    product: str
    #: Whether the intermediate is AMD's VLEK signing key (ASVK, ``SEV-VLEK-<product>``).
    vlek: bool
    #: (what, subject, not before, not after) of the VCEK, its ASK and the ARK.
    validity: tuple[tuple[str, str, datetime, datetime], ...]


# A chip's VCEK is the same for every attestation until its TCB changes, so the RSA-PSS chain
# check (about a fifth of the SNP verification's time) is done once per VCEK and root set.
# Only successes are cached (an exception is not a return value); validity times are checked
# on every call against the caller's clock.
@functools.lru_cache(maxsize=64)
def _chain_signatures(vcek_der: bytes, roots: AmdRoots) -> _Chained:
    vcek = _load_vcek(vcek_der)
    for root in roots.roots:
        for inter in root.intermediates:
            if inter.subject != vcek.issuer:
                continue
            _check_issued(vcek, inter, "VCEK")
            validity = tuple(
                (what, c.subject.rfc4514_string(), c.not_valid_before_utc, c.not_valid_after_utc)
                for c, what in ((vcek, "VCEK"), (inter, "ASK"), (root.ark, "ARK"))
            )
            cn = inter.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            vlek = bool(cn) and str(cn[0].value).startswith("SEV-VLEK-")
            return _Chained(product=root.product, vlek=vlek, validity=validity)
    raise SnpChainError(
        f"VCEK issuer {vcek.issuer.rfc4514_string()} is not a trusted AMD key "
        f"(trusted: {', '.join(roots.products) or 'none'})"
    )


def _der_integer(value: bytes, what: str) -> int:
    # An extension value is one DER INTEGER: tag 0x02, a short length, then the bytes. A full
    # ASN.1 parser is not needed for that, and anything else is refused.
    if len(value) < 3 or value[0] != 0x02 or value[1] != len(value) - 2 or value[1] > 8:
        raise SnpCertificateError(f"VCEK extension {what} is not a small DER INTEGER")
    return int.from_bytes(value[2:], "big", signed=True)


def _extension(vcek: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        ext = vcek.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise SnpCertificateError(f"VCEK extension {oid.dotted_string} has an unexpected type")
    return bytes(value.value)


def _check_tcb_extensions(vcek: x509.Certificate, report: SnpReport) -> None:
    tcb = report.reported_tcb
    wanted = [
        (_OID_BOOTLOADER, "bootloader", tcb.bootloader),
        (_OID_TEE, "tee", tcb.tee),
        (_OID_SNP, "snp", tcb.snp),
        (_OID_MICROCODE, "microcode", tcb.microcode),
    ]
    if tcb.fmc is not None:
        wanted.append((_OID_FMC, "fmc", tcb.fmc))
    for oid, name, reported in wanted:
        raw = _extension(vcek, oid)
        if raw is None:
            raise SnpTcbError(f"VCEK has no {name} TCB extension ({oid.dotted_string})")
        certified = _der_integer(raw, name)
        if certified != reported:
            raise SnpTcbError(
                f"VCEK certifies {name} SPL {certified} but the report's REPORTED_TCB has "
                f"{reported}"
            )


def _check_hwid(vcek: x509.Certificate, report: SnpReport) -> None:
    raw = _extension(vcek, _OID_HWID)
    if raw is None:
        raise SnpChipIdError("VCEK has no hwID extension")
    # AMD's KDS puts the 64 raw bytes in the extension; a DER OCTET STRING is accepted too.
    if len(raw) == 66 and raw[:2] == b"\x04\x40":
        raw = raw[2:]
    if len(raw) != 64:
        raise SnpChipIdError(f"VCEK hwID is {len(raw)} bytes, not 64")
    if report.mask_chip_key or not any(report.chip_id):
        raise SnpChipIdError("SNP report masks CHIP_ID: the VCEK cannot be matched to the chip")
    if not hmac.compare_digest(raw, report.chip_id):
        raise SnpChipIdError("VCEK hwID is not the report's CHIP_ID (another chip's VCEK)")


# --- runtime claims -----------------------------------------------------------------------


def _b64url(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise SnpRuntimeClaimsError(f"{what} is not a string")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (ValueError, binascii.Error) as e:
        raise SnpRuntimeClaimsError(f"{what} is not base64url") from e


_JWK_CURVES: Final = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}


def _jwk_public(
    jwk: Mapping[str, Any], kid: str = "HCLAkPub"
) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    kty = jwk.get("kty")
    try:
        if kty == "RSA":
            n = int.from_bytes(_b64url(jwk.get("n"), f"{kid} n"), "big")
            e = int.from_bytes(_b64url(jwk.get("e"), f"{kid} e"), "big")
            return rsa.RSAPublicNumbers(e, n).public_key()
        if kty == "EC" and jwk.get("crv") in _JWK_CURVES:
            x = int.from_bytes(_b64url(jwk.get("x"), f"{kid} x"), "big")
            y = int.from_bytes(_b64url(jwk.get("y"), f"{kid} y"), "big")
            return ec.EllipticCurvePublicNumbers(x, y, _JWK_CURVES[jwk["crv"]]).public_key()
    except ValueError as e:
        raise SnpRuntimeClaimsError(f"{kid} is not a valid public key: {e}") from e
    raise SnpRuntimeClaimsError(f"{kid} has an unsupported key type {kty!r}")


def _parse_claims(
    raw: bytes,
) -> tuple[dict[str, Any], rsa.RSAPublicKey | ec.EllipticCurvePublicKey]:
    try:
        doc = json.loads(raw.rstrip(b"\x00"))
    except (ValueError, RecursionError) as e:
        raise SnpRuntimeClaimsError("runtime claims are not valid JSON") from e
    if not isinstance(doc, dict):
        raise SnpRuntimeClaimsError("runtime claims are not a JSON object")
    keys = doc.get("keys")
    if not isinstance(keys, list):
        raise SnpRuntimeClaimsError('runtime claims have no "keys" list')
    aks = [k for k in keys if isinstance(k, dict) and k.get("kid") == "HCLAkPub"]
    if len(aks) != 1:
        raise SnpRuntimeClaimsError(f"runtime claims name {len(aks)} HCLAkPub keys, not one")
    return doc, _jwk_public(aks[0])


def _same_key(a: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, b: object) -> bool:
    if isinstance(a, rsa.RSAPublicKey) and isinstance(b, rsa.RSAPublicKey):
        return a.public_numbers() == b.public_numbers()
    if isinstance(a, ec.EllipticCurvePublicKey) and isinstance(b, ec.EllipticCurvePublicKey):
        return a.public_numbers() == b.public_numbers()
    return False


def check_ek_binding(claims: SnpClaims, ek: object) -> None:
    """Checks that the verified claims name ``ek`` (a ``cryptography`` key) as ``HCLEkPub``.

    Raises:
        SnpRuntimeClaimsError: the claims name no valid ``HCLEkPub`` (or several).
        SnpEkBindingError: they name another key.
    """
    keys = claims.runtime_claims.get("keys", [])
    eks = [k for k in keys if isinstance(k, dict) and k.get("kid") == "HCLEkPub"]
    if len(eks) != 1:
        raise SnpRuntimeClaimsError(f"runtime claims name {len(eks)} HCLEkPub keys, not one")
    if not _same_key(_jwk_public(eks[0], "HCLEkPub"), ek):
        raise SnpEkBindingError("the HCL report's HCLEkPub is not the EK being enrolled")


def check_ak_binding(claims: SnpClaims, ak: object) -> None:
    """Checks that the verified claims' ``HCLAkPub`` is ``ak`` (a ``cryptography`` key).

    Raises:
        SnpAkBindingError: it is another key.
    """
    if not _same_key(claims.ak_public, ak):
        raise SnpAkBindingError("the HCL report's HCLAkPub is not the AK that signed the quote")


def user_data_for(qualifying_data: bytes) -> bytes:
    """The ``user-data`` a fresh report carries for a quote with this qualifying data
    (:func:`evidence.binding.snp_user_data`: SHA-512 over a label and the qualifying data)."""
    return snp_user_data(qualifying_data)


# --- the verifier -------------------------------------------------------------------------


def verify_hcl_report(
    *,
    hcl_report: bytes,
    vcek: bytes,
    roots: AmdRoots,
    ak: object | None = None,
    expected_user_data: bytes | None = None,
    now: datetime | None = None,
) -> SnpClaims:
    """Verifies an HCL report and the VCEK (or VLEK) that signed its SNP report.

    ``ak`` is the public key (a ``cryptography`` key) of the AK that signed the quote: the
    runtime claims' ``HCLAkPub`` must be that key. ``expected_user_data`` is what the claims'
    ``user-data`` must be (:func:`user_data_for` of the quote's qualifying data).

    Raises:
        SnpMalformedError, SnpUnsupportedError: see :func:`parse_hcl_report`.
        SnpCertificateError: the VCEK is not a certificate, not a P-384 key, or has a malformed
            AMD extension.
        SnpChainError: the VCEK does not chain to a trusted AMD root, or a certificate of the
            chain is not valid at ``now``.
        SnpSignatureError: the SNP report's signature does not verify under the VCEK.
        SnpTcbError: the VCEK's TCB extensions are not the report's REPORTED_TCB.
        SnpChipIdError: the VCEK's hwID is not the report's CHIP_ID.
        SnpReportDataError: REPORT_DATA is not the hash of the runtime claims.
        SnpRuntimeClaimsError: the runtime claims are malformed or lack one ``HCLAkPub``.
        SnpAkBindingError: ``HCLAkPub`` is not ``ak``.
        SnpFreshnessError: ``user-data`` is not ``expected_user_data``.
    """
    parsed = parse_hcl_report(hcl_report)
    report = parsed.snp
    cert = _load_vcek(bytes(vcek))
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise SnpCertificateError("VCEK's key is not an ECDSA P-384 key")
    if report.signing_key not in (_SIGNING_KEY_VCEK, _SIGNING_KEY_VLEK):
        raise SnpUnsupportedError(f"SNP report signing key {report.signing_key} is not VCEK/VLEK")
    chained = _chain_signatures(bytes(vcek), roots)
    at = now or datetime.now(UTC)
    for what, subject, not_before, not_after in chained.validity:
        if not not_before <= at <= not_after:
            raise SnpChainError(f"{what} {subject} is not valid now")
    product = chained.product
    # A VLEK is issued to a cloud provider, not to one chip: the report must say which key
    # signed it, and that must be the kind of key the certificate is.
    if chained.vlek != (report.signing_key == _SIGNING_KEY_VLEK):
        kind = "a VLEK" if chained.vlek else "a VCEK"
        raise SnpChainError(
            f"the report's signing key field says {_SIGNING_KEY_NAMES[report.signing_key]} but "
            f"the certificate is {kind}"
        )
    try:
        key.verify(
            encode_dss_signature(report.signature_r, report.signature_s),
            report.signed_bytes,
            ec.ECDSA(_SHA384),
        )
    except InvalidSignature as e:
        raise SnpSignatureError("SNP report signature does not verify under the VCEK") from e
    _check_tcb_extensions(cert, report)
    if report.signing_key == _SIGNING_KEY_VCEK:
        _check_hwid(cert, report)
    hash_name = parsed.claims_hash
    digest = hashlib.new(hash_name, parsed.runtime_claims_bytes).digest()
    if not hmac.compare_digest(report.report_data[: len(digest)], digest):
        raise SnpReportDataError(f"REPORT_DATA is not the {hash_name} of the runtime claims")
    claims, hcl_ak = _parse_claims(parsed.runtime_claims_bytes)
    if ak is not None and not _same_key(hcl_ak, ak):
        raise SnpAkBindingError("the HCL report's HCLAkPub is not the AK that signed the quote")
    vm_config = claims.get("vm-configuration", {})
    if not isinstance(vm_config, dict):
        raise SnpRuntimeClaimsError("runtime claims' vm-configuration is not an object")
    user_hex = claims.get("user-data", "")
    try:
        user_data = bytes.fromhex(user_hex) if isinstance(user_hex, str) else b""
    except ValueError as e:
        raise SnpRuntimeClaimsError("runtime claims' user-data is not hex") from e
    if expected_user_data is not None and not hmac.compare_digest(user_data, expected_user_data):
        raise SnpFreshnessError(
            "runtime claims' user-data is not the digest of this quote's qualifying data "
            "(a stale or replayed HCL report)"
        )
    return SnpClaims(
        measurement=report.measurement,
        policy=report.policy,
        debug=report.debug,
        vmpl=report.vmpl,
        guest_svn=report.guest_svn,
        report_version=report.version,
        reported_tcb=report.reported_tcb,
        committed_tcb=report.committed_tcb,
        launch_tcb=report.launch_tcb,
        chip_id=report.chip_id,
        host_data=report.host_data,
        report_data=report.report_data,
        signing_key="vcek" if report.signing_key == _SIGNING_KEY_VCEK else "vlek",
        product=product,
        vm_configuration=MappingProxyType(dict(vm_config)),
        user_data=user_data,
        ak_public=hcl_ak,
        runtime_claims=MappingProxyType(claims),
    )


# --- policy -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnpPolicy:
    """What the broker demands of verified SNP claims (``[broker.azure_snp]``)."""

    #: Accepted launch measurements (48 bytes each); empty accepts any.
    allowed_measurements: Collection[bytes] = ()
    #: Minimum REPORTED_TCB per component (bootloader, tee, snp, microcode, fmc).
    min_tcb: Mapping[str, int] = field(default_factory=dict)
    #: Refuse guests whose policy allows debugging (the host could read their memory).
    forbid_debug: bool = True
    #: Required runtime-claims ``vm-configuration`` values, e.g. ``{"secure-boot": True}``.
    vm_configuration: Mapping[str, Any] = field(default_factory=dict)
    #: Highest VMPL the report may come from (Azure's paravisor reports at VMPL 0).
    max_vmpl: int = 0


def check_snp_policy(claims: SnpClaims, policy: SnpPolicy) -> None:
    """Checks verified SNP claims against policy, in a fixed order.

    Raises:
        SnpPolicyError: naming the first failed check (debug, VMPL, measurement, TCB,
            vm-configuration).
    """
    if policy.forbid_debug and claims.debug:
        raise SnpPolicyError("debug: the guest's SNP policy allows debugging")
    if claims.vmpl > policy.max_vmpl:
        raise SnpPolicyError(f"vmpl: report from VMPL {claims.vmpl}, above {policy.max_vmpl}")
    if policy.allowed_measurements and claims.measurement not in policy.allowed_measurements:
        raise SnpPolicyError(f"measurement: {claims.measurement.hex()} is not allowed")
    low = claims.reported_tcb.below(policy.min_tcb)
    if low:
        raise SnpPolicyError(f"tcb: reported TCB below the minimum ({', '.join(low)})")
    for name, wanted in sorted(policy.vm_configuration.items()):
        have = claims.vm_configuration.get(name)
        if have != wanted:
            raise SnpPolicyError(f"vm-configuration: {name} is {have!r}, required {wanted!r}")

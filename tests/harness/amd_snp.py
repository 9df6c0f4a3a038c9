"""A test AMD SEV-SNP root (ARK -> ASK -> VCEK) and synthetic HCL reports signed by it.

The certificates are made like AMD's: RSA-PSS over SHA-384 for the ARK and ASK signatures, a
P-384 VCEK with AMD's TCB extensions (1.3.6.1.4.1.3704.1.3.x as DER INTEGERs) and the chip's
hwID (64 raw bytes). Reports follow the ATTESTATION_REPORT layout of AMD's SEV-SNP ABI
specification, wrapped in the HCL report layout of Azure's vTPM. Tests configure this root as
an extra trusted root; it is never part of the package.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from broker.tpmkeys import load_public
from sidecar.config import TpmConfig
from sidecar.snp import HCL_REPORT_NV_INDEX, USER_DATA_NV_INDEX
from sidecar.tpm.device import Tpm

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_AMD = "1.3.6.1.4.1.3704.1"


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Micro Devices"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _der_int(value: int) -> bytes:
    body = value.to_bytes((value.bit_length() + 8) // 8 or 1, "big")
    return bytes([0x02, len(body)]) + body


def _cert(
    subject: str | x509.Name,
    issuer: str | x509.Name,
    public: Any,
    signer: rsa.RSAPrivateKey,
    extensions: list[x509.ExtensionType] = (),  # type: ignore[assignment]
    *,
    not_after: datetime | None = None,
) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject if isinstance(subject, x509.Name) else _name(subject))
        .issuer_name(issuer if isinstance(issuer, x509.Name) else _name(issuer))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(not_after or now + timedelta(days=365))
    )
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(signer, hashes.SHA384(), rsa_padding=_PSS)


@dataclass(frozen=True)
class Tcb:
    bootloader: int = 4
    tee: int = 0
    snp: int = 24
    microcode: int = 219

    def raw(self) -> int:
        # The Milan/Genoa layout: bytes 0, 1, 6, 7.
        b = bytearray(8)
        b[0], b[1], b[6], b[7] = self.bootloader, self.tee, self.snp, self.microcode
        return int.from_bytes(b, "little")


@dataclass
class SyntheticAmdRoot:
    """ARK, ASK and ASVK (which signs VLEKs) of a made-up product line, ``ARK-<product>``."""

    product: str = "Test"
    #: An ASK subject to copy (an impostor's chain naming itself like AMD's real ASK).
    ask_subject: x509.Name | None = None
    ark_key: rsa.RSAPrivateKey = field(init=False)
    ask_key: rsa.RSAPrivateKey = field(init=False)
    ark: x509.Certificate = field(init=False)
    ask: x509.Certificate = field(init=False)
    asvk_key: rsa.RSAPrivateKey = field(init=False)
    asvk: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        self.ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.asvk_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ark_name, ask_name = f"ARK-{self.product}", f"SEV-{self.product}"
        self.ark = _cert(ark_name, ark_name, self.ark_key.public_key(), self.ark_key)
        self.ask = _cert(
            self.ask_subject or ask_name, ark_name, self.ask_key.public_key(), self.ark_key
        )
        self.asvk = _cert(
            f"SEV-VLEK-{self.product}", ark_name, self.asvk_key.public_key(), self.ark_key
        )

    def pem(self) -> bytes:
        """ASK, ARK and ASVK, as in AMD's published files."""
        certs = (self.ask, self.ark, self.asvk)
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)

    def chip(
        self, chip_id: bytes | None = None, tcb: Tcb | None = None, *, vlek: bool = False
    ) -> SyntheticChip:
        """A chip with its VCEK, or (``vlek``) a cloud provider's VLEK."""
        return SyntheticChip(
            root=self, chip_id=chip_id or os.urandom(64), tcb=tcb or Tcb(), vlek=vlek
        )


@dataclass
class SyntheticChip:
    """One chip: its VCEK for one TCB, and reports signed by it."""

    root: SyntheticAmdRoot
    chip_id: bytes
    tcb: Tcb
    vlek: bool = False
    key: ec.EllipticCurvePrivateKey = field(init=False)
    vcek: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP384R1())
        self.vcek = self.make_vcek()

    def make_vcek(
        self,
        *,
        hwid: bytes | None = None,
        tcb: Tcb | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> x509.Certificate:
        t = tcb or self.tcb
        ext = [
            x509.UnrecognizedExtension(x509.ObjectIdentifier(f"{_AMD}.1"), _der_int(0)),
            x509.UnrecognizedExtension(
                x509.ObjectIdentifier(f"{_AMD}.2"), b"\x16\x04" + self.root.product[:4].encode()
            ),
            x509.UnrecognizedExtension(
                x509.ObjectIdentifier(f"{_AMD}.3.1"), _der_int(t.bootloader)
            ),
            x509.UnrecognizedExtension(x509.ObjectIdentifier(f"{_AMD}.3.2"), _der_int(t.tee)),
            x509.UnrecognizedExtension(x509.ObjectIdentifier(f"{_AMD}.3.3"), _der_int(t.snp)),
            x509.UnrecognizedExtension(x509.ObjectIdentifier(f"{_AMD}.3.8"), _der_int(t.microcode)),
        ]
        public = (key or self.key).public_key()
        if self.vlek:
            # A VLEK names no chip: AMD issues it to a cloud provider, signed by the ASVK.
            return _cert(
                "SEV-VLEK",
                self.root.asvk.subject,
                public,
                self.root.asvk_key,
                ext,  # type: ignore[arg-type]
            )
        ext.append(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(f"{_AMD}.4"), hwid or self.chip_id)
        )
        return _cert(
            "SEV-VCEK",
            self.root.ask.subject,
            public,
            self.root.ask_key,
            ext,  # type: ignore[arg-type]
        )

    def vcek_der(self) -> bytes:
        return self.vcek.public_bytes(serialization.Encoding.DER)

    def hcl_report(
        self,
        *,
        ak_public: Any,
        user_data: bytes = bytes(64),
        measurement: bytes = b"\x5a" * 48,
        policy: int = 0x3001F,
        vmpl: int = 0,
        version: int = 3,
        tcb: Tcb | None = None,
        chip_id: bytes | None = None,
        vm_configuration: Mapping[str, Any] | None = None,
        claims_override: bytes | None = None,
        report_data: bytes | None = None,
        ek_public: Any = None,
        signing_key: int | None = None,
    ) -> bytes:
        """An HCL report whose runtime claims name ``ak_public`` as ``HCLAkPub`` (and
        ``ek_public``, when given, as ``HCLEkPub``)."""
        keys = [] if claims_override is not None else [_jwk(ak_public)]
        if ek_public is not None:
            keys.append(_jwk(ek_public, kid="HCLEkPub"))
        claims = (
            claims_override
            or json.dumps(
                {
                    "keys": keys,
                    "vm-configuration": dict(
                        vm_configuration
                        if vm_configuration is not None
                        else {"console-enabled": True, "secure-boot": True, "tpm-enabled": True}
                    ),
                    "user-data": user_data.hex().upper(),
                },
                # Compact, so that a report with an RSA AK and an ECC EK fits the 2 KiB an NV
                # index of swtpm holds.
                separators=(",", ":"),
            ).encode()
        )
        t = (tcb or self.tcb).raw()
        r = bytearray(1184)
        struct.pack_into("<IIQ", r, 0, version, 1, policy)
        struct.pack_into("<II", r, 0x30, vmpl, 1)
        struct.pack_into("<QQ", r, 0x38, t, 0)
        # Bits 2-4 of the flags: 0 for a VCEK, 1 for a VLEK.
        key_kind = signing_key if signing_key is not None else int(self.vlek)
        struct.pack_into("<I", r, 0x48, key_kind << 2)
        r[0x50:0x90] = report_data or hashlib.sha256(claims).digest() + bytes(32)
        r[0x90:0xC0] = measurement
        struct.pack_into("<Q", r, 0x180, t)
        if version >= 3:
            r[0x188:0x18B] = bytes([0x19, 0x01, 0x01])
        r[0x1A0:0x1E0] = chip_id if chip_id is not None else self.chip_id
        struct.pack_into("<QQ", r, 0x1E0, t, 0)
        struct.pack_into("<Q", r, 0x1F0, t)
        der = self.key.sign(bytes(r[:0x2A0]), ec.ECDSA(hashes.SHA384()))
        rr, ss = decode_dss_signature(der)
        r[0x2A0:0x2E8] = rr.to_bytes(72, "little")
        r[0x2E8:0x330] = ss.to_bytes(72, "little")
        header = b"HCLA" + struct.pack("<IIII", 1, 32 + 1184 + 20 + len(claims), 2, 0) + bytes(12)
        claims_header = struct.pack("<5I", len(claims) + 20, 1, 2, 1, len(claims))
        return header + bytes(r) + claims_header + claims


def _jwk(key: Any, kid: str = "HCLAkPub") -> dict[str, Any]:
    def b64(n: int) -> str:
        return (
            base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big"))
            .decode()
            .rstrip("=")
        )

    if isinstance(key, rsa.RSAPublicKey):
        nums = key.public_numbers()
        return {
            "kid": kid,
            "key_ops": ["sign"],
            "kty": "RSA",
            "e": b64(nums.e),
            "n": b64(nums.n),
        }
    assert isinstance(key, ec.EllipticCurvePublicKey)
    enums = key.public_numbers()
    size = (key.curve.key_size + 7) // 8

    def coord(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(size, "big")).decode().rstrip("=")

    crv = {"secp256r1": "P-256", "secp384r1": "P-384"}[key.curve.name]
    return {"kid": kid, "kty": "EC", "crv": crv, "x": coord(enums.x), "y": coord(enums.y)}


class EmulatedParavisorTpm(Tpm):
    """The sidecar's real TPM adapter on swtpm, plus what Azure's paravisor does on a
    confidential VM: when NV index 0x01400002 (user data) is written, a new HCL report binding
    the TPM's AK and those bytes is written into NV index 0x01400001 of the same swtpm.

    ``report`` holds keyword arguments for :meth:`SyntheticChip.hcl_report` (debug policy,
    another measurement...); ``stale`` keeps the user data of the first report, as a report
    read from NV without being refreshed would.
    """

    #: Azure pads the report NV index; the emulation pads to a size every TPM accepts.
    REPORT_NV_SIZE = 2048

    def __init__(
        self,
        config: TpmConfig,
        *,
        chip: SyntheticChip,
        report: Mapping[str, Any] | None = None,
        stale: bool = False,
        ek_public: Any = None,
    ) -> None:
        super().__init__(config)
        #: The HCLEkPub to claim instead of this TPM's EK (another TPM's, in attack tests).
        self.ek_public = ek_public
        self.chip = chip
        self.report = dict(report or {})
        self.stale = stale
        self.reports_made = 0

    def nv_write(self, index: int, data: bytes) -> None:
        super().nv_write(index, data)
        if index != USER_DATA_NV_INDEX:
            return
        ak = load_public(self.create_or_load_ak().public).key
        ek = self.ek_public or load_public(self.create_ek().public).key
        user_data = bytes(64) if self.stale else data
        report = self.chip.hcl_report(
            ak_public=ak, ek_public=ek, user_data=user_data, **self.report
        )
        assert len(report) <= self.REPORT_NV_SIZE
        super().nv_write(HCL_REPORT_NV_INDEX, report.ljust(self.REPORT_NV_SIZE, b"\0"))
        self.reports_made += 1

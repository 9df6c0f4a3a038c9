"""TPM keys as the broker sees them: parsing AK/EK publics, attribute policy, MakeCredential and
EK certificates.

Everything here is pure: bytes in, a parsed value out, or an exception. TPM structures are parsed by
tpm2-pytss (which calls libtss2's marshalling code); keys and certificates are handled by
``cryptography``.

An AK is only worth trusting if the TPM itself enforces that it signs nothing but TPM-generated
structures: that is what ``restricted`` + ``sign`` means, and why :func:`check_ak_attributes`
insists on it. A PEM key carries no attributes, so it can only be accepted on an operator's word.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification as x509v
from tpm2_pytss import (
    TPM2_ALG,
    TPM2_ECC_CURVE,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPMA_OBJECT,
)
from tpm2_pytss.utils import credential_to_tools
from tpm2_pytss.utils import make_credential as _tss_make_credential

from broker.errors import CredentialError, EkCertificateError, KeyAttributeError

__all__ = [
    "DEFAULT_AK_CURVES",
    "DEFAULT_AK_RSA_BITS",
    "DEFAULT_EK_CURVES",
    "DEFAULT_EK_RSA_BITS",
    "EK_TEMPLATES",
    "HASH_BY_ALG",
    "STRONG_HASHES",
    "EkTemplate",
    "KeyType",
    "ParsedPublic",
    "ak_qualified_name",
    "check_ak_attributes",
    "check_ek_attributes",
    "check_ek_template",
    "ek_identity",
    "load_public",
    "make_credential",
    "to_tools_credential_file",
    "verify_ek_certificate",
]

KeyType = Literal["rsa", "ecc"]
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

#: TPM hash algorithm identifiers and the hashlib names the project uses for them (and for banks).
HASH_BY_ALG: Final[dict[int, str]] = {
    int(TPM2_ALG.SHA1): "sha1",
    int(TPM2_ALG.SHA256): "sha256",
    int(TPM2_ALG.SHA384): "sha384",
    int(TPM2_ALG.SHA512): "sha512",
}

#: Hashes accepted for signatures and AK schemes: SHA-1 is refused everywhere.
STRONG_HASHES: Final[frozenset[str]] = frozenset({"sha256", "sha384", "sha512"})

_SCHEME_BY_ALG: Final[dict[int, str]] = {
    int(TPM2_ALG.RSASSA): "rsassa",
    int(TPM2_ALG.RSAPSS): "rsapss",
    int(TPM2_ALG.ECDSA): "ecdsa",
    int(TPM2_ALG.ECDAA): "ecdaa",
    int(TPM2_ALG.ECSCHNORR): "ecschnorr",
    int(TPM2_ALG.SM2): "sm2",
    int(TPM2_ALG.RSAES): "rsaes",
    int(TPM2_ALG.OAEP): "oaep",
    int(TPM2_ALG.ECDH): "ecdh",
}

_CURVE_BY_TPM: Final[dict[int, tuple[str, int]]] = {
    int(TPM2_ECC_CURVE.NIST_P256): ("P-256", 256),
    int(TPM2_ECC_CURVE.NIST_P384): ("P-384", 384),
    int(TPM2_ECC_CURVE.NIST_P521): ("P-521", 521),
}
_CURVE_BY_PYCA: Final[dict[str, tuple[str, int]]] = {
    "secp256r1": ("P-256", 256),
    "secp384r1": ("P-384", 384),
    "secp521r1": ("P-521", 521),
}

DEFAULT_AK_RSA_BITS: Final[frozenset[int]] = frozenset({2048, 3072})
DEFAULT_AK_CURVES: Final[frozenset[str]] = frozenset({"P-256", "P-384"})
DEFAULT_EK_RSA_BITS: Final[frozenset[int]] = frozenset({2048})
DEFAULT_EK_CURVES: Final[frozenset[str]] = frozenset({"P-256", "P-384"})

_ATTRIBUTE_NAMES: Final[dict[int, str]] = {
    int(TPMA_OBJECT.FIXEDTPM): "fixedTPM",
    int(TPMA_OBJECT.STCLEAR): "stClear",
    int(TPMA_OBJECT.FIXEDPARENT): "fixedParent",
    int(TPMA_OBJECT.SENSITIVEDATAORIGIN): "sensitiveDataOrigin",
    int(TPMA_OBJECT.USERWITHAUTH): "userWithAuth",
    int(TPMA_OBJECT.ADMINWITHPOLICY): "adminWithPolicy",
    int(TPMA_OBJECT.NODA): "noDA",
    int(TPMA_OBJECT.ENCRYPTEDDUPLICATION): "encryptedDuplication",
    int(TPMA_OBJECT.RESTRICTED): "restricted",
    int(TPMA_OBJECT.DECRYPT): "decrypt",
    int(TPMA_OBJECT.SIGN_ENCRYPT): "sign",
}

_AK_REQUIRED: Final[int] = int(
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
)
_AK_FORBIDDEN: Final[int] = int(TPMA_OBJECT.DECRYPT)
# Every TCG EK template (low and high range) sets exactly these, plus userWithAuth for none.
_EK_REQUIRED: Final[int] = int(
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.ADMINWITHPOLICY
)
_EK_FORBIDDEN: Final[int] = int(TPMA_OBJECT.SIGN_ENCRYPT)

_PUBLIC_CACHE_SIZE: Final = 4096


def _attribute_names(bits: int) -> list[str]:
    return [name for bit, name in _ATTRIBUTE_NAMES.items() if bits & bit]


@dataclass(frozen=True, eq=False)
class ParsedPublic:
    """A public key as the broker uses it, parsed once from TPM2B_PUBLIC or PEM.

    Instances are immutable and, for the same input bytes, the same object (see
    :func:`load_public`), so the verifier can cache per-key state on identity.
    """

    #: The ``cryptography`` public key.
    key: PublicKey
    key_type: KeyType
    #: RSA modulus size, or the curve's size for ECC.
    key_bits: int
    #: "P-256", "P-384" or "P-521" for ECC keys, None for RSA.
    curve: str | None
    #: The key's own signing or decryption scheme ("rsassa", "rsapss", "ecdsa", ...); None when
    #: the TPM public says TPM_ALG_NULL or the key came from PEM.
    scheme: str | None
    #: The scheme's hash ("sha256", ...); None when there is no scheme.
    scheme_hash: str | None
    #: The TPM name (nameAlg || H(TPMT_PUBLIC)); None for PEM.
    name: bytes | None
    #: The name algorithm ("sha256", ...); None for PEM.
    name_alg: str | None
    #: TPMA_OBJECT bits of the TPMT_PUBLIC; None for PEM.
    attributes: int | None
    #: The symmetric algorithm of a storage key, e.g. "aes128cfb"; None for signing keys and PEM.
    symmetric: str | None
    #: The marshalled TPM2B_PUBLIC; None for PEM.
    tpm2b_public: bytes | None
    #: Hex SHA-256 of the marshalled TPMT_PUBLIC; for PEM keys, hex SHA-256 of the DER
    #: SubjectPublicKeyInfo. Not an EK's identity: see :func:`ek_identity`.
    key_id: str
    #: Hex SHA-256 of the DER SubjectPublicKeyInfo: the same for a key loaded from TPM2B_PUBLIC
    #: and from PEM, so the two forms of one key can be matched.
    spki_sha256: str

    @property
    def is_tpm_public(self) -> bool:
        """True when the key came from a TPM2B_PUBLIC (and so has attributes and a name)."""
        return self.tpm2b_public is not None

    def attribute_names(self) -> list[str]:
        """The names of the set TPMA_OBJECT bits, for messages (empty for PEM)."""
        return _attribute_names(self.attributes or 0)


def load_public(data: bytes) -> ParsedPublic:
    """Parses a marshalled TPM2B_PUBLIC (``tpm2_createak/createek --public``) or a PEM public key.

    Results are cached on the input bytes, so the verifier's hot path does not re-parse an AK.

    Raises:
        KeyAttributeError: the bytes are neither, are truncated or have trailing bytes, or hold a
            key type the broker does not handle (only RSA and NIST ECC keys).
    """
    return _load_public_cached(bytes(data))


@functools.lru_cache(maxsize=_PUBLIC_CACHE_SIZE)
def _load_public_cached(data: bytes) -> ParsedPublic:
    if data.lstrip().startswith(b"-----BEGIN"):
        return _load_pem(data)
    return _load_tpm2b(data)


#: TPM_RH_ENDORSEMENT, the hierarchy that the qualified name of every object under the EK
#: starts from (TPM 2.0 Part 1, "Qualified Name").
_RH_ENDORSEMENT: Final = 0x4000000B


def ak_qualified_name(ak: ParsedPublic, ek: ParsedPublic) -> bytes | None:
    """The qualified name a TPM reports as a quote's ``qualifiedSigner`` when ``ak`` is a child
    of the primary key ``ek`` in the endorsement hierarchy (as ``tpm2_createak`` and the sidecar
    create it); None when either key came from PEM and so has no TPM name.

    ``QN(EK) = H_EK(TPM_RH_ENDORSEMENT || Name(EK))`` and ``QN(AK) = H_AK(QN(EK) || Name(AK))``,
    each hash the object's name algorithm and each result prefixed with that algorithm's id,
    like a name. Computed once per pair (cached): the broker checks it for every quote.
    """
    if ak.name is None or ek.name is None or ak.name_alg is None or ek.name_alg is None:
        return None
    return _qualified_name(ak.name, ak.name_alg, ek.name, ek.name_alg)


@functools.lru_cache(maxsize=_PUBLIC_CACHE_SIZE)
def _qualified_name(ak_name: bytes, ak_alg: str, ek_name: bytes, ek_alg: str) -> bytes:
    ek_qn = ek_name[:2] + hashlib.new(ek_alg, _RH_ENDORSEMENT.to_bytes(4, "big") + ek_name).digest()
    return ak_name[:2] + hashlib.new(ak_alg, ek_qn + ak_name).digest()


def _spki_sha256(key: PublicKey) -> str:
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _load_pem(data: bytes) -> ParsedPublic:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyAttributeError("PEM public key cannot be parsed") from e
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise KeyAttributeError(f"unsupported PEM key type {type(key).__name__} (only RSA and EC)")
    fingerprint = _spki_sha256(key)
    if isinstance(key, rsa.RSAPublicKey):
        return ParsedPublic(
            key=key,
            key_type="rsa",
            key_bits=key.key_size,
            curve=None,
            scheme=None,
            scheme_hash=None,
            name=None,
            name_alg=None,
            attributes=None,
            symmetric=None,
            tpm2b_public=None,
            key_id=fingerprint,
            spki_sha256=fingerprint,
        )
    curve = _CURVE_BY_PYCA.get(key.curve.name)
    if curve is None:
        raise KeyAttributeError(f"unsupported elliptic curve {key.curve.name}")
    return ParsedPublic(
        key=key,
        key_type="ecc",
        key_bits=curve[1],
        curve=curve[0],
        scheme=None,
        scheme_hash=None,
        name=None,
        name_alg=None,
        attributes=None,
        symmetric=None,
        tpm2b_public=None,
        key_id=fingerprint,
        spki_sha256=fingerprint,
    )


def _load_tpm2b(data: bytes) -> ParsedPublic:
    try:
        public, consumed = TPM2B_PUBLIC.unmarshal(data)
    except Exception as e:  # tpm2-pytss raises TSS2_Exception and others on bad input
        raise KeyAttributeError("not a PEM key nor a marshalled TPM2B_PUBLIC") from e
    if consumed != len(data):
        raise KeyAttributeError(
            f"TPM2B_PUBLIC has {len(data) - consumed} trailing bytes (expected exactly one key)"
        )
    area = public.publicArea
    alg = int(area.type)
    name_alg = HASH_BY_ALG.get(int(area.nameAlg))
    if name_alg is None:
        raise KeyAttributeError(f"unsupported name algorithm 0x{int(area.nameAlg):04x}")
    if alg == int(TPM2_ALG.RSA):
        key_type: KeyType = "rsa"
        params = area.parameters.rsaDetail
        key_bits = int(params.keyBits)
        curve = None
    elif alg == int(TPM2_ALG.ECC):
        key_type = "ecc"
        params = area.parameters.eccDetail
        curve_info = _CURVE_BY_TPM.get(int(params.curveID))
        if curve_info is None:
            raise KeyAttributeError(f"unsupported ECC curve 0x{int(params.curveID):04x}")
        curve, key_bits = curve_info
    else:
        raise KeyAttributeError(f"unsupported key type 0x{alg:04x} (only RSA and ECC)")

    scheme_alg = int(params.scheme.scheme)
    if scheme_alg == int(TPM2_ALG.NULL):
        scheme = scheme_hash = None
    else:
        scheme = _SCHEME_BY_ALG.get(scheme_alg, f"0x{scheme_alg:04x}")
        hash_alg = int(params.scheme.details.anySig.hashAlg)
        scheme_hash = HASH_BY_ALG.get(hash_alg, f"0x{hash_alg:04x}")
    sym = params.symmetric
    symmetric = None
    if int(sym.algorithm) != int(TPM2_ALG.NULL):
        symmetric = f"{sym.algorithm}{int(sym.keyBits.sym)}{sym.mode.sym}".lower()

    try:
        key = serialization.load_der_public_key(area.to_der())
        name = bytes(public.get_name())
        tpmt = area.marshal()
    except Exception as e:  # a public area whose key material cannot form a key
        raise KeyAttributeError("TPM2B_PUBLIC holds an invalid public key") from e
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise KeyAttributeError(f"unsupported key type {type(key).__name__}")
    return ParsedPublic(
        key=key,
        key_type=key_type,
        key_bits=key_bits,
        curve=curve,
        scheme=scheme,
        scheme_hash=scheme_hash,
        name=name,
        name_alg=name_alg,
        attributes=int(area.objectAttributes),
        symmetric=symmetric,
        tpm2b_public=data,
        key_id=hashlib.sha256(tpmt).hexdigest(),
        spki_sha256=_spki_sha256(key),
    )


def _check_size(
    pub: ParsedPublic, what: str, rsa_bits: Collection[int], curves: Collection[str]
) -> None:
    if pub.key_type == "rsa":
        if pub.key_bits not in rsa_bits:
            allowed = ", ".join(str(b) for b in sorted(rsa_bits)) or "none"
            raise KeyAttributeError(f"{what} is RSA-{pub.key_bits}; accepted RSA sizes: {allowed}")
    elif pub.curve not in curves:
        allowed = ", ".join(sorted(curves)) or "none"
        raise KeyAttributeError(f"{what} is on curve {pub.curve}; accepted curves: {allowed}")


def _check_bits(pub: ParsedPublic, what: str, required: int, forbidden: int) -> None:
    attrs = pub.attributes or 0
    missing = _attribute_names(required & ~attrs)
    present = _attribute_names(forbidden & attrs)
    if missing or present:
        parts = []
        if missing:
            parts.append("lacks " + ", ".join(missing))
        if present:
            parts.append("has " + ", ".join(present))
        raise KeyAttributeError(
            f"{what} {' and '.join(parts)} (attributes: {'|'.join(pub.attribute_names())})"
        )


def check_ak_attributes(
    pub: ParsedPublic,
    *,
    rsa_key_sizes: Collection[int] = DEFAULT_AK_RSA_BITS,
    curves: Collection[str] = DEFAULT_AK_CURVES,
    allow_pem: bool = False,
) -> None:
    """Checks that ``pub`` is acceptable as an attestation key.

    A TPM AK must be a restricted signing key (restricted, sign, not decrypt) that never left the
    TPM (fixedTPM, fixedParent, sensitiveDataOrigin), RSA of an accepted size or ECC on an
    accepted curve, with an RSASSA/RSAPSS/ECDSA scheme of SHA-256 or stronger. A PEM key has no
    attributes to check; with ``allow_pem`` only its type and size are checked, and trusting it is
    the operator's decision.

    Raises:
        KeyAttributeError: naming the first property that is not acceptable.
    """
    if not pub.is_tpm_public:
        if not allow_pem:
            raise KeyAttributeError(
                "a PEM key carries no TPM attributes: it cannot be shown to be a restricted "
                "TPM signing key (enroll the TPM2B_PUBLIC instead)"
            )
        _check_size(pub, "AK", rsa_key_sizes, curves)
        return
    _check_bits(pub, "AK", _AK_REQUIRED, _AK_FORBIDDEN)
    _check_size(pub, "AK", rsa_key_sizes, curves)
    allowed_schemes = ("rsassa", "rsapss") if pub.key_type == "rsa" else ("ecdsa",)
    if pub.scheme not in allowed_schemes:
        raise KeyAttributeError(
            f"AK scheme is {pub.scheme or 'null'}; accepted for {pub.key_type.upper()}: "
            + ", ".join(allowed_schemes)
        )
    if pub.scheme_hash not in STRONG_HASHES:
        raise KeyAttributeError(
            f"AK scheme hash is {pub.scheme_hash}; SHA-256 or stronger is required"
        )


def check_ek_attributes(
    pub: ParsedPublic,
    *,
    rsa_key_sizes: Collection[int] = DEFAULT_EK_RSA_BITS,
    curves: Collection[str] = DEFAULT_EK_CURVES,
) -> None:
    """Checks that ``pub`` is an endorsement key: a restricted decryption (storage) key with a
    symmetric algorithm, fixedTPM, fixedParent, sensitiveDataOrigin and adminWithPolicy,
    RSA-2048 or ECC P-256/P-384 by default, encoded exactly as a TCG EK template defines it
    (:func:`check_ek_template`).

    Raises:
        KeyAttributeError: the key came from PEM, or naming the first property that does not fit.
    """
    if not pub.is_tpm_public:
        raise KeyAttributeError("an EK must be given as a TPM2B_PUBLIC, not PEM")
    _check_bits(pub, "EK", _EK_REQUIRED, _EK_FORBIDDEN)
    _check_size(pub, "EK", rsa_key_sizes, curves)
    if pub.symmetric is None:
        raise KeyAttributeError("EK has no symmetric algorithm: it is not a storage key")
    check_ek_template(pub)


# --- EK templates and the canonical EK identity ------------------------------------------------


@dataclass(frozen=True)
class EkTemplate:
    """One of the TCG EK Credential Profile's default EK templates (everything but ``unique``)."""

    #: The profile's name for it ("L-1", "H-3", ...).
    name: str
    key_type: KeyType
    name_alg: int
    attributes: int
    auth_policy: bytes
    #: AES key size of the symmetric (storage) algorithm; the mode is always CFB.
    aes_bits: int
    #: RSA modulus size, or the curve's size for ECC.
    key_bits: int
    #: "P-256", "P-384" for ECC keys, None for RSA.
    curve: str | None


_EK_LOW_ATTRIBUTES: Final = 0x000300B2  # fixedTPM fixedParent sensitiveDataOrigin adminWithPolicy
_EK_HIGH_ATTRIBUTES: Final = 0x000300F2  # ... and userWithAuth: the high range sets it
# PolicySecret(TPM_RH_ENDORSEMENT), the low-range templates' policy (profile: PolicyA_SHA256).
_POLICY_A_SHA256: Final = bytes.fromhex(
    "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa"
)
# The high-range templates' PolicyOR (profile: PolicyB_SHA256, PolicyB_SHA384).
_POLICY_B_SHA256: Final = bytes.fromhex(
    "ca3d0a99a2b93906f7a3342414efcfb3a385d44cd1fd459089d19b5071c0b7a0"
)
_POLICY_B_SHA384: Final = bytes.fromhex(
    "b26e7d28d11a50bc53d882bcf5fd3a1a074148bb35d3b4e4cb1c0ad9bde419ca"
    "cb47ba09699646150f9fc000f3f80e12"
)
_SHA256: Final = int(TPM2_ALG.SHA256)
_SHA384: Final = int(TPM2_ALG.SHA384)

#: The EK templates the broker accepts: the TCG EK Credential Profile's low-range RSA-2048 (L-1)
#: and ECC P-256 (L-2) templates, which ``tpm2_createek`` and the sidecar use, and the high-range
#: RSA-2048, ECC P-256 and ECC P-384 templates (H-1, H-2, H-3; swtpm certifies H-3). The RSA
#: exponent is 0 (meaning 65537) and the scheme and the ECC KDF are TPM_ALG_NULL in all of them.
EK_TEMPLATES: Final[tuple[EkTemplate, ...]] = (
    EkTemplate("L-1", "rsa", _SHA256, _EK_LOW_ATTRIBUTES, _POLICY_A_SHA256, 128, 2048, None),
    EkTemplate("L-2", "ecc", _SHA256, _EK_LOW_ATTRIBUTES, _POLICY_A_SHA256, 128, 256, "P-256"),
    EkTemplate("H-1", "rsa", _SHA256, _EK_HIGH_ATTRIBUTES, _POLICY_B_SHA256, 128, 2048, None),
    EkTemplate("H-2", "ecc", _SHA256, _EK_HIGH_ATTRIBUTES, _POLICY_B_SHA256, 128, 256, "P-256"),
    EkTemplate("H-3", "ecc", _SHA384, _EK_HIGH_ATTRIBUTES, _POLICY_B_SHA384, 256, 384, "P-384"),
)


def _template_differences(a: Any, template: EkTemplate) -> list[str]:
    """What in the TPMT_PUBLIC ``a`` differs from ``template`` (empty when it matches)."""
    diffs: list[str] = []
    name_alg = int(a.nameAlg)
    if name_alg != template.name_alg:
        diffs.append(
            f"nameAlg is {HASH_BY_ALG.get(name_alg, hex(name_alg))} "
            f"(template: {HASH_BY_ALG[template.name_alg]})"
        )
    attrs = int(a.objectAttributes)
    if attrs != template.attributes:
        extra = _attribute_names(attrs & ~template.attributes)
        missing = _attribute_names(template.attributes & ~attrs)
        diffs.append(
            "objectAttributes "
            + " and ".join(
                p
                for p in (
                    ("set " + ", ".join(extra)) if extra else "",
                    ("lack " + ", ".join(missing)) if missing else "",
                )
                if p
            )
            + f" (0x{attrs:08x}, template: 0x{template.attributes:08x})"
        )
    if bytes(a.authPolicy) != template.auth_policy:
        diffs.append("authPolicy is not the template's")
    if template.key_type == "rsa":
        params = a.parameters.rsaDetail
        unique = bytes(a.unique.rsa)
        exponent = int(params.exponent)
        if exponent != 0:
            diffs.append(f"exponent is written as {exponent} (template: 0, meaning 65537)")
        if len(unique) != template.key_bits // 8:
            diffs.append(f"modulus is {len(unique)} bytes (template: {template.key_bits // 8})")
    else:
        params = a.parameters.eccDetail
        size = (template.key_bits + 7) // 8
        x, y = bytes(a.unique.ecc.x), bytes(a.unique.ecc.y)
        if int(params.kdf.scheme) != int(TPM2_ALG.NULL):
            diffs.append("the KDF is not TPM_ALG_NULL")
        if len(x) != size or len(y) != size:
            diffs.append(f"the point's coordinates are not {size} bytes each")
    sym = params.symmetric
    if (int(sym.algorithm), int(sym.keyBits.sym), int(sym.mode.sym)) != (
        int(TPM2_ALG.AES),
        template.aes_bits,
        int(TPM2_ALG.CFB),
    ):
        diffs.append(f"symmetric is not AES-{template.aes_bits}-CFB")
    if int(params.scheme.scheme) != int(TPM2_ALG.NULL):
        diffs.append("scheme is not TPM_ALG_NULL")
    return diffs


def check_ek_template(pub: ParsedPublic) -> EkTemplate:
    """Checks that ``pub`` is an EK exactly as one of :data:`EK_TEMPLATES` defines it: the same
    name algorithm, object attributes, authPolicy, symmetric algorithm, scheme, RSA exponent
    (written as 0) or curve and KDF, and a full-size modulus or point.

    A TPM creates its EK from the template, so a real EK matches one byte for byte but for the
    key itself. Anything else is the same key re-encoded (or another object), and the broker
    refuses it rather than guess which TPM object it stands for.

    Returns the template it matches.

    Raises:
        KeyAttributeError: the key came from PEM, is of a size or curve no template has, or
            differs from the templates of its type (naming the differences from the closest).
    """
    if pub.tpm2b_public is None:
        raise KeyAttributeError("an EK must be given as a TPM2B_PUBLIC, not PEM")
    candidates = [
        t
        for t in EK_TEMPLATES
        if t.key_type == pub.key_type and t.key_bits == pub.key_bits and t.curve == pub.curve
    ]
    if not candidates:
        kind = f"RSA-{pub.key_bits}" if pub.key_type == "rsa" else f"ECC {pub.curve}"
        raise KeyAttributeError(f"EK is {kind}: no TCG EK template the broker accepts has it")
    area = TPM2B_PUBLIC.unmarshal(pub.tpm2b_public)[0].publicArea
    best: tuple[EkTemplate, list[str]] | None = None
    for template in candidates:
        diffs = _template_differences(area, template)
        if not diffs:
            return template
        if best is None or len(diffs) < len(best[1]):
            best = (template, diffs)
    assert best is not None
    raise KeyAttributeError(
        f"EK public does not match the TCG EK template {best[0].name}: " + "; ".join(best[1])
    )


def ek_identity(pub: ParsedPublic) -> str:
    """The canonical identity of an EK: the hex SHA-256 of its DER SubjectPublicKeyInfo, the
    encoding an EK certificate gives the key. Every encoding of one key (another exponent
    encoding, authPolicy or attributes) has this one identity, so it can be taken before the
    template is checked: a revoked EK is recognised, and refused as revoked, in any encoding.

    Raises:
        KeyAttributeError: ``pub`` came from PEM (an EK is enrolled as a TPM2B_PUBLIC).
    """
    if not pub.is_tpm_public:
        raise KeyAttributeError("an EK must be given as a TPM2B_PUBLIC, not PEM")
    return pub.spki_sha256


def _name_digest_size(name: bytes) -> int | None:
    if len(name) < 2:
        return None
    alg = HASH_BY_ALG.get(int.from_bytes(name[:2], "big"))
    return None if alg is None else hashlib.new(alg).digest_size


def make_credential(*, ek_public: bytes, ak_name: bytes, secret: bytes) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential in software: encrypts ``secret`` so that only the TPM holding the EK
    can recover it, and only for an object whose name is ``ak_name``.

    Returns the marshalled TPM2B_ID_OBJECT (credential blob) and TPM2B_ENCRYPTED_SECRET, the two
    inputs of TPM2_ActivateCredential; :func:`to_tools_credential_file` packs them for
    ``tpm2_activatecredential``.

    Raises:
        KeyAttributeError: ``ek_public`` is not an acceptable EK (see :func:`check_ek_attributes`).
        CredentialError: the AK name is malformed, the secret is empty or longer than the EK's
            name-algorithm digest (the TPM's limit), or the encryption fails.
    """
    ek = load_public(ek_public)
    check_ek_attributes(ek)
    assert ek.tpm2b_public is not None and ek.name_alg is not None  # checked above
    size = _name_digest_size(ak_name)
    if size is None or len(ak_name) != 2 + size:
        raise CredentialError("AK name is not a hash-algorithm identifier followed by a digest")
    limit = hashlib.new(ek.name_alg).digest_size
    if not 0 < len(secret) <= limit:
        raise CredentialError(f"credential secret must be 1..{limit} bytes, got {len(secret)}")
    try:
        public, _ = TPM2B_PUBLIC.unmarshal(ek.tpm2b_public)
        blob, encrypted = _tss_make_credential(public, secret, ak_name)
        return bytes(blob.marshal()), bytes(encrypted.marshal())
    except Exception as e:  # tpm2-pytss raises ValueError and TSS2_Exception
        raise CredentialError("MakeCredential failed for this EK") from e


def to_tools_credential_file(credential_blob: bytes, encrypted_secret: bytes) -> bytes:
    """Packs :func:`make_credential`'s output in the file format that
    ``tpm2_activatecredential --credential-blob`` reads (and ``tpm2_makecredential`` writes).

    Raises:
        CredentialError: either input is not exactly one marshalled structure.
    """
    try:
        id_object, n1 = TPM2B_ID_OBJECT.unmarshal(credential_blob)
        secret, n2 = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
    except Exception as e:
        raise CredentialError("credential blob or encrypted secret is malformed") from e
    if n1 != len(credential_blob) or n2 != len(encrypted_secret):
        raise CredentialError("credential blob or encrypted secret has trailing bytes")
    return bytes(credential_to_tools(id_object, secret))


# --- EK certificates -------------------------------------------------------------------------


def _load_certificate(data: bytes) -> x509.Certificate:
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    # Certificates read from TPM NV indices are sometimes padded to the index size: keep only the
    # outer DER SEQUENCE (its length is in the first bytes) when what follows is padding.
    if len(data) > 4 and data[0] == 0x30 and data[1] in (0x81, 0x82, 0x83):
        n = data[1] - 0x80
        end = 2 + n + int.from_bytes(data[2 : 2 + n], "big")
        if end < len(data) and set(data[end:]) <= {0x00, 0xFF}:
            data = data[:end]
    return x509.load_der_x509_certificate(data)


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _ca_basic_constraints(
    _policy: x509v.Policy, _cert: x509.Certificate, ext: x509.BasicConstraints
) -> None:
    if not ext.ca:
        raise ValueError("issuer is not a CA (basicConstraints CA is false)")


def _ca_key_usage(
    _policy: x509v.Policy, _cert: x509.Certificate, ext: x509.KeyUsage | None
) -> None:
    if ext is not None and not ext.key_cert_sign:
        raise ValueError("issuer's keyUsage lacks keyCertSign")


def _ee_basic_constraints(
    _policy: x509v.Policy, _cert: x509.Certificate, ext: x509.BasicConstraints | None
) -> None:
    if ext is not None and ext.ca:
        raise ValueError("an EK certificate must not be a CA certificate")


# EK certificates follow the TCG profile, not the web PKI: an empty or odd subject, a critical
# SAN of directory names, subjectDirectoryAttributes, TCG EKUs. So the leaf's extensions are
# tolerated except that it must not be a CA; issuers must be CAs allowed to sign certificates.
# Signature algorithms and key sizes still follow cryptography's web-PKI rules (no SHA-1,
# RSA >= 2048).
_CA_POLICY = (
    x509v.ExtensionPolicy.permit_all()
    .require_present(x509.BasicConstraints, x509v.Criticality.AGNOSTIC, _ca_basic_constraints)
    .may_be_present(x509.KeyUsage, x509v.Criticality.AGNOSTIC, _ca_key_usage)
)
_EE_POLICY = x509v.ExtensionPolicy.permit_all().may_be_present(
    x509.BasicConstraints, x509v.Criticality.AGNOSTIC, _ee_basic_constraints
)


def verify_ek_certificate(
    cert_der_or_pem: bytes,
    ek_public: bytes | ParsedPublic,
    trusted_ca_pems: Sequence[bytes],
    now: _dt.datetime | None = None,
) -> x509.Certificate:
    """Verifies an EK certificate: it chains to a trusted root, is within its validity window at
    ``now`` (default: the current time), and certifies exactly the key ``ek_public``.

    ``trusted_ca_pems`` are PEM bundles. Self-signed certificates in them are the trust anchors;
    the others are intermediates that a chain may pass through (swtpm's local CA: the root
    ``swtpm-localca-rootca-cert.pem`` and the intermediate ``issuercert.pem``).

    Returns the parsed certificate.

    Raises:
        EkCertificateError: with the precise reason (unparsable, no trusted root, not yet valid,
            expired, does not chain, or certifies another key).
        KeyAttributeError: ``ek_public`` cannot be parsed.
    """
    ek = ek_public if isinstance(ek_public, ParsedPublic) else load_public(ek_public)
    try:
        cert = _load_certificate(cert_der_or_pem)
    except ValueError as e:
        raise EkCertificateError("EK certificate is not a valid X.509 certificate") from e

    anchors: list[x509.Certificate] = []
    intermediates: list[x509.Certificate] = []
    for n, bundle in enumerate(trusted_ca_pems):
        try:
            certs = x509.load_pem_x509_certificates(bundle)
        except ValueError as e:
            raise EkCertificateError(f"trusted CA bundle {n} is not PEM certificates") from e
        for c in certs:
            (anchors if _is_self_signed(c) else intermediates).append(c)
    if not anchors:
        raise EkCertificateError("no self-signed root among the trusted CA certificates")

    when = now or _dt.datetime.now(_dt.UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.UTC)
    if when < cert.not_valid_before_utc:
        raise EkCertificateError(
            f"EK certificate is not valid before {cert.not_valid_before_utc.isoformat()}"
        )
    if when > cert.not_valid_after_utc:
        raise EkCertificateError(
            f"EK certificate expired on {cert.not_valid_after_utc.isoformat()}"
        )

    verifier = (
        x509v.PolicyBuilder()
        .store(x509v.Store(anchors))
        .time(when)
        .max_chain_depth(4)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
        .build_client_verifier()
    )
    try:
        verifier.verify(cert, intermediates)
    except x509v.VerificationError as e:
        raise EkCertificateError(
            f"EK certificate (issuer {cert.issuer.rfc4514_string()}) does not chain to a "
            f"trusted CA: {e}"
        ) from e

    cert_key = cert.public_key()
    if not isinstance(cert_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise EkCertificateError(f"EK certificate holds a {type(cert_key).__name__} key")
    if _spki_sha256(cert_key) != ek.spki_sha256:
        raise EkCertificateError("EK certificate certifies another key than this EK")
    return cert

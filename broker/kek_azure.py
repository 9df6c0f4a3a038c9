"""Azure Key Vault as the broker's key-encryption key (KEK) provider.

A data key wrapped by Key Vault is recorded with ``kek_ref = "azurekv:<key id URL>"``, for
example ``azurekv:https://cleanroom-kv.vault.azure.net/keys/broker-kek`` (the current version at
wrap time) or ``azurekv:https://cleanroom-kv.vault.azure.net/keys/broker-kek/<version>`` (pinned).
Register the provider with :func:`register_key_vault_provider`; the registry then builds a
:class:`KeyVaultKek` for every ``azurekv:`` ref it meets.

Design: Key Vault's RSA wrap has no associated data, but the broker's KEK contract binds each
data key to its key id and owner (a wrapped key copied into another record must not unwrap).
So Key Vault does not wrap the data key itself. For every wrap a fresh 32-byte *record key* is
drawn; Key Vault wraps the record key with RSA-OAEP-256; the data key is encrypted under the
record key with AES-256-GCM whose associated data binds the format version, the key id, the
owner, the versioned Key Vault key id and the algorithm. The wrapped form (all lengths
big-endian)::

    version (1) = 1
    u16 len || versioned Key Vault key id (utf-8)
    u16 len || algorithm ("RSA-OAEP-256")
    u16 len || record key wrapped by Key Vault
    nonce (12) || AES-256-GCM(data key) || tag (16)

Unwrapping asks Key Vault to unwrap the record key with the *versioned* key id stored in the
blob, so a ref without a version keeps working after the key is rotated in Key Vault: old
records name their version, new wraps use the current one. The stored key id must belong to the
ref's vault and key name (and version, when the ref pins one).

Anyone holding the RSA public key can produce a well-formed blob; that gives nothing away
(the attacker would only learn a data key it chose itself) and swapping a record's data key
needs write access to the broker's database, which the threat model trusts.

Key Vault is asked to unwrap on every release unless ``unwrap_cache_seconds`` allows reusing a
record key unwrapped recently (bounded, in memory, default 60 s): a disabled key or a revoked
role then takes effect within that time. Every wrap is verified by unwrapping it once through
Key Vault, so a data key is never stored under a key the broker's identity cannot unwrap.

Errors become :class:`~broker.errors.KekError` with a reason that starts with what happened:
``forbidden``, ``key not found``, ``key disabled``, ``unauthorized``, ``throttled``,
``unreachable``, ``unavailable``. Throttling (429), server errors (5xx) and network failures are
retried by the SDK's retry policy, which honours ``Retry-After``; when the retries run out they
are :class:`~broker.errors.KekUnavailableError` (transient: ``throttled``, ``unreachable``,
``unavailable``), which the gRPC layer answers with ``UNAVAILABLE``. The others are permanent
until someone changes the key, its role assignments or the configuration.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from azure.core.credentials import AccessToken, TokenCredential
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.keyvault.keys import KeyClient, KeyVaultKey
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.custody import KekRegistry
from broker.custody_causes import connection_cause
from broker.errors import CustodyError, KekError, KekUnavailableError
from broker.keyseal import check_data_key, encode_info, zero
from cleanroom.closing import Closeable
from cleanroom.config import ConfigError, load_config

__all__ = [
    "CREDENTIAL_MODES",
    "KEYVAULT_ENV_PREFIX",
    "KEYVAULT_REF_PREFIX",
    "WRAP_ALGORITHM",
    "KeyVaultConfig",
    "KeyVaultKek",
    "KeyVaultKekProvider",
    "KeyVaultKeyId",
    "load_key_vault_config",
    "make_credential",
    "register_key_vault_provider",
]

#: The prefix of Key Vault KEK refs.
KEYVAULT_REF_PREFIX = "azurekv:"
#: Environment variables ``CLEANROOM_KEYVAULT_<SETTING>`` override :class:`KeyVaultConfig`.
KEYVAULT_ENV_PREFIX = "CLEANROOM_KEYVAULT"
#: The only wrap algorithm used: RSA-OAEP with SHA-256 (Key Vault's ``RSA-OAEP-256``).
WRAP_ALGORITHM = "RSA-OAEP-256"

#: Version byte of the wrapped form described in the module docstring.
AZKV_WRAP_VERSION = 1
AZKV_WRAP_LABEL = b"cleanroom/v1 azurekv-wrap"
_RECORD_KEY_SIZE = 32
_NONCE_SIZE = 12
_SEALED_SIZE = 32 + 16
_MAX_KID = 1024
_MAX_ALG = 32
_MAX_WRAPPED_RECORD_KEY = 1024

#: How the broker authenticates to Key Vault (see :class:`KeyVaultConfig`).
CREDENTIAL_MODES = ("default", "managed-identity", "client-secret", "static-token")

_NAME = re.compile(r"^[0-9A-Za-z-]{1,127}$")
_VERSION = re.compile(r"^[0-9A-Za-z]{1,64}$")


# --- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyVaultConfig:
    """How the broker reaches Azure Key Vault. Loaded from ``[keyvault]`` and
    ``CLEANROOM_KEYVAULT_*`` by :func:`load_key_vault_config`.

    Attributes:
        credential: ``default`` (the Azure identity chain: managed identity on a VM, workload
            identity, environment, Azure CLI), ``managed-identity``, ``client-secret``, or
            ``static-token`` (a fixed bearer token: emulators and tests only).
        tenant_id: the Entra ID tenant (``client-secret``).
        client_id: the application id (``client-secret``) or the user-assigned managed
            identity's client id (``default``, ``managed-identity``; empty: system-assigned).
        client_secret: the application secret (``client-secret``; put it in the environment).
        access_token: the bearer token for ``static-token``.
        ca_file: a PEM bundle to trust instead of the system CAs (a TLS-inspecting proxy, a
            private endpoint with a private CA, the test server).
        verify_challenge_resource: check that the token resource Key Vault's challenge names
            matches the vault's domain (keep on; the test server on 127.0.0.1 needs it off).
        timeout_seconds: connect and read timeout per request.
        retry_total: retries per request (throttling, 5xx, network), with exponential backoff
            and ``Retry-After`` honoured.
        retry_backoff_max_seconds: the longest backoff between retries (``Retry-After`` may
            ask for longer and is obeyed).
        connect_retries: retries of a request that could not connect (a name that does not
            resolve, a refused connection, a failed TLS handshake), within ``retry_total``.
        operation_timeout_seconds: the most one Key Vault operation may take, retries and
            backoff included; then it fails as ``unreachable``/``unavailable``.
        unwrap_cache_seconds: how long an unwrapped record key may be reused without asking Key
            Vault again (0: ask on every release).
        unwrap_cache_entries: the most record keys kept.

    Raises:
        ConfigError: an unknown credential mode, missing settings for it, or a bad limit.
    """

    credential: str = "default"
    tenant_id: str = ""
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    access_token: str = field(default="", repr=False)
    ca_file: str = ""
    verify_challenge_resource: bool = True
    timeout_seconds: float = 10.0
    retry_total: int = 3
    retry_backoff_max_seconds: float = 8.0
    connect_retries: int = 1
    operation_timeout_seconds: float = 20.0
    unwrap_cache_seconds: float = 60.0
    unwrap_cache_entries: int = 4096

    def __post_init__(self) -> None:
        if self.credential not in CREDENTIAL_MODES:
            raise ConfigError(
                f"keyvault.credential must be one of {', '.join(CREDENTIAL_MODES)}, "
                f"not {self.credential!r}"
            )
        if self.credential == "client-secret" and not (
            self.tenant_id and self.client_id and self.client_secret
        ):
            raise ConfigError(
                "keyvault.credential 'client-secret' needs tenant_id, client_id and client_secret"
            )
        if self.credential == "static-token" and not self.access_token:
            raise ConfigError("keyvault.credential 'static-token' needs access_token")
        if self.timeout_seconds <= 0 or self.retry_backoff_max_seconds < 0:
            raise ConfigError("keyvault timeouts must be positive")
        if not 0 <= self.retry_total <= 10:
            raise ConfigError("keyvault.retry_total must be between 0 and 10")
        if not 0 <= self.connect_retries <= 10:
            raise ConfigError("keyvault.connect_retries must be between 0 and 10")
        if self.operation_timeout_seconds <= 0:
            raise ConfigError("keyvault.operation_timeout_seconds must be positive")
        if self.unwrap_cache_seconds < 0 or self.unwrap_cache_entries < 0:
            raise ConfigError("keyvault unwrap cache limits must not be negative")


def load_key_vault_config(
    path: str | Path | None = None, *, env: dict[str, str] | None = None
) -> KeyVaultConfig:
    """Reads ``[keyvault]`` from ``path`` (if any) and ``CLEANROOM_KEYVAULT_*`` variables.

    Raises:
        ConfigError: the file or a setting is invalid.
    """
    return load_config(
        KeyVaultConfig,
        Path(path) if path is not None else None,
        env_prefix=KEYVAULT_ENV_PREFIX,
        section="keyvault",
        env=env,
    )


class _StaticTokenCredential:
    """A fixed bearer token (``static-token``): for emulators and tests, never production."""

    def __init__(self, token: str) -> None:
        self._token = token

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(self._token, int(time.time()) + 3600)

    def close(self) -> None:
        pass


def make_credential(config: KeyVaultConfig) -> TokenCredential:
    """The token credential ``config`` names. The caller closes it (``close()``) when done.

    Raises:
        KekError: azure-identity refuses the settings.
    """
    try:
        if config.credential == "static-token":
            return cast(TokenCredential, _StaticTokenCredential(config.access_token))
        from azure.identity import (
            ClientSecretCredential,
            DefaultAzureCredential,
            ManagedIdentityCredential,
        )

        if config.credential == "client-secret":
            return ClientSecretCredential(config.tenant_id, config.client_id, config.client_secret)
        if config.credential == "managed-identity":
            return ManagedIdentityCredential(client_id=config.client_id or None)
        return DefaultAzureCredential(managed_identity_client_id=config.client_id or None)
    except (ValueError, AzureError) as e:
        raise KekError(f"cannot set up the Key Vault credential ({config.credential}): {e}") from e


def _client_options(config: KeyVaultConfig) -> dict[str, Any]:
    options: dict[str, Any] = {
        "verify_challenge_resource": config.verify_challenge_resource,
        "retry_total": config.retry_total,
        "retry_backoff_max": config.retry_backoff_max_seconds,
        "retry_connect": config.connect_retries,
        # The retry policy's budget for the whole operation (azure-core's ``timeout``).
        "timeout": config.operation_timeout_seconds,
        "connection_timeout": config.timeout_seconds,
        "read_timeout": config.timeout_seconds,
    }
    if config.ca_file:
        options["connection_verify"] = config.ca_file
    return options


# --- key identifiers --------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyVaultKeyId:
    """A Key Vault key identifier: ``https://<vault host>/keys/<name>[/<version>]``."""

    vault_url: str
    name: str
    version: str | None = None

    @classmethod
    def parse(cls, url: str) -> KeyVaultKeyId:
        """Raises: KekError: not an https Key Vault key URL."""
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise KekError(f"{url!r} is not an https Key Vault key URL")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise KekError(f"{url!r}: a key id has no query, fragment or user part")
        segments = parts.path.strip("/").split("/")
        if len(segments) not in (2, 3) or segments[0] != "keys":
            raise KekError(f"{url!r}: expected https://<vault>/keys/<name>[/<version>]")
        name = segments[1]
        version = segments[2] if len(segments) == 3 else None
        if not _NAME.match(name):
            raise KekError(f"{url!r}: {name!r} is not a Key Vault key name")
        if version is not None and not _VERSION.match(version):
            raise KekError(f"{url!r}: {version!r} is not a Key Vault key version")
        return cls(vault_url=f"https://{parts.netloc.lower()}", name=name, version=version)

    @property
    def url(self) -> str:
        """The identifier as a URL (with the version when there is one)."""
        return f"{self.vault_url}/keys/{self.name}" + (f"/{self.version}" if self.version else "")

    def covers(self, other: KeyVaultKeyId) -> bool:
        """Whether ``other`` (a versioned id) is this key, and this version when pinned."""
        if other.vault_url != self.vault_url or other.name.lower() != self.name.lower():
            return False
        return self.version is None or (other.version or "").lower() == self.version.lower()


def parse_ref(ref: str) -> KeyVaultKeyId:
    """The key id of an ``azurekv:`` ref.

    Raises:
        KekError: the ref does not start with ``azurekv:`` or its URL is not a key id.
    """
    if not ref.startswith(KEYVAULT_REF_PREFIX):
        raise KekError(f"{ref!r} is not a Key Vault KEK ref (azurekv:https://...)")
    return KeyVaultKeyId.parse(ref[len(KEYVAULT_REF_PREFIX) :])


# --- errors -----------------------------------------------------------------------------------


def _service_codes(e: BaseException) -> tuple[str, str]:
    """(error code, inner error code) from a Key Vault error response body, or empty."""
    response = getattr(e, "response", None)
    if response is None:
        return "", ""
    try:
        doc = json.loads(response.text())
        error = doc.get("error") or {}
        inner = error.get("innererror") or {}
        return str(error.get("code") or ""), str(inner.get("code") or "")
    except Exception:
        return "", ""


def _kek_error(e: BaseException, action: str, kid: str) -> KekError:
    """Maps an Azure SDK exception to a KekError whose message starts with the reason.

    Service messages are not repeated (they are not ours to vouch for); codes are.
    """
    status = getattr(e, "status_code", None)
    code, inner = _service_codes(e)
    if isinstance(e, ClientAuthenticationError) and status is None:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        return KekError(f"no Key Vault token: cannot {action} with {kid}: {first_line}")
    if status == 401:
        return KekError(
            f"unauthorized: Key Vault refused the broker's token to {action} with {kid}"
        )
    if status == 403 and (inner == "KeyDisabled" or code == "KeyDisabled"):
        return KekError(f"key disabled: Key Vault refuses to {action} with {kid}")
    if status == 403:
        return KekError(
            f"forbidden: the broker's identity may not {action} with {kid} "
            f"({inner or code or 'Forbidden'}); it needs the 'Key Vault Crypto User' role"
        )
    if isinstance(e, ResourceNotFoundError) or status == 404:
        return KekError(f"key not found: {kid} ({code or 'NotFound'})")
    # What the SDK already retried (408, 429, 5xx, network) and still failed is transient: the
    # caller may try again later with nothing changed. Everything else needs someone to act.
    if status == 429:
        return KekUnavailableError(
            f"throttled: Key Vault kept answering 429 to {action} with {kid}"
        )
    if isinstance(e, (ServiceRequestError, ServiceResponseError)):
        cause = connection_cause(e)
        if cause is None:
            return KekUnavailableError(
                f"unreachable: cannot reach Key Vault to {action} with {kid}: {e}"
            )
        # The class first, so that the operator knows what to check; a name that does not
        # resolve or a certificate that does not verify will not change by waiting.
        error = KekError if cause.lasting else KekUnavailableError
        return error(f"unreachable ({cause.kind}): {cause.detail}; cannot {action} with {kid}")
    if (
        isinstance(e, HttpResponseError)
        and isinstance(status, int)
        and (status == 408 or status >= 500)
    ):
        return KekUnavailableError(
            f"unavailable: Key Vault failed to {action} with {kid} ({status} {code})"
        )
    if isinstance(e, HttpResponseError):
        return KekError(f"Key Vault failed to {action} with {kid} ({status} {code})")
    return KekError(f"Key Vault failed to {action} with {kid}: {type(e).__name__}: {e}")


# --- the wrapped form -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Wrapped:
    kid: str
    algorithm: str
    wrapped_record_key: bytes
    nonce: bytes
    sealed: bytes

    def encode(self) -> bytes:
        kid = self.kid.encode()
        alg = self.algorithm.encode()
        return b"".join(
            (
                bytes([AZKV_WRAP_VERSION]),
                struct.pack(">H", len(kid)),
                kid,
                struct.pack(">H", len(alg)),
                alg,
                struct.pack(">H", len(self.wrapped_record_key)),
                self.wrapped_record_key,
                self.nonce,
                self.sealed,
            )
        )

    @classmethod
    def decode(cls, data: bytes, what: str) -> _Wrapped:
        """Raises: KekError: malformed, truncated or of another version."""
        if not data or data[0] != AZKV_WRAP_VERSION:
            version = data[0] if data else None
            raise KekError(f"{what} is not a Key Vault wrapped key (format {version})")
        fields: list[bytes] = []
        offset = 1
        for limit in (_MAX_KID, _MAX_ALG, _MAX_WRAPPED_RECORD_KEY):
            if offset + 2 > len(data):
                raise KekError(f"{what} is truncated")
            (n,) = struct.unpack_from(">H", data, offset)
            offset += 2
            if n == 0 or n > limit or offset + n > len(data):
                raise KekError(f"{what} is malformed (a field of {n} bytes)")
            fields.append(data[offset : offset + n])
            offset += n
        rest = data[offset:]
        if len(rest) != _NONCE_SIZE + _SEALED_SIZE:
            raise KekError(f"{what} is malformed ({len(rest)} trailing bytes)")
        try:
            kid, alg = fields[0].decode(), fields[1].decode()
        except UnicodeDecodeError as e:
            raise KekError(f"{what} is malformed (not UTF-8)") from e
        return cls(kid, alg, fields[2], rest[:_NONCE_SIZE], rest[_NONCE_SIZE:])


def _aad(key_id: str, owner: str, kid: str, algorithm: str) -> bytes:
    return encode_info(AZKV_WRAP_LABEL + bytes([AZKV_WRAP_VERSION]), key_id, owner, kid, algorithm)


class _RecordKeyCache:
    """Recently unwrapped record keys (as AES-GCM objects), bounded in count and age."""

    def __init__(self, *, ttl: float, max_entries: int, clock: Callable[[], float]) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, AESGCM]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._ttl > 0 and self._max > 0

    def get(self, digest: bytes) -> AESGCM | None:
        if not self.enabled:
            return None
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                del self._entries[digest]
                return None
            self._entries.move_to_end(digest)
            return entry[1]

    def put(self, digest: bytes, aead: AESGCM) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._entries[digest] = (self._clock() + self._ttl, aead)
            self._entries.move_to_end(digest)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# --- the KEK ----------------------------------------------------------------------------------


class KeyVaultKek(Closeable):
    """A KEK whose root is an RSA key in Azure Key Vault (or Managed HSM). Implements
    :class:`broker.custody.Kek`.

    Args:
        ref: ``azurekv:<key id URL>``, with or without a version.
        credential: the token credential for Key Vault (not closed by this object).
        config: timeouts, retries, TLS trust and the unwrap cache.
        clock: monotonic seconds, for the unwrap cache.

    Raises:
        KekError: the ref is malformed.
    """

    def __init__(
        self,
        *,
        ref: str,
        credential: TokenCredential,
        config: KeyVaultConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ref = ref
        self._key = parse_ref(ref)
        self._credential = credential
        self.config = config or KeyVaultConfig()
        self._options = _client_options(self.config)
        self._key_client: KeyClient | None = None
        self._crypto: dict[str, CryptographyClient] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._cache = _RecordKeyCache(
            ttl=self.config.unwrap_cache_seconds,
            max_entries=self.config.unwrap_cache_entries,
            clock=clock,
        )

    @property
    def ref(self) -> str:
        return self._ref

    @property
    def key(self) -> KeyVaultKeyId:
        """The Key Vault key this KEK names (without a version: the current one)."""
        return self._key

    @property
    def fingerprint(self) -> str:
        """The key's identifier without a version (see :func:`broker.custody.kek_fingerprint`):
        it names the key, not a secret, and stays the same across the key's rotations."""
        return f"{KEYVAULT_REF_PREFIX}{self._key.vault_url}/keys/{self._key.name.lower()}"

    # -- clients ---------------------------------------------------------------------------

    def _keys(self) -> KeyClient:
        with self._lock:
            if self._closed:
                raise KekError(f"the KEK {self._ref} is closed")
            if self._key_client is None:
                self._key_client = KeyClient(self._key.vault_url, self._credential, **self._options)
            return self._key_client

    def _crypto_for(self, kid: str) -> CryptographyClient:
        with self._lock:
            if self._closed:
                raise KekError(f"the KEK {self._ref} is closed")
            client = self._crypto.get(kid)
            if client is None:
                client = CryptographyClient(kid, self._credential, **self._options)
                self._crypto[kid] = client
            return client

    # -- operations ------------------------------------------------------------------------

    def current_key(self) -> KeyVaultKey:
        """Fetches the key (the ref's version, or the current one) and checks it is usable.

        Raises:
            KekUnavailableError: ``throttled``, ``unreachable`` or ``unavailable`` (a 5xx)
                after the retries.
            KekError: ``key not found``, ``forbidden``, ``key disabled``, or the key is not an
                RSA key of this vault or not yet/no longer valid.
        """
        shown = self._key.url
        try:
            key = self._keys().get_key(self._key.name, self._key.version)
        except KekError:
            raise
        except Exception as e:
            raise _kek_error(e, "read the key", shown) from e
        kid = KeyVaultKeyId.parse(str(key.id))
        if not self._key.covers(kid) or kid.version is None:
            raise KekError(f"Key Vault answered with key {kid.url}, not a version of {shown}")
        props = key.properties
        if props.enabled is False:
            raise KekError(f"key disabled: {kid.url} is disabled in Key Vault")
        now = time.time()
        if props.not_before is not None and props.not_before.timestamp() > now:
            raise KekError(f"key not yet valid: {kid.url} is valid from {props.not_before}")
        if props.expires_on is not None and props.expires_on.timestamp() <= now:
            raise KekError(f"key expired: {kid.url} expired at {props.expires_on}")
        key_type = str(getattr(key.key_type, "value", key.key_type))
        if key_type not in ("RSA", "RSA-HSM"):
            raise KekError(f"{kid.url} is a {key.key_type} key; the KEK must be an RSA key")
        return key

    def _unwrap_record_key(self, kid: str, algorithm: str, wrapped: bytes) -> bytes:
        try:
            result = self._crypto_for(kid).unwrap_key(KeyWrapAlgorithm(algorithm), wrapped)
        except KekError:
            raise
        except Exception as e:
            raise _kek_error(e, "unwrap", kid) from e
        return bytes(result.key)

    def wrap(self, data_key: bytes | bytearray, *, key_id: str, owner: str) -> bytes:
        """Wraps a data key for ``key_id`` and ``owner`` (see the module docstring).

        The key is read from Key Vault (version resolved, enabled checked), a fresh record key
        is wrapped with it, and the wrap is verified by one unwrap through Key Vault.

        Raises:
            CustodyError: the data key is not 32 bytes, or the key id or owner is empty.
            KekUnavailableError: Key Vault failed transiently (see :meth:`current_key`).
            KekError: Key Vault refused (the message starts with the reason).
        """
        check_data_key(data_key)
        key = self.current_key()
        kid = str(key.id)
        aad = _aad(key_id, owner, kid, WRAP_ALGORITHM)
        record_key = bytearray(secrets.token_bytes(_RECORD_KEY_SIZE))
        try:
            try:
                # With the public key at hand the SDK wraps locally; without it, Key Vault does.
                crypto = CryptographyClient(key, self._credential, **self._options)
                with crypto:
                    result = crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, bytes(record_key))
            except Exception as e:
                raise _kek_error(e, "wrap", kid) from e
            wrapped_record_key = bytes(result.encrypted_key)
            # A local wrap proves nothing about the right to unwrap: check it now rather than
            # store a data key that could never be released.
            check = self._unwrap_record_key(kid, WRAP_ALGORITHM, wrapped_record_key)
            if not hmac.compare_digest(check, bytes(record_key)):
                raise KekError(f"Key Vault key {kid} did not unwrap what it wrapped")
            aead = AESGCM(bytes(record_key))
            nonce = secrets.token_bytes(_NONCE_SIZE)
            sealed = aead.encrypt(nonce, bytes(data_key), aad)
            self._cache.put(_digest(kid, wrapped_record_key), aead)
        finally:
            zero(record_key)
        return _Wrapped(kid, WRAP_ALGORITHM, wrapped_record_key, nonce, sealed).encode()

    def unwrap(self, wrapped: bytes, *, key_id: str, owner: str) -> bytes:
        """Unwraps a key wrapped by :meth:`wrap` for the same ``key_id`` and ``owner``.

        Raises:
            KekUnavailableError: Key Vault failed transiently (``throttled``, ``unreachable``,
                ``unavailable``).
            KekError: the blob is malformed, names another Key Vault key, Key Vault refused
                (the message starts with the reason: ``forbidden``, ``key not found``, ``key
                disabled``), or the blob belongs to another key id or owner or was altered.
        """
        what = f"wrapped data key {key_id!r} of {owner!r}"
        blob = _Wrapped.decode(wrapped, what)
        try:
            kid = KeyVaultKeyId.parse(blob.kid)
        except KekError as e:
            raise KekError(f"{what} names a malformed Key Vault key id") from e
        if kid.version is None or not self._key.covers(kid):
            raise KekError(f"{what} is wrapped by {blob.kid}, which is not {self._ref}")
        if blob.algorithm != WRAP_ALGORITHM:
            raise KekError(f"{what} uses wrap algorithm {blob.algorithm!r}")
        try:
            aad = _aad(key_id, owner, blob.kid, blob.algorithm)
        except CustodyError as e:
            raise KekError(f"{what}: {e}") from e
        digest = _digest(blob.kid, blob.wrapped_record_key)
        aead = self._cache.get(digest)
        if aead is None:
            record_key = bytearray(
                self._unwrap_record_key(blob.kid, blob.algorithm, blob.wrapped_record_key)
            )
            try:
                if len(record_key) != _RECORD_KEY_SIZE:
                    raise KekError(f"{what}: Key Vault returned a {len(record_key)}-byte key")
                aead = AESGCM(bytes(record_key))
            finally:
                zero(record_key)
            fresh = True
        else:
            fresh = False
        try:
            data_key = aead.decrypt(blob.nonce, blob.sealed, aad)
        except InvalidTag as e:
            raise KekError(
                f"{what} does not unwrap: it belongs to another key id or owner, or was altered"
            ) from e
        if fresh:
            self._cache.put(digest, aead)
        return data_key

    def check(self) -> str:
        """Wraps and unwraps a random key end to end; returns the versioned key id in use.

        For operators importing a Key Vault key: it proves the broker's identity can read the
        key, wrap and unwrap with it.

        Raises:
            KekError: as :meth:`wrap` and :meth:`unwrap`.
        """
        probe = secrets.token_bytes(32)
        wrapped = self.wrap(probe, key_id="cleanroom-kek-check", owner="cleanroom-broker")
        self._cache.clear()
        back = self.unwrap(wrapped, key_id="cleanroom-kek-check", owner="cleanroom-broker")
        if not hmac.compare_digest(back, probe):
            raise KekError(f"Key Vault key {self._key.url} did not round-trip a key")
        return _Wrapped.decode(wrapped, "probe").kid

    def close(self) -> None:
        """Closes the HTTP clients and forgets cached record keys. Idempotent."""
        with self._lock:
            self._closed = True
            clients: list[Any] = list(self._crypto.values())
            if self._key_client is not None:
                clients.append(self._key_client)
            self._crypto.clear()
            self._key_client = None
        self._cache.clear()
        for client in clients:
            client.close()

    def __repr__(self) -> str:
        return f"KeyVaultKek({self._ref!r})"


def _digest(kid: str, wrapped_record_key: bytes) -> bytes:
    return hashlib.sha256(kid.encode() + b"\x00" + wrapped_record_key).digest()


# --- provider ---------------------------------------------------------------------------------


class KeyVaultKekProvider:
    """The factory :meth:`KekRegistry.add_provider` calls for ``azurekv:`` refs.

    All KEKs it builds share one credential: the one given, or one made from ``config`` on
    first use (closed by :meth:`close`).
    """

    def __init__(
        self, *, config: KeyVaultConfig | None = None, credential: TokenCredential | None = None
    ) -> None:
        self.config = config or KeyVaultConfig()
        self._credential = credential
        self._owned: TokenCredential | None = None
        self._lock = threading.Lock()

    def credential(self) -> TokenCredential:
        """The shared credential.

        Raises:
            KekError: it cannot be set up.
        """
        with self._lock:
            if self._credential is not None:
                return self._credential
            if self._owned is None:
                self._owned = make_credential(self.config)
            return self._owned

    def __call__(self, ref: str) -> KeyVaultKek:
        """Raises: KekError: the ref is malformed or the credential cannot be set up."""
        return KeyVaultKek(ref=ref, credential=self.credential(), config=self.config)

    def close(self) -> None:
        """Closes the credential this provider made (not one it was given)."""
        with self._lock:
            owned, self._owned = self._owned, None
        close = getattr(owned, "close", None)
        if callable(close):
            close()


def register_key_vault_provider(
    registry: KekRegistry,
    *,
    config: KeyVaultConfig | None = None,
    credential: TokenCredential | None = None,
) -> KeyVaultKekProvider:
    """Lets ``registry`` resolve ``azurekv:`` refs. Close the returned provider after the
    registry to close the credential it made.

    Raises:
        KekError: an ``azurekv:`` provider is already registered.
    """
    provider = KeyVaultKekProvider(config=config, credential=credential)
    registry.add_provider(KEYVAULT_REF_PREFIX, provider)
    return provider

"""A test double of Azure Key Vault: a local HTTPS server that speaks the Key Vault REST calls
the broker's KEK provider (``broker.kek_azure``) makes.

**For the demo and the tests only; never a vault.** Its RSA keys live in this process's memory
and vanish with it, its TLS CA is made up on the spot, and it accepts one static bearer token.
No Key Vault emulator exists, so the provider is exercised with the real
``azure-keyvault-keys`` client against this server on 127.0.0.1. It implements:

* the bearer-token challenge: a request without the expected token gets ``401`` with
  ``WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/<tenant>",
  resource="https://vault.azure.net"``, as Key Vault answers; the SDK then asks its credential
  for a token for ``https://vault.azure.net/.default`` and retries;
* ``GET /keys/{name}[/{version}]``: the key bundle (public JWK and attributes);
* ``POST /keys/{name}/{version}/wrapkey`` and ``.../unwrapkey`` with ``RSA-OAEP-256``, done
  with a real RSA key (``cryptography``).

Behaviour switches make it answer as Key Vault does when things go wrong: ``403`` Forbidden
(``ForbiddenByRbac``), ``404`` ``KeyNotFound``, ``429`` ``Throttled`` with ``Retry-After``, and a
disabled key (``GET`` and ``wrapkey`` still work, ``unwrapkey`` is ``403`` ``KeyDisabled``).
Every request is recorded (method, path, status, time) so tests can see retries.

TLS uses a throwaway CA whose certificate file (:attr:`FakeKeyVault.ca_file`) the client is told
to trust (the SDK's ``connection_verify``, the broker's ``[keyvault] ca_file``). Because the
vault's host is ``127.0.0.1`` and not ``*.vault.azure.net``, the client must be built with
``verify_challenge_resource=False``; :meth:`FakeKeyVault.broker_settings` gives the broker's
``[keyvault]`` settings that reach it.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from azure.core.credentials import AccessToken
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cleanroom.closing import Stoppable
from pki.ca import cert_to_pem, certificate_builder, key_to_pem, self_signed_ca_certificate

__all__ = [
    "ALGORITHM",
    "TEST_TENANT",
    "VAULT_RESOURCE",
    "VAULT_SCOPE",
    "FakeKeyVault",
    "KeyVersion",
    "RecordedRequest",
    "StaticTokenCredential",
    "TlsFiles",
    "VaultKey",
    "make_tls_files",
    "running_vault",
    "start_fake_key_vault",
]

#: The resource Key Vault names in its challenge; tokens are requested for ``<it>/.default``.
VAULT_RESOURCE = "https://vault.azure.net"
VAULT_SCOPE = VAULT_RESOURCE + "/.default"
TEST_TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
ALGORITHM = "RSA-OAEP-256"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_bytes(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


# --- a static credential ----------------------------------------------------------------------


class StaticTokenCredential:
    """An ``azure.core`` token credential that always returns the same bearer token.

    It records every scope and tenant the SDK asked for, so tests can check the challenge flow.
    """

    def __init__(self, token: str) -> None:
        self.token = token
        self.requests: list[tuple[tuple[str, ...], str | None]] = []

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        self.requests.append((scopes, tenant_id))
        return AccessToken(self.token, int(time.time()) + 3600)


# --- TLS material -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost (EC P-256)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = self_signed_ca_certificate(
        ca_key,
        "fake key vault test CA",
        not_before=now - dt.timedelta(minutes=5),
        not_after=now + dt.timedelta(days=1),
        path_length=0,
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        certificate_builder(
            subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]),
            issuer=ca_cert.subject,
            public_key=key.public_key(),
            not_before=now - dt.timedelta(minutes=5),
            not_after=now + dt.timedelta(days=1),
            ca=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(
        ca_file=directory / "vault-ca.pem",
        cert_file=directory / "vault.pem",
        key_file=directory / "vault.key",
    )
    files.ca_file.write_bytes(cert_to_pem(ca_cert))
    files.cert_file.write_bytes(cert_to_pem(cert))
    files.key_file.write_bytes(key_to_pem(key))
    files.key_file.chmod(0o600)
    return files


# --- the vault's state ------------------------------------------------------------------------


@dataclass
class KeyVersion:
    version: str
    private_key: rsa.RSAPrivateKey
    created: int


@dataclass
class VaultKey:
    name: str
    versions: list[KeyVersion] = field(default_factory=list)
    enabled: bool = True


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    status: int
    at: float
    authorized: bool


@dataclass
class _Fault:
    status: int
    code: str
    message: str
    retry_after: int | None = None
    inner: str | None = None


class FakeKeyVault(Stoppable):
    """The vault: keys, behaviour switches and the HTTPS server. Use :func:`start_fake_key_vault`.

    Thread-safe: the server answers on its own threads while the test changes the switches.
    """

    def __init__(self, *, tls: TlsFiles, token: str | None = None, key_size: int = 2048) -> None:
        self.tls = tls
        self.token = token or secrets.token_urlsafe(24)
        self.key_size = key_size
        self.keys: dict[str, VaultKey] = {}
        self.requests: list[RecordedRequest] = []
        self.forbidden = False
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- what tests use --------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The vault URL (``https://127.0.0.1:<port>``)."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        """The CA certificate the client must trust."""
        return self.tls.ca_file

    def credential(self) -> StaticTokenCredential:
        """A credential whose token this vault accepts."""
        return StaticTokenCredential(self.token)

    def key_url(self, name: str, version: str | None = None) -> str:
        """The key identifier URL (versionless when ``version`` is None)."""
        return f"{self.url}/keys/{name}" + (f"/{version}" if version else "")

    def create_key(self, name: str) -> str:
        """Creates a key (or a new version of it) and returns the versioned key id URL."""
        private = rsa.generate_private_key(public_exponent=65537, key_size=self.key_size)
        version = secrets.token_hex(16)
        with self._lock:
            key = self.keys.setdefault(name, VaultKey(name=name))
            key.versions.append(KeyVersion(version, private, int(time.time())))
        return self.key_url(name, version)

    rotate_key = create_key

    def set_enabled(self, name: str, enabled: bool) -> None:
        with self._lock:
            self.keys[name].enabled = enabled

    def delete_key(self, name: str) -> None:
        with self._lock:
            del self.keys[name]

    def throttle(self, times: int = 1, *, retry_after: int = 1) -> None:
        """The next ``times`` authorized requests get 429 with ``Retry-After``."""
        with self._lock:
            for _ in range(times):
                self._faults.append(
                    _Fault(
                        429,
                        "Throttled",
                        "Request was not processed because too many requests were received.",
                        retry_after=retry_after,
                    )
                )

    def fail_next(self, status: int, code: str = "InternalError", times: int = 1) -> None:
        """The next ``times`` authorized requests get ``status`` with error ``code``."""
        with self._lock:
            for _ in range(times):
                self._faults.append(_Fault(status, code, f"injected {status} {code}"))

    def recorded(
        self, *, method: str | None = None, suffix: str | None = None
    ) -> list[RecordedRequest]:
        """The recorded requests, filtered by method and path ending."""
        with self._lock:
            out = list(self.requests)
        return [
            r
            for r in out
            if (method is None or r.method == method)
            and (suffix is None or urlsplit(r.path).path.rstrip("/").endswith(suffix))
        ]

    # -- request handling (called by the server threads) ------------------------------------

    def _record(self, method: str, path: str, status: int, authorized: bool) -> None:
        with self._lock:
            self.requests.append(
                RecordedRequest(method, path, status, time.monotonic(), authorized)
            )

    def _take_fault(self) -> _Fault | None:
        with self._lock:
            return self._faults.pop(0) if self._faults else None

    def _find(self, name: str, version: str | None) -> tuple[VaultKey, KeyVersion] | None:
        with self._lock:
            key = self.keys.get(name)
            if key is None or not key.versions:
                return None
            if not version:
                return key, key.versions[-1]
            for v in key.versions:
                if v.version == version:
                    return key, v
            return None

    def _bundle(self, key: VaultKey, v: KeyVersion) -> dict[str, Any]:
        numbers = v.private_key.public_key().public_numbers()
        return {
            "key": {
                "kid": self.key_url(key.name, v.version),
                "kty": "RSA",
                "key_ops": ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"],
                "n": _b64url(_int_bytes(numbers.n)),
                "e": _b64url(_int_bytes(numbers.e)),
            },
            "attributes": {
                "enabled": key.enabled,
                "created": v.created,
                "updated": v.created,
                "recoveryLevel": "Recoverable+Purgeable",
                "recoverableDays": 90,
                "exportable": False,
            },
        }

    def handle(
        self, method: str, path: str, headers: Any, body: bytes
    ) -> tuple[int, dict[str, str], dict[str, Any] | None]:
        """Answers one request: (status, extra headers, JSON body or None)."""
        authorized = headers.get("Authorization", "") == f"Bearer {self.token}"
        status, extra, doc = self._answer(method, path, authorized, body)
        self._record(method, path, status, authorized)
        return status, extra, doc

    def _answer(
        self, method: str, path: str, authorized: bool, body: bytes
    ) -> tuple[int, dict[str, str], dict[str, Any] | None]:
        if not authorized:
            challenge = (
                f'Bearer authorization="https://login.microsoftonline.com/{TEST_TENANT}", '
                f'resource="{VAULT_RESOURCE}"'
            )
            return (
                401,
                {"WWW-Authenticate": challenge},
                _error("Unauthorized", "AKV10000: Request is missing a Bearer or PoP token."),
            )
        fault = self._take_fault()
        if fault is not None:
            extra = {"Retry-After": str(fault.retry_after)} if fault.retry_after else {}
            return fault.status, extra, _error(fault.code, fault.message, fault.inner)
        if self.forbidden:
            return (
                403,
                {},
                _error(
                    "Forbidden",
                    "Caller is not authorized to perform action on resource.",
                    "ForbiddenByRbac",
                ),
            )
        parts = [p for p in urlsplit(path).path.split("/") if p]
        if len(parts) < 2 or parts[0] != "keys":
            return 400, {}, _error("BadParameter", f"unsupported path {path}")
        name = parts[1]
        version = parts[2] if len(parts) > 2 else None
        operation = parts[3] if len(parts) > 3 else None
        found = self._find(name, version)
        if found is None:
            return (
                404,
                {},
                _error(
                    "KeyNotFound",
                    f"A key with (name/id) {name} was not found in this key vault.",
                ),
            )
        key, v = found
        if method == "GET" and operation is None:
            return 200, {}, self._bundle(key, v)
        if method != "POST" or operation not in ("wrapkey", "unwrapkey"):
            return 400, {}, _error("BadParameter", f"unsupported operation {method} {path}")
        try:
            request = json.loads(body)
            alg, value = request["alg"], _unb64url(request["value"])
        except (ValueError, KeyError, TypeError):
            return 400, {}, _error("BadParameter", "malformed request body")
        if alg != ALGORITHM:
            return 400, {}, _error("BadParameter", f"unsupported algorithm {alg}")
        oaep = padding.OAEP(
            mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
        )
        kid = self.key_url(key.name, v.version)
        if operation == "wrapkey":
            # Key Vault wraps with a disabled key (a public-key operation); it refuses to unwrap.
            out = v.private_key.public_key().encrypt(value, oaep)
            return 200, {}, {"kid": kid, "value": _b64url(out)}
        if not key.enabled:
            return (
                403,
                {},
                _error(
                    "Forbidden",
                    "Operation unwrapKey is not allowed on a disabled key.",
                    "KeyDisabled",
                ),
            )
        try:
            out = v.private_key.decrypt(value, oaep)
        except ValueError:
            return 400, {}, _error("BadParameter", "Bad Request")
        return 200, {}, {"kid": kid, "value": _b64url(out)}

    # -- server lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Serves HTTPS on a free port of 127.0.0.1 from daemon threads of this process."""
        vault = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes; without TCP_NODELAY the client's delayed
            # ACK would add ~40 ms to every call.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, extra, doc = vault.handle(self.command, self.path, self.headers, body)
                payload = json.dumps(doc).encode() if doc is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(payload)))
                for k, val in extra.items():
                    self.send_header(k, val)
                self.end_headers()
                self.wfile.write(payload)

            do_GET = _serve
            do_POST = _serve

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def broker_settings(self) -> dict[str, str | bool | float | int]:
        """The broker's ``[keyvault]`` settings that reach this double: its static token, its
        CA, the challenge resource check off (it is 127.0.0.1), no unwrap cache, quick retries.
        """
        return {
            "credential": "static-token",
            "access_token": self.token,
            "ca_file": str(self.ca_file),
            "verify_challenge_resource": False,
            "unwrap_cache_seconds": 0.0,
            "retry_total": 2,
            "retry_backoff_max_seconds": 1.0,
            "timeout_seconds": 5.0,
        }

    def stop(self) -> None:
        """Stops the server (idempotent); the keys stay in memory until the object is dropped."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def _error(code: str, message: str, inner: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if inner:
        error["innererror"] = {"code": inner}
    return {"error": error}


def start_fake_key_vault(workdir: Path, **kwargs: Any) -> FakeKeyVault:
    """Starts a :class:`FakeKeyVault` on a free loopback port with TLS files under ``workdir``."""
    vault = FakeKeyVault(tls=make_tls_files(workdir / "vault-tls"), **kwargs)
    vault.start()
    return vault


def running_vault(workdir: Path, **kwargs: Any) -> Iterator[FakeKeyVault]:
    """Generator form for fixtures: yields a started vault and stops it afterwards."""
    vault = start_fake_key_vault(workdir, **kwargs)
    try:
        yield vault
    finally:
        vault.stop()

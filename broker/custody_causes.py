"""Why a KEK service could not be reached: the cause class an operator can act on.

The Azure SDK reports every connection failure as ``ServiceRequestError`` (or
``ServiceResponseError``) whose text is urllib3's. Below it, in the exception chain, is what
actually happened: a name that does not resolve, a certificate that does not verify, a refused
connection, a timeout. :func:`connection_cause` walks the chain and names it, in words that say
what to check, and whether waiting can help:

* ``dns``: the vault's name does not resolve (``EAI_NONAME``: a typo, a private endpoint's zone
  missing). Lasting: retrying will not change the answer.
* ``dns-temporary``: the resolver failed (``EAI_AGAIN``). Transient.
* ``tls``: the vault's certificate does not verify against the trusted CAs (a TLS-inspecting
  proxy, a wrong ``ca_file``), or the handshake failed. Lasting.
* ``refused``, ``timeout``, ``network``: transient.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import Final

#: Cause classes that last until someone changes the name, the trust or the network.
LASTING: Final = frozenset({"dns", "tls"})


@dataclass(frozen=True)
class ConnectionCause:
    """A connection failure's class (``dns``, ``tls``, ...) and a short description."""

    kind: str
    detail: str

    @property
    def lasting(self) -> bool:
        """Whether retrying cannot help (the cause needs someone to act)."""
        return self.kind in LASTING


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and everything below it: causes, contexts, the SDK's ``inner_exception``,
    urllib3's ``reason`` and exceptions passed as arguments (each once)."""
    seen: set[int] = set()
    out: list[BaseException] = []
    todo = [e]
    while todo and len(out) < 32:
        x = todo.pop(0)
        if id(x) in seen:
            continue
        seen.add(id(x))
        out.append(x)
        for attr in ("inner_exception", "__cause__", "__context__", "reason"):
            y = getattr(x, attr, None)
            if isinstance(y, BaseException):
                todo.append(y)
        todo.extend(a for a in getattr(x, "args", ()) if isinstance(a, BaseException))
    return out


def _host_of(chain: list[BaseException]) -> str:
    """The host urllib3 names (``HTTPSConnection(host='...', ...)``), if any."""
    for x in chain:
        text = str(x)
        marker = "host='"
        if marker in text:
            return text.split(marker, 1)[1].split("'", 1)[0]
    return ""


def connection_cause(e: BaseException) -> ConnectionCause | None:
    """The cause class of a connection failure, or None when the chain names none."""
    chain = _chain(e)
    host = _host_of(chain)
    where = f" {host}" if host else ""
    for x in chain:
        if isinstance(x, socket.gaierror):
            if x.errno == socket.EAI_AGAIN:
                return ConnectionCause(
                    "dns-temporary", f"the name{where} could not be resolved now"
                )
            return ConnectionCause(
                "dns", f"the name{where} does not resolve (check the vault's name and DNS)"
            )
        if isinstance(x, ssl.SSLCertVerificationError):
            reason = x.verify_message or x.reason or "certificate verify failed"
            return ConnectionCause(
                "tls",
                f"the certificate of{where or ' the vault'} does not verify: {reason} "
                "(check [keyvault] ca_file, or a TLS-inspecting proxy)",
            )
        if isinstance(x, ssl.SSLError):
            return ConnectionCause(
                "tls",
                f"the TLS handshake with{where or ' the vault'} failed: "
                f"{x.reason or type(x).__name__}",
            )
    for x in chain:
        if isinstance(x, ConnectionRefusedError):
            return ConnectionCause(
                "refused", f"the connection to{where or ' the vault'} was refused"
            )
        if isinstance(x, TimeoutError | socket.timeout):
            return ConnectionCause("timeout", f"the connection to{where or ' the vault'} timed out")
    for x in chain:
        if type(x).__name__ in ("ConnectTimeoutError", "ReadTimeoutError"):
            return ConnectionCause("timeout", f"the connection to{where or ' the vault'} timed out")
    return None


__all__ = ["LASTING", "ConnectionCause", "connection_cause"]

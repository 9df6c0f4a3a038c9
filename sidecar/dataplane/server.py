"""The workload service (``cleanroom.v1.WorkloadService``) on the sidecar's Unix socket.

:class:`WorkloadServer` serves the session's inputs as plaintext streams and accepts outputs as
plaintext streams, which it seals to the approved recipients. The socket lives in a private
directory (mode 0700) and is itself mode 0600; a :class:`~sidecar.dataplane.gate.PeerGate`
in front of gRPC learns each connection's kernel credentials (``SO_PEERCRED``), and every call
is checked against them with the caller's ``allowed_peer`` predicate (the workload's process
tree), at its start, and for ``ReadInput`` again before every chunk, so a read whose process
left the tree (re-parented after the workload exited, or double-forked away) is cut with
``PERMISSION_DENIED``. See docs/workload-sdk.md for the security model and the error semantics.

Wire behaviour:

- ``ReadInput`` sends plaintext in chunks of ``chunk_size`` bytes; only after the sealed
  stream's final segment authenticated does a message carry ``end_of_input = true``. A tampered,
  truncated or mis-keyed input ends the call with ``DATA_LOSS`` instead. gRPC's flow control
  paces the generator, so memory stays at a few chunks whatever the input size.
- ``WriteOutput``: the first message carries the output's name, then ``chunk`` messages, and the
  stream must end with a message that repeats the name. Only then is the output committed; a
  stream that ends any other way (cancelled, connection lost, no closing name) is discarded.
  The closing name makes "the workload finished" explicit rather than inferred from a
  half-close, which gRPC Python's server cannot tell apart from a cancellation reliably.
- The key ring is checked (re-attesting when the attestation lapsed) before every chunk of an
  input, which also stops when its key is no longer in the ring, and before an output is opened
  and again before it is committed. When the attestation cannot be renewed, the call ends with
  ``FAILED_PRECONDITION``: reads stop, new outputs are refused and an output still being
  written is discarded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, NoReturn, cast

import grpc

from cleanroom.closing import Service
from cleanroom.v1 import workload_pb2
from sealing.envelope import OpenReader, read_header
from sealing.errors import SealingError
from sealing.keys import RecipientPublicKey
from sidecar.dataplane.config import DataPlaneConfig
from sidecar.dataplane.errors import (
    CallRefusedError,
    DataPlaneError,
    InputAuthenticationError,
    InputSourceError,
    KeyRingError,
    OutputExistsError,
    OutputNameError,
    SocketSetupError,
    WorkloadInputError,
    WorkloadOutputError,
)
from sidecar.dataplane.framed import serve_data_connection
from sidecar.dataplane.gate import PeerGate, check_socket_path
from sidecar.dataplane.inputs import InputSource, InputSpec, input_source_for, plaintext_size
from sidecar.dataplane.keyring import KeyRing
from sidecar.dataplane.outputs import OutputReceipt, OutputSink, OutputWriter, Recipient
from sidecar.dataplane.peers import (
    AllowedPeer,
    LineageWatch,
    PeerCredentials,
    process_start_time,
)
from workload.wire import (
    END_OF_INPUT,
    MAX_PREFIX,
    SERVICE,
    WireError,
    decode_write_request,
    read_chunk_prefix,
)

__all__ = ["SOCKET_ENV", "WorkloadServer"]

_log = logging.getLogger(__name__)
_audit = logging.getLogger("sidecar.dataplane.audit")

#: The environment variable through which the workload learns the socket path.
SOCKET_ENV = "CLEANROOM_WORKLOAD_SOCKET"

_DENIED = (
    "this process is not part of the workload's process tree; "
    "the workload socket serves only the workload"
)


# A call ends with this status; raised inside handlers, turned into context.abort() for gRPC
# calls and into an ERROR frame on a data connection.
_Abort = CallRefusedError


def _prepare_private_dir(path: Path) -> bool:
    """Creates ``path`` with mode 0700, or checks that an existing one is ours and makes it
    0700; returns True when it was created here.

    Raises:
        SocketSetupError: it exists and is a symlink, not a directory or not ours, or cannot be
            created.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        created = False
    except OSError as e:
        raise SocketSetupError(f"cannot create socket directory {path}: {e.strerror or e}") from e
    try:
        st = os.lstat(path)
    except OSError as e:
        raise SocketSetupError(f"cannot inspect socket directory {path}: {e.strerror or e}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise SocketSetupError(f"socket directory {path} is not a directory (or is a symlink)")
    if st.st_uid != os.geteuid():
        raise SocketSetupError(f"socket directory {path} belongs to uid {st.st_uid}, not us")
    # mkdir() applied the umask, and an existing directory may be more open: set it exactly.
    os.chmod(path, 0o700)
    return created


class _Servicer:
    """The three calls, with the peer check in front of each."""

    def __init__(self, server: WorkloadServer) -> None:
        self._s = server

    # --- authorization ----------------------------------------------------------------------

    def _authorize(self, context: grpc.ServicerContext, method: str) -> PeerCredentials:
        creds = self._s._gate_credentials(context.peer())
        reason = (
            "connection did not come through the workload socket"
            if creds is None
            else self._s._peer_refusal(creds)
        )
        if reason is not None:
            who = (
                f"unknown peer {context.peer()!r}"
                if creds is None
                else f"pid={creds.pid} uid={creds.uid} gid={creds.gid}"
            )
            _audit.warning("workload socket: DENIED %s from %s: %s", method, who, reason)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, _DENIED)
        assert creds is not None
        return creds

    @staticmethod
    def _abort(context: grpc.ServicerContext, err: _Abort) -> NoReturn:
        context.abort(err.code, err.details)

    # --- ListInputs -------------------------------------------------------------------------

    def list_inputs(
        self, request: workload_pb2.ListInputsRequest, context: grpc.ServicerContext
    ) -> workload_pb2.ListInputsResponse:
        self._authorize(context, "ListInputs")
        return workload_pb2.ListInputsResponse(
            inputs=[
                workload_pb2.InputInfo(
                    name=spec.name,
                    owner_party=spec.owner_party,
                    size=self._s._plaintext_size(spec.name) or 0,
                )
                for spec in self._s._inputs.values()
            ]
        )

    # --- ReadInput --------------------------------------------------------------------------

    def read_input(
        self, request: workload_pb2.ReadInputRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        creds = self._authorize(context, "ReadInput")
        try:
            yield from self._s._stream_input(request.name, creds)
        except _Abort as e:
            self._abort(context, e)

    # --- WriteOutput ------------------------------------------------------------------------

    def write_output(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> workload_pb2.WriteOutputResponse:
        creds = self._authorize(context, "WriteOutput")
        try:
            return self._s._receive_output(request_iterator, context, creds)
        except _Abort as e:
            self._abort(context, e)


class WorkloadServer(Service):
    """The workload socket: a context manager that serves inputs and accepts outputs.

    Args:
        socket_dir: directory to hold the socket; created mode 0700 (an existing one must be
            ours and is set to 0700). Removed on stop if it was created here.
        inputs: the session's inputs (unique names).
        keyring: the released data keys; checked before every chunk served (the input's key
            must still be in it) and before an output is opened and committed.
        outputs: where sealed outputs go.
        recipients: (party, public key) pairs the outputs are sealed to.
        allowed_peer: ``(pid, uid) -> bool``; True for processes of the workload's tree. See
            :class:`~sidecar.dataplane.peers.ProcessTree`.
        config: limits (chunk size, message size, threads, connections).

    Raises:
        WorkloadInputError: two inputs share a name.
        InputSourceError: an input's URL has no registered source.
        ValueError: no recipients, or a recipient that is not (party, RecipientPublicKey).
    """

    def __init__(
        self,
        *,
        socket_dir: str | os.PathLike[str],
        inputs: Sequence[InputSpec],
        keyring: KeyRing,
        outputs: OutputSink,
        recipients: Sequence[tuple[str, RecipientPublicKey]],
        allowed_peer: AllowedPeer,
        config: DataPlaneConfig | None = None,
    ) -> None:
        self._config = config or DataPlaneConfig()
        self._socket_dir = Path(socket_dir).absolute()
        self._socket_path = self._socket_dir / self._config.socket_name
        self._inputs: dict[str, InputSpec] = {}
        self._sources: dict[str, InputSource] = {}
        for spec in inputs:
            if spec.name in self._inputs:
                raise WorkloadInputError(f"two inputs are named {spec.name!r}")
            self._inputs[spec.name] = spec
            self._sources[spec.name] = input_source_for(spec)
        if not recipients:
            raise ValueError("outputs need at least one recipient")
        for party, key in recipients:
            if not party or not isinstance(key, RecipientPublicKey):
                raise ValueError("each recipient must be a (party name, RecipientPublicKey) pair")
        self._recipients = tuple(Recipient(party, key) for party, key in recipients)
        self._keyring = keyring
        self._outputs = outputs
        self._allowed_peer = allowed_peer
        self._sizes: dict[str, int | None] = {}
        self._sizes_lock = threading.Lock()
        self._server: grpc.Server | None = None
        self._gate: PeerGate | None = None
        self._internal_dir: Path | None = None
        self._created_dir = False
        self._state_lock = threading.Lock()

    @property
    def socket_path(self) -> Path:
        """The workload socket's path (give it to the workload in ``CLEANROOM_WORKLOAD_SOCKET``)."""
        return self._socket_path

    def environment(self) -> dict[str, str]:
        """The environment variables the workload needs to find the socket."""
        return {SOCKET_ENV: os.fspath(self._socket_path)}

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Creates the private directory and the socket, and starts serving.

        Raises:
            SocketSetupError: the directory or a socket cannot be created safely.
            DataPlaneError: already started.
        """
        with self._state_lock:
            if self._server is not None:
                raise DataPlaneError("the workload server is already running")
            check_socket_path(self._socket_path)
            self._created_dir = _prepare_private_dir(self._socket_dir)
            try:
                self._start_locked()
            except BaseException:
                self._teardown(grace=0)
                raise

    def _start_locked(self) -> None:
        cfg = self._config
        # gRPC's own socket sits in a separate private directory with a short path (Unix socket
        # paths are limited to 107 bytes); calls through it are refused anyway unless they came
        # through the gate.
        self._internal_dir = Path(tempfile.mkdtemp(prefix="cleanroom-grpc-"))
        internal = self._internal_dir / "grpc.sock"
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_size),
            ("grpc.max_send_message_length", cfg.max_message_size),
            # Let the transport read large frames in few system calls.
            ("grpc.experimental.tcp_read_chunk_size", 1 << 20),
            ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
            ("grpc.experimental.tcp_max_read_chunk_size", 1 << 20),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=cfg.max_workers, thread_name_prefix="workload-rpc"
            ),
            options=options,
            maximum_concurrent_rpcs=cfg.max_workers,
        )
        servicer = _Servicer(self)
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "ListInputs": grpc.unary_unary_rpc_method_handler(
                servicer.list_inputs,
                request_deserializer=workload_pb2.ListInputsRequest.FromString,
                response_serializer=workload_pb2.ListInputsResponse.SerializeToString,
            ),
            # The bulk messages skip the protobuf classes (see workload.wire): ReadInput's
            # handler yields serialised messages and WriteOutput's receives them.
            "ReadInput": grpc.unary_stream_rpc_method_handler(
                servicer.read_input,
                request_deserializer=workload_pb2.ReadInputRequest.FromString,
                response_serializer=None,
            ),
            "WriteOutput": grpc.stream_unary_rpc_method_handler(
                servicer.write_output,
                request_deserializer=None,
                response_serializer=workload_pb2.WriteOutputResponse.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        try:
            server.add_insecure_port(f"unix:{internal}")
        except RuntimeError as e:
            raise SocketSetupError(f"cannot bind the internal gRPC socket: {e}") from e
        os.chmod(internal, 0o600)
        self._server = server
        server.start()
        gate = PeerGate(
            listen_path=self._socket_path,
            upstream_path=internal,
            max_connections=cfg.max_connections,
            pipe_size=cfg.pipe_size,
            data_handler=self._serve_data_connection,
        )
        # A stale socket from a crashed run would make bind() fail.
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self._socket_path).st_mode):
                self._socket_path.unlink()
        gate.start()
        self._gate = gate
        _log.info(
            "workload socket listening at %s (%d input(s), outputs sealed to %s)",
            self._socket_path,
            len(self._inputs),
            ", ".join(r.party for r in self._recipients),
        )

    def stop(self, grace: float | None = 5.0) -> None:
        """Stops accepting connections, lets running calls finish for ``grace`` seconds, then
        cancels the rest (their outputs are discarded) and removes the socket. Idempotent."""
        with self._state_lock:
            self._teardown(grace)

    def _teardown(self, grace: float | None) -> None:
        gate, server = self._gate, self._server
        deadline = time.monotonic() + (grace or 0.0)
        if gate is not None:
            gate.stop_accepting()
        if server is not None:
            server.stop(grace).wait()
        if gate is not None:
            # Data connections get the same grace period as gRPC calls: an output still being
            # written may finish and commit; whatever is still open then is cut (and discarded).
            gate.wait_for_data_connections(max(0.0, deadline - time.monotonic()))
            gate.close_all()
        self._gate = self._server = None
        if self._internal_dir is not None:
            shutil.rmtree(self._internal_dir, ignore_errors=True)
            self._internal_dir = None
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self._socket_path).st_mode):
                self._socket_path.unlink()
        if self._created_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self._socket_dir)
            self._created_dir = False

    # --- helpers for the servicer and the data connections -------------------------------------

    def _serve_data_connection(self, conn: Any, creds: PeerCredentials) -> None:
        serve_data_connection(self, conn, creds)

    def _authorize_data(self, creds: PeerCredentials, method: str) -> None:
        """The peer check at the start of a data connection's call (as for a gRPC call).

        Raises:
            CallRefusedError: PERMISSION_DENIED, with an audit line.
        """
        reason = self._peer_refusal(creds)
        if reason is not None:
            _audit.warning(
                "workload socket: DENIED %s (data connection) from pid=%d uid=%d gid=%d: %s",
                method,
                creds.pid,
                creds.uid,
                creds.gid,
                reason,
            )
            raise _Abort(grpc.StatusCode.PERMISSION_DENIED, _DENIED)

    def _peer_refusal(self, creds: PeerCredentials) -> str | None:
        """Why the process behind ``creds`` may not use the socket now, or None if it may."""
        if creds.start_time is None or process_start_time(creds.pid) != creds.start_time:
            return "the connecting process has exited"
        try:
            allowed = self._allowed_peer(creds.pid, creds.uid)
        except Exception as e:
            _log.warning("allowed-peer check raised %s; refusing", type(e).__name__)
            allowed = False
        return None if allowed else "not in the workload's process tree"

    def _watch_peer(self, creds: PeerCredentials) -> LineageWatch | None:
        """A cheap per-chunk test that the peer's place in the tree is unchanged, when the
        allowed-peer predicate offers one (:meth:`ProcessTree.watch`); None: check in full."""
        watch = getattr(self._allowed_peer, "watch", None)
        if watch is None:
            return None
        try:
            result = watch(creds.pid)
        except Exception as e:
            _log.warning("allowed-peer watch raised %s; checking in full", type(e).__name__)
            return None
        return result if isinstance(result, LineageWatch) else None

    def _recheck_peer(self, creds: PeerCredentials, what: str, done: int) -> None:
        """Raises _Abort(PERMISSION_DENIED) when the peer of an open stream may no longer use
        the socket; ``done`` is the number of bytes the stream moved so far (for the audit)."""
        reason = self._peer_refusal(creds)
        if reason is not None:
            _audit.warning(
                "workload socket: CUT %s of pid=%d uid=%d gid=%d after %d bytes: %s",
                what,
                creds.pid,
                creds.uid,
                creds.gid,
                done,
                reason,
            )
            raise _Abort(grpc.StatusCode.PERMISSION_DENIED, _DENIED)

    def _gate_credentials(self, peer: str) -> PeerCredentials | None:
        gate = self._gate
        return None if gate is None else gate.credentials_for(peer)

    def _plaintext_size(self, name: str) -> int | None:
        with self._sizes_lock:
            if name in self._sizes:
                return self._sizes[name]
        source = self._sources[name]
        size: int | None = None
        stream_size = source.size
        if stream_size is not None:
            try:
                with source.open() as f:
                    size = plaintext_size(read_header(f), stream_size)
            except (DataPlaneError, SealingError, OSError):
                size = None
        with self._sizes_lock:
            self._sizes[name] = size
        return size

    def _open_input(self, name: str) -> tuple[InputSpec, Any, OpenReader]:
        """Opens an input for streaming: (spec, ciphertext file, authenticated reader).

        The caller closes the reader and the file.

        Raises:
            CallRefusedError: NOT_FOUND, FAILED_PRECONDITION (key ring, storage) or DATA_LOSS
                (the header does not authenticate).
        """
        spec = self._inputs.get(name)
        if spec is None:
            raise _Abort(
                grpc.StatusCode.NOT_FOUND, f"no input named {name!r}; ListInputs names the inputs"
            )
        try:
            self._keyring.check()
            f = self._sources[name].open()
        except KeyRingError as e:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"input {name!r}: {e}") from e
        except InputSourceError as e:
            # Not UNAVAILABLE: to a client that status means "the sidecar is unreachable".
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from e
        try:
            reader = self._open_reader(spec, f)
        except BaseException as e:
            f.close()
            if isinstance(e, KeyRingError):
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"input {name!r}: {e}") from e
            if isinstance(e, InputAuthenticationError):
                _log.warning("input %r refused: %s", name, e)
                raise _Abort(grpc.StatusCode.DATA_LOSS, str(e)) from e
            if isinstance(e, OSError):
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION, f"input {name!r}: cannot read: {e}"
                ) from e
            raise
        return spec, f, reader

    def _stream_input(self, name: str, creds: PeerCredentials) -> Iterator[bytes]:
        """Yields serialised ReadInputResponse messages; raises _Abort to end with a status."""
        spec, f, reader = self._open_input(name)
        sent = 0
        with f:
            watch = self._watch_peer(creds)
            try:
                with reader:
                    for frame, n in self._frames(reader, name, spec.key_id):
                        # Before every chunk, not only at the call: a reader that left the
                        # workload's tree while its stream is open (re-parented after the
                        # workload exited, or double-forked away) gets no more plaintext.
                        if watch is None or not watch.intact():
                            self._recheck_peer(creds, f"ReadInput of {name!r}", sent)
                        sent += n
                        yield frame
            finally:
                if watch is not None:
                    watch.close()
        _log.info("input %r served to pid %d: %d bytes, authenticated", name, creds.pid, sent)

    def _open_reader(self, spec: InputSpec, f: Any) -> OpenReader:
        """Reads and authenticates the header with the spec's key.

        Raises:
            InputAuthenticationError: not a sealed stream, another key id, or authentication failed.
            KeyRingError: the key is not available.
            OSError: reading failed.
        """
        try:
            header = read_header(f)
        except SealingError as e:
            raise InputAuthenticationError(
                f"input {spec.name!r} is not a valid sealed stream: {e}"
            ) from e
        if header.key_id != spec.key_id:
            # Storage could swap in another party's stream; it must be the registered one.
            raise InputAuthenticationError(
                f"input {spec.name!r} is sealed under key id {header.key_id!r}, "
                f"not its registered key id {spec.key_id!r}"
            )
        with self._keyring.borrow(spec.key_id) as key:
            try:
                # The envelope accepts any bytes-like key (it copies it); passing the borrowed
                # buffer avoids one more copy that nobody could wipe.
                return OpenReader(f, data_key=cast(bytes, key), header=header)
            except SealingError as e:
                raise InputAuthenticationError(
                    f"input {spec.name!r} failed authentication: {e}"
                ) from e

    def _frames(self, reader: OpenReader, name: str, key_id: str) -> Iterator[tuple[bytes, int]]:
        """Yields (serialised ReadInputResponse, plaintext bytes in it).

        Each chunk is decrypted straight into a buffer that leaves room for the protobuf field
        prefix in front, so a message costs one copy (into the bytes object gRPC sends).
        """
        chunk = self._config.chunk_size
        buf = bytearray(MAX_PREFIX + chunk + len(END_OF_INPUT))
        view = memoryview(buf)
        body = view[MAX_PREFIX : MAX_PREFIX + chunk]
        try:
            while True:
                try:
                    # Between chunks, not only at the start: an attestation that lapses during
                    # a long stream stops the plaintext until it is renewed, and a renewal
                    # that no longer releases this input's key stops it for good (the reader
                    # holds its own copy of the key, so dropping it from the ring is not
                    # enough).
                    self._keyring.check_key(key_id)
                except KeyRingError as e:
                    raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"input {name!r}: {e}") from e
                try:
                    n = reader.readinto(body)
                except SealingError as e:
                    _log.warning("input %r failed authentication: %s", name, e)
                    raise _Abort(
                        grpc.StatusCode.DATA_LOSS,
                        f"input {name!r} failed authentication after {reader.plaintext_read} "
                        f"bytes: {e}; discard what was read",
                    ) from e
                except OSError as e:
                    raise _Abort(
                        grpc.StatusCode.FAILED_PRECONDITION, f"input {name!r}: cannot read: {e}"
                    ) from e
                # readinto() fills the buffer except at the end, and reaches the end only
                # after the final segment authenticated with nothing after it.
                last = n < chunk
                if n == 0:
                    yield END_OF_INPUT, 0
                    return
                prefix = read_chunk_prefix(n)
                start = MAX_PREFIX - len(prefix)
                buf[start:MAX_PREFIX] = prefix
                end = MAX_PREFIX + n
                if last:
                    buf[end : end + len(END_OF_INPUT)] = END_OF_INPUT
                    end += len(END_OF_INPUT)
                yield bytes(view[start:end]), n
                if last:
                    return
        finally:
            view.release()
            body.release()
            buf[:] = bytes(len(buf))

    def _receive_output(
        self,
        request_iterator: Iterator[bytes],
        context: grpc.ServicerContext,
        creds: PeerCredentials,
    ) -> workload_pb2.WriteOutputResponse:
        """Seals one output from the request stream; raises _Abort to end with a status."""
        requests: Iterator[bytes] = iter(request_iterator)
        try:
            first = next(requests, None)
        except grpc.RpcError:
            raise _Abort(grpc.StatusCode.CANCELLED, "the workload cancelled the output") from None
        if first is None:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "empty WriteOutput stream")
        try:
            name, _ = decode_write_request(first)
        except WireError as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        if name is None:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first WriteOutput message must be the name"
            )
        if not context.is_active():
            # Cancelled before we got here: do not even start a temporary file.
            raise _Abort(grpc.StatusCode.CANCELLED, f"output {name!r}: call cancelled")
        writer = self._begin_output(name)
        committed = False
        try:
            # Unlike a read, an output is not re-checked per chunk: what a writer hands in is
            # sealed to the approved recipients only, and the processes the workload leaves
            # behind may finish their outputs during the grace period after it exited.
            self._copy_output(name, requests, writer)
            if not context.is_active():
                raise _Abort(grpc.StatusCode.CANCELLED, f"output {name!r}: call cancelled")
            receipt = self._commit_output(name, writer)
            committed = True
        finally:
            if not committed:
                writer.abort()
        _log.info("output %r from pid %d committed", name, creds.pid)
        return workload_pb2.WriteOutputResponse(
            name=receipt.name,
            plaintext_bytes=receipt.plaintext_bytes,
            recipients=list(receipt.recipients),
        )

    def _begin_output(self, name: str) -> OutputWriter:
        """Opens the output ``name`` once the attestation holds.

        Raises:
            CallRefusedError: FAILED_PRECONDITION (attestation), INVALID_ARGUMENT (name),
                ALREADY_EXISTS or INTERNAL.
        """
        # Outputs are accepted only while the attestation that started the session holds (or
        # is renewed now): after a lapse whose renewal failed (AK revoked, approval withdrawn,
        # broker gone) the sidecar no longer vouches for what the workload produces.
        self._check_attestation(name, "is not accepted")
        try:
            return self._outputs.open_output(name, recipients=self._recipients)
        except OutputNameError as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        except OutputExistsError as e:
            raise _Abort(grpc.StatusCode.ALREADY_EXISTS, str(e)) from e
        except WorkloadOutputError as e:
            raise _Abort(grpc.StatusCode.INTERNAL, str(e)) from e

    def _commit_output(self, name: str, writer: OutputWriter) -> OutputReceipt:
        """Commits a complete output once the attestation still holds (the caller aborts the
        writer when this raises).

        Raises:
            CallRefusedError: FAILED_PRECONDITION (attestation), ALREADY_EXISTS or INTERNAL.
        """
        # Once more before committing: an output written while the attestation lapsed and
        # could not be renewed is discarded, like one started after that point.
        self._check_attestation(name, "was discarded")
        try:
            return writer.commit()
        except OutputExistsError as e:
            raise _Abort(grpc.StatusCode.ALREADY_EXISTS, str(e)) from e
        except WorkloadOutputError as e:
            raise _Abort(grpc.StatusCode.INTERNAL, str(e)) from e

    def _check_attestation(self, name: str, outcome: str) -> None:
        """Raises _Abort(FAILED_PRECONDITION) unless the key ring's attestation holds (after
        re-attesting, if it lapsed)."""
        try:
            self._keyring.check()
        except KeyRingError as e:
            _log.warning("output %r %s: %s", name, outcome, e)
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"output {name!r} {outcome}: the sidecar's attestation is no longer valid: {e}",
            ) from e

    @staticmethod
    def _copy_output(name: str, requests: Iterable[bytes], writer: OutputWriter) -> None:
        """Feeds chunks to ``writer`` until the closing name message.

        Raises:
            _Abort: protocol error, cancellation, or the stream ended without the closing name.
        """
        closed = False
        try:
            for raw in requests:
                if closed:
                    raise _Abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"output {name!r}: data after the closing name message",
                    )
                try:
                    part_name, chunk = decode_write_request(raw)
                except WireError as e:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
                if chunk is not None:
                    try:
                        writer.write(chunk)
                    except WorkloadOutputError as e:
                        raise _Abort(grpc.StatusCode.INTERNAL, str(e)) from e
                elif part_name == name:
                    closed = True
                else:
                    raise _Abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"output {name!r}: a WriteOutput message after the first must be a "
                        "chunk or the closing name",
                    )
        except grpc.RpcError:
            raise _Abort(
                grpc.StatusCode.CANCELLED, f"output {name!r}: the workload cancelled it"
            ) from None
        if not closed:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"output {name!r}: the stream ended without repeating the name as its last "
                "message, so it is not known to be complete; discarded",
            )

"""``cleanroom sidecar run``: attest, then run the workload with its inputs over a local socket.

:func:`run_workload` does, in order:

1. checks what it can without the TPM or the broker (the command, the workload directory, the
   length of the workload socket's path, the input files, the sidecar's certificate, and that
   the output directory can be written and holds no outputs unless ``[outputs] replace``; an
   Azure Blob output prefix is checked the same way once the blob store is set up, before the
   broker is asked for a nonce), so that a typo fails in milliseconds and a run that could not
   write its outputs never attests; opens the executable and digests it through that
   descriptor (the launch, :func:`prepare_launch`);
2. asks the broker for a challenge in the background if this AK is known to be enrolled (the
   TLS handshake and the round trip overlap the TPM work below), and forks the workload's
   process into its containment, held before ``exec`` until step 6 releases it (a failure
   before then makes it exit without executing anything);
3. opens the TPM once and loads the persistent AK (creating it on first use); enrolls it by
   credential activation when the state directory has no record of the enrollment, or when the
   broker answers "not enrolled";
4. measures the workload's files into PCR 23 (reset first), then the launch event (argv,
   executable and its digest, environment, working directory), with an event log;
5. quotes PCR 23 (and what the challenge names) bound to the nonce, a fresh ephemeral HPKE key
   and the sidecar's TLS certificate, and attests; opens the released keys into a key ring that
   expires with the attestation and re-attests on demand;
6. starts the workload socket, then releases exactly the measured launch: the executable
   through the descriptor it was digested from, the measured argv, in the workload root, with
   the measured environment plus ``CLEANROOM_WORKLOAD_SOCKET`` and nothing inherited; in its
   own process group and contained (a cgroup of its own, else the sidecar as a child subreaper; see
   :mod:`sidecar.run.containment`), forwarding SIGTERM/SIGINT/SIGHUP to it;
7. when the workload exits: lets outputs still being written finish for ``grace_seconds``
   (discarding incomplete ones), kills every process the workload left running, ends the
   broker session(s) with the exit status and the output names, wipes the keys, and returns
   the workload's exit status.

Any failure before step 6 raises (one line, no workload code started); see
:mod:`sidecar.run.errors`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from broker.client import BrokerClient, BrokerClientError, ClientSetupError
from cleanroom.v1 import attestation_pb2
from evidence.errors import LaunchError, MeasurementError
from evidence.launch import Launch, check_command, digest_fd
from evidence.proto import event_log_to_pb
from sidecar.dataplane import (
    InputSpec,
    KeyRing,
    LocalDirectoryOutput,
    OutputReceipt,
    OutputSink,
    OutputWriter,
    ProcessTree,
    Recipient,
    WorkloadServer,
)
from sidecar.dataplane.errors import SocketSetupError
from sidecar.dataplane.gate import check_private_ancestry, check_socket_path
from sidecar.dataplane.inputs import LocalFileInput, input_source_for
from sidecar.dataplane.server import SOCKET_ENV
from sidecar.run.attest import Attestation, Attester, broker_error, enroll, is_not_enrolled
from sidecar.run.errors import (
    AttestationDeniedError,
    KeyNotReleasedError,
    RunSetupError,
)
from sidecar.run.preflight import (
    check_blob_outputs,
    check_output_directory,
    check_workload_tree,
)
from sidecar.run.state import load_enrollment, save_enrollment
from sidecar.run.supervisor import WorkloadProcess, start_daemon_thread
from sidecar.runconfig import RunConfig, is_blob_url

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

    from blobstore.store import BlobStore
    from sidecar.config import TpmConfig
    from sidecar.snp import SnpCollector
    from sidecar.tpm.interface import TpmDevice

#: Opens the TPM from its configuration; the result is entered as a context manager.
TpmFactory: TypeAlias = "Callable[[TpmConfig], AbstractContextManager[TpmDevice]]"

__all__ = [
    "NOT_STARTED_EXIT_CODE",
    "PreparedLaunch",
    "RunResult",
    "prepare_launch",
    "run_workload",
    "workload_environment",
]

_log = logging.getLogger(__name__)

#: The exit code reported to the broker (EndSession) when the workload never started.
NOT_STARTED_EXIT_CODE = -1

# prctl(2) option that makes a process non-dumpable: no core dumps and no ptrace or
# /proc/<pid>/mem access by other processes of the same user (the workload included).
_PR_SET_DUMPABLE = 4


@dataclass(frozen=True)
class RunResult:
    """What a run did (for callers that embed the runtime rather than use the CLI)."""

    exit_code: int
    session_ids: tuple[str, ...]
    outputs: tuple[str, ...]


def workload_environment(
    approved: Mapping[str, str], socket_env: Mapping[str, str]
) -> dict[str, str]:
    """The workload's complete environment: the measured (approved) one plus the socket
    variable. Nothing comes from the sidecar's own environment: whoever starts the sidecar
    chooses that (``PYTHONPATH``, ``LD_PRELOAD``, ``CLEANROOM_ADMIN_*``...), and none of it
    was approved."""
    env = dict(approved)
    env.update(socket_env)
    return env


@dataclass
class PreparedLaunch:
    """The launch to measure and run, and the open executable it was digested from.

    ``fd`` stays open until the workload starts: the workload is executed through it, so the
    file that was digested is the file that runs, whatever happens to its path meanwhile.
    ``fd`` is None when ``/proc/self/fd`` is not available (the path is executed then).
    """

    launch: Launch
    fd: int | None

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def prepare_launch(config: RunConfig, command: Sequence[str]) -> PreparedLaunch:
    """The launch of ``[workload] command`` (or ``command`` when the config has none) with
    ``[workload] env`` in the workload root; opens and digests the executable.

    Raises:
        RunSetupError: no command, a command that differs from ``[workload] command``, a first
            word that is not an absolute path, or an executable that cannot be opened, is not
            a regular executable file, or a malformed environment.
    """
    configured = tuple(config.workload.command)
    given = tuple(command)
    if configured and given and given != configured:
        raise RunSetupError(
            f"the command after '--' ({shlex.join(given)}) is not [workload] command "
            f"({shlex.join(configured)}): the sidecar runs only the configured command, which "
            "is what the parties approved; nothing was attested"
        )
    argv = configured or given
    if not argv:
        raise RunSetupError(
            "no workload command: set [workload] command in the config (or give it after '--')"
        )
    try:
        check_command(argv)
    except LaunchError as e:
        raise RunSetupError(f"workload command: {e}") from e
    program = argv[0]
    try:
        fd = os.open(program, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise RunSetupError(
            f"workload command {program!r} cannot be opened: {e.strerror or e}"
        ) from e
    try:
        if not os.access(program, os.X_OK):
            raise RunSetupError(f"workload command {program!r} is not executable")
        try:
            digest = digest_fd(fd, program)
        except MeasurementError as e:
            raise RunSetupError(str(e)) from e
        try:
            launch = Launch.create(
                argv=argv,
                executable_sha256=digest,
                env=config.workload.env,
                cwd=os.path.abspath(config.workload_root),
            )
        except LaunchError as e:
            raise RunSetupError(f"[workload] {e}") from e
    except BaseException:
        os.close(fd)
        raise
    if not os.path.isdir("/proc/self/fd"):
        # Without /proc the path is executed again: the window between digest and exec is
        # then the residual one docs/sidecar-run.md describes.
        os.close(fd)
        return PreparedLaunch(launch=launch, fd=None)
    return PreparedLaunch(launch=launch, fd=fd)


def _process_age() -> float | None:
    """Seconds since this process started (10 ms resolution), or None when unknown."""
    try:
        with open("/proc/self/stat", "rb") as f:
            # The command name (field 2) may hold spaces; the fields after it are fixed.
            fields = f.read().rsplit(b")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class _Timeline:
    """Start-up milestones for the -v log (where the time to first byte goes), in ms since the
    process started (Python's own start-up and imports included)."""

    def __init__(self) -> None:
        age = _process_age()
        self._t0 = time.perf_counter() - (age or 0.0)
        self._marks: list[tuple[str, float]] = []
        if age is not None:
            self.mark("runtime imported")

    def mark(self, what: str) -> None:
        self._marks.append((what, time.perf_counter() - self._t0))

    def summary(self) -> str:
        # CPU time too: on a busy machine the wall-clock figures mostly measure the wait for a
        # core, the CPU time what start-up itself costs.
        marks = ", ".join(f"{what} {t * 1000:.0f} ms" for what, t in self._marks)
        return f"{marks} (cpu {time.process_time() * 1000:.0f} ms)"


def _disable_dumps() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            _log.debug("prctl(PR_SET_DUMPABLE) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as e:
        _log.debug("cannot make the sidecar non-dumpable: %s", e)


# --- checks before anything starts -------------------------------------------------------------


#: The prefix of the fresh socket directory made when ``[runtime] socket_dir`` is empty;
#: :func:`tempfile.mkdtemp` appends eight random characters.
_SOCKET_DIR_PREFIX = "cleanroom-sidecar-"
_MKDTEMP_SUFFIX_LENGTH = 8


def _default_socket_parent() -> Path:
    """Where the fresh socket directory goes: ``$XDG_RUNTIME_DIR`` when it is usable, else the
    system's temporary directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK):
        return Path(runtime)
    return Path(tempfile.gettempdir())


def _check_socket_path(config: RunConfig) -> None:
    """Checks that the workload socket's path will fit in a Unix socket address and that no
    other user can replace its directory (see :func:`check_private_ancestry`), so that both
    fail before the TPM and the broker are used, not after attestation."""
    name = config.dataplane.socket_name
    configured = config.runtime.socket_dir
    if configured:
        try:
            check_socket_path(Path(configured).absolute() / name)
            check_private_ancestry(Path(configured))
        except SocketSetupError as e:
            raise RunSetupError(f"[runtime] socket_dir: {e}") from e
        return
    parent = _default_socket_parent()
    try:
        check_private_ancestry(parent)
    except SocketSetupError as e:
        raise RunSetupError(
            f"the workload socket's directory would be under {parent}: {e}; "
            "set [runtime] socket_dir"
        ) from e
    fresh = parent / (_SOCKET_DIR_PREFIX + "X" * _MKDTEMP_SUFFIX_LENGTH)
    try:
        check_socket_path(fresh.absolute() / name)
    except SocketSetupError as e:
        raise RunSetupError(
            f"the workload socket would be {fresh / name} (a fresh directory under {parent}), "
            "too long for a Unix socket path; set [runtime] socket_dir to a shorter directory"
        ) from e


def _preflight(config: RunConfig) -> bytes:
    """Checks the workload directory, the socket path, the local inputs and the local output
    directory; returns the sidecar's certificate (DER), which the quote binds. (The command is
    checked by :func:`prepare_launch` before.)"""
    root = config.workload_root
    if not root.is_dir():
        raise RunSetupError(f"workload root {root} is not a directory")
    check_workload_tree(root, config.workload.measured_names())
    _check_socket_path(config)
    for item in config.inputs:
        if is_blob_url(item.url):
            continue  # checked when it is read; the blob store is not set up yet
        spec = InputSpec(name=item.name, url=item.url, key_id=item.key_id)
        source = input_source_for(spec)
        if isinstance(source, LocalFileInput) and not source.path.exists():
            raise RunSetupError(f"input {item.name!r}: {source.path} does not exist")
    if not is_blob_url(config.outputs.directory):
        # Before any nonce is asked for: a run that cannot write its outputs must not attest.
        # (Blob outputs are checked once the blob store is set up, still before that.)
        check_output_directory(Path(config.outputs.directory), replace=config.outputs.replace)
    from cryptography.hazmat.primitives.serialization import Encoding

    from pki.errors import PKIError
    from pki.tls import load_certificates

    try:
        return load_certificates(config.broker.cert_file)[0].public_bytes(Encoding.DER)
    except (PKIError, IndexError) as e:
        raise RunSetupError(f"sidecar certificate {config.broker.cert_file}: {e}") from e


# --- outputs -----------------------------------------------------------------------------------


class _RecordingSink:
    """An output sink that remembers the outputs committed (for EndSession)."""

    def __init__(self, inner: OutputSink) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self._receipts: list[OutputReceipt] = []

    def open_output(self, name: str, *, recipients: Sequence[Recipient]) -> OutputWriter:
        return _RecordingWriter(self, self._inner.open_output(name, recipients=recipients))

    def _record(self, receipt: OutputReceipt) -> None:
        with self._lock:
            self._receipts.append(receipt)

    @property
    def receipts(self) -> tuple[OutputReceipt, ...]:
        with self._lock:
            return tuple(self._receipts)


class _RecordingWriter:
    def __init__(self, sink: _RecordingSink, inner: OutputWriter) -> None:
        self._sink = sink
        self._inner = inner

    @property
    def name(self) -> str:
        return self._inner.name

    def write(self, data: ReadableBuffer) -> None:
        self._inner.write(data)

    def commit(self) -> OutputReceipt:
        receipt = self._inner.commit()
        self._sink._record(receipt)
        return receipt

    def abort(self) -> None:
        self._inner.abort()


# --- the run -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _socket_directory(configured: str) -> Iterator[Path]:
    """The workload socket's directory: the configured one, or a fresh private one."""
    if configured:
        path = Path(configured)
        try:
            # Missing levels above it are created here, private, rather than with the umask's
            # mode by the server (which creates the directory itself, and removes it at the
            # end); then the whole path is checked again (it may have changed since the check
            # before attesting).
            for level in reversed(path.parents):
                if not level.exists():
                    os.mkdir(level, 0o700)
            check_private_ancestry(path)
        except SocketSetupError as e:
            raise RunSetupError(f"[runtime] socket_dir: {e}") from e
        except OSError as e:
            raise RunSetupError(f"[runtime] socket_dir: cannot create {path}: {e}") from e
        yield path
        return
    try:
        path = Path(tempfile.mkdtemp(prefix=_SOCKET_DIR_PREFIX, dir=_default_socket_parent()))
    except OSError as e:
        raise RunSetupError(f"cannot create the workload socket directory: {e}") from e
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _connect(config: RunConfig) -> BrokerClient:
    b = config.broker
    try:
        return BrokerClient.connect(
            target=b.target,
            cert_file=b.cert_file,
            key_file=b.key_file,
            ca_file=b.ca_file,
            server_name=b.server_name or None,
            timeout=b.timeout_seconds,
            retries=b.retries,
        )
    except ClientSetupError as e:
        raise RunSetupError(f"cannot set up the broker connection: {e}") from e


def _prefetch(
    fetch: Callable[[], attestation_pb2.GetChallengeResponse],
) -> Future[attestation_pb2.GetChallengeResponse]:
    """Runs ``fetch`` in a daemon thread; the future holds its result or exception."""
    future: Future[attestation_pb2.GetChallengeResponse] = Future()

    def work() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fetch())
        except BaseException as e:
            future.set_exception(e)

    # Not threading.Thread: its start() waits until the thread runs (see start_daemon_thread).
    start_daemon_thread(work)
    return future


def run_workload(
    config: RunConfig, command: Sequence[str], *, tpm_factory: TpmFactory | None = None
) -> RunResult:
    """Attests and runs the workload; returns its exit status and the session.

    ``tpm_factory`` opens the TPM from ``[tpm]`` (default: :class:`sidecar.tpm.Tpm`, the real
    TPM through its TCTI); another :class:`sidecar.tpm.interface.TpmDevice` may be injected,
    as tests do with a software TPM.

    The workload is ``[workload] command``; ``command`` (what followed ``--``) must equal it
    when both are given, and is the command when the config has none. Either way it is
    measured as the launch event and executed exactly as measured.

    Raises:
        RunSetupError: no command, a command other than ``[workload] command``, a command
            that is not an absolute path to an executable file, the workload directory, an
            input file or the certificate cannot be used, or the workload socket's path would
            be too long.
        TpmUnavailableError: the TPM cannot be reached (other TpmError: it failed).
        MeasurementError: a workload file cannot be measured.
        BrokerUnreachableError: the broker cannot be reached after the retries.
        EnrollmentFailedError: enrolling the AK failed.
        AttestationDeniedError: the broker refused the challenge or the attestation.
        KeyNotReleasedError: a required input's key was withheld.
        WorkloadStartError: the command could not be executed.
        RunInterruptedError: SIGTERM or SIGHUP before the workload started (SIGINT raises
            KeyboardInterrupt).
        DataPlaneError: the workload socket or the output directory cannot be set up.
    """
    timeline = _Timeline()
    prepared = prepare_launch(config, command)
    try:
        cert_der = _preflight(config)
        timeline.mark("checked")
        _disable_dumps()
        # The signal handlers go in first, so that SIGTERM during attestation unwinds cleanly
        # (flushing TPM objects) instead of killing the sidecar in the middle of a TPM command.
        with (
            WorkloadProcess(
                prepared.launch.argv,
                cwd=prepared.launch.cwd,
                grace_seconds=config.runtime.grace_seconds,
                executable_fd=prepared.fd,
            ) as process,
            contextlib.ExitStack() as stack,
        ):
            client = stack.enter_context(_connect(config))
            timeline.mark("connected")
            return _run(config, client, process, stack, cert_der, timeline, prepared, tpm_factory)
    finally:
        prepared.close()


def _run(
    config: RunConfig,
    client: BrokerClient,
    process: WorkloadProcess,
    stack: contextlib.ExitStack,
    cert_der: bytes,
    timeline: _Timeline,
    prepared: PreparedLaunch,
    tpm_factory: TpmFactory | None,
) -> RunResult:
    # The workload's cgroup and watchdog are set up while the TPM and the broker work.
    process.prepare()
    timeline.mark("contained")
    target = config.broker.target
    record = load_enrollment(config.runtime.state_dir)
    known = record.ak_name if record is not None and record.matches(broker=target) else None
    blob_outputs = is_blob_url(config.outputs.directory)
    output_sink = None
    if blob_outputs:
        # Blob outputs are checked before any nonce is asked for, so the blob store is set up
        # first; a local directory was checked in the preflight.
        from sidecar.dataplane.blob import BlobOutputSink

        output_sink = _output_sink(config, _blob_store(config, stack))
        assert isinstance(output_sink, BlobOutputSink)
        check_blob_outputs(output_sink, config.outputs.directory, replace=config.outputs.replace)
    challenge_future = _prefetch(lambda: client.get_challenge(known)) if known else None
    # The workload's environment is the measured one plus the socket, whose fresh directory is
    # therefore made now (the workload's process is forked below, before the socket serves).
    socket_dir = stack.enter_context(_socket_directory(config.runtime.socket_dir))
    socket_env = {SOCKET_ENV: os.fspath(socket_dir.absolute() / config.dataplane.socket_name)}

    # Imported only now, so that loading tpm2-pytss (and the Azure SDK, when only inputs are
    # blobs) overlaps the TLS handshake and the challenge round trip running in the background.
    if output_sink is None:
        output_sink = _output_sink(config, _blob_store(config, stack))
    if tpm_factory is None:
        from sidecar.tpm import Tpm

        tpm_factory = Tpm
    timeline.mark("TPM imported")
    # The workload's process is forked into its cgroup now and held before exec until the keys
    # are released (see sidecar.run.supervisor), so that forking and the cgroup move (the
    # kernel's RCU grace period) happen while the TPM and the broker work. Not earlier: until
    # it executes, the child shares the sidecar's memory copy-on-write, and importing
    # tpm2-pytss meanwhile cost 10 ms more CPU in page copies.
    process.prespawn(workload_environment(prepared.launch.environment, socket_env))
    timeline.mark("pre-spawned")
    tpm = stack.enter_context(tpm_factory(config.tpm))
    ak = tpm.create_or_load_ak()
    timeline.mark("AK loaded")
    ak_name = ak.name_hex
    enrolled_now = False
    if known != ak_name:
        if known is not None:
            _log.info("the recorded AK %s is not the TPM's AK %s; enrolling again", known, ak_name)
        challenge_future = None
        ak_name = enroll(tpm, client, ak, snp=_snp(config), certificate_der=cert_der)
        save_enrollment(config.runtime.state_dir, ak_name=ak_name, broker=target)
        enrolled_now = True
        timeline.mark("enrolled")

    measurement = tpm.measure(
        config.workload_files(), config.workload.measured_names(), launch=prepared.launch
    )
    timeline.mark("measured")
    launch = prepared.launch
    # Variable names only: a value may be something the parties approved but not for logs.
    _log.info(
        "measured %d file(s) and the launch: %s (sha256 %s), environment %s, in %s",
        len(config.workload.files),
        launch.command_line(),
        launch.executable_sha256.hex(),
        ", ".join(name for name, _ in launch.env) or "(empty)",
        launch.cwd,
    )

    attester = Attester(
        tpm=tpm,
        client=client,
        ak_name=ak_name,
        event_log=event_log_to_pb(measurement.events),
        certificate_der=cert_der,
        banks=config.tpm.banks,
        pcrs=config.tpm.quoted_pcrs,
        key_ids=config.key_ids(),
        snp=_snp(config),
    )
    challenge = _challenge(attester, challenge_future, target)
    if challenge is None:
        # The broker does not know the recorded AK (its database was reset, or the record is
        # stale): enroll once more, then ask again.
        if enrolled_now:
            raise AttestationDeniedError(
                f"the broker at {target} says AK {ak_name} is not enrolled right after enrolling it"
            )
        ak_name = enroll(tpm, client, ak, snp=_snp(config), certificate_der=cert_der)
        save_enrollment(config.runtime.state_dir, ak_name=ak_name, broker=target)
        timeline.mark("enrolled")
        challenge = _challenge(attester, None, target)
        if challenge is None:
            raise AttestationDeniedError(f"the broker at {target} does not accept AK {ak_name}")
    timeline.mark("challenge")

    keyring = stack.enter_context(
        KeyRing(valid_until=None, reattest=lambda: attester.reattest(keyring))
    )

    def end_sessions(exit_code: int, outputs: Sequence[str]) -> None:
        for session_id in attester.session_ids:
            try:
                client.end_session(session_id, workload_exit_code=exit_code, outputs=outputs)
            except BrokerClientError as e:
                _log.warning(
                    "could not end session %s: %s",
                    session_id,
                    broker_error(e, target=target, doing="ending the session"),
                )

    started = False
    try:
        attestation = attester.attest(keyring, challenge=challenge)
        timeline.mark("attested")
        specs = _input_specs(config, attestation)
        if not attestation.recipients:
            raise AttestationDeniedError("the broker named no recipients for the outputs")
        sink = _RecordingSink(output_sink)
        tree = ProcessTree()
        server = WorkloadServer(
            socket_dir=socket_dir,
            inputs=specs,
            keyring=keyring,
            outputs=sink,
            recipients=attestation.recipients,
            allowed_peer=tree,
            config=config.dataplane,
        )
        server.start()
        timeline.mark("socket")
        try:
            pid = process.start(
                workload_environment(prepared.launch.environment, server.environment())
            )
            started = True
            # The workload holds its own descriptor of the executable now.
            prepared.close()
            tree.set_root(pid)
            timeline.mark("workload started")
            _log.info("start-up: %s", timeline.summary())
            exit_code = process.wait()
            _log.info("workload exited with status %d", exit_code)
        finally:
            # Outputs still streaming get the grace period; incomplete ones are discarded.
            server.stop(grace=config.runtime.grace_seconds)
            if started:
                process.terminate_leftovers()
    except BaseException:
        if not started:
            end_sessions(NOT_STARTED_EXIT_CODE, ())
        raise
    outputs = tuple(r.name for r in sink.receipts)
    end_sessions(exit_code, outputs)
    return RunResult(exit_code=exit_code, session_ids=attester.session_ids, outputs=outputs)


def _snp(config: RunConfig) -> SnpCollector | None:
    """The SEV-SNP evidence collector ``[tpm] azure_snp`` asks for, or None. Imported only then:
    it loads ``urllib.request`` (about 7 ms of a start-up that has no use for it otherwise)."""
    if not config.tpm.azure_snp:
        return None
    from sidecar.snp import snp_collector

    return snp_collector(config.tpm)


def _blob_store(config: RunConfig, stack: contextlib.ExitStack) -> BlobStore | None:
    """The blob store, when an input or the outputs are in Azure Blob; registers the blob
    input schemes.

    Raises:
        ConfigError: the ``[blob]`` table or a ``CLEANROOM_BLOB_*`` variable is invalid.
        RunSetupError: the blob input schemes are registered already in this process.
    """
    if not config.uses_blob:
        return None
    from blobstore.config import load_blob_config
    from blobstore.store import BlobStore
    from sidecar.dataplane.blob import register_blob_inputs

    store = stack.enter_context(BlobStore(config=load_blob_config(config.source or None)))
    if any(is_blob_url(i.url) for i in config.inputs):
        try:
            register_blob_inputs(store)
        except ValueError as e:
            raise RunSetupError(f"cannot serve blob inputs: {e}") from e
    return store


def _output_sink(config: RunConfig, store: BlobStore | None) -> OutputSink:
    """Where outputs go: the local directory, or the blob container of ``[outputs] directory``.

    Raises:
        OutputStoreError: the directory cannot be created, or the URL is not a container.
    """
    if is_blob_url(config.outputs.directory):
        from sidecar.dataplane.blob import BlobOutputSink

        assert store is not None
        return BlobOutputSink(config.outputs.directory, store=store, replace=config.outputs.replace)
    return LocalDirectoryOutput(config.outputs.directory, replace=config.outputs.replace)


def _input_specs(config: RunConfig, attestation: Attestation) -> list[InputSpec]:
    """The inputs whose keys were released, with their owners.

    Raises:
        KeyNotReleasedError: a required input's key was withheld.
    """
    specs: list[InputSpec] = []
    for item in config.inputs:
        owner = attestation.owners.get(item.key_id)
        if owner is None:
            # Only what the broker said: its coarse reason and the audit record of the key.
            said = attestation.withheld.get(item.key_id, "the broker gave no reason")
            if item.required:
                raise KeyNotReleasedError(
                    f"the broker withheld data key {item.key_id!r} of required input "
                    f"{item.name!r} ({said}); the workload was not started"
                )
            _log.warning(
                "input %r left out: its key %r was withheld (%s)", item.name, item.key_id, said
            )
            continue
        specs.append(InputSpec(name=item.name, url=item.url, key_id=item.key_id, owner_party=owner))
    return specs


def _challenge(
    attester: Attester,
    prefetched: Future[attestation_pb2.GetChallengeResponse] | None,
    target: str,
) -> attestation_pb2.GetChallengeResponse | None:
    """The challenge (prefetched or asked for now), or None when the AK is not enrolled."""
    try:
        return prefetched.result() if prefetched is not None else attester.challenge()
    except BrokerClientError as e:
        if is_not_enrolled(e):
            return None
        raise broker_error(e, target=target, doing="a challenge") from e

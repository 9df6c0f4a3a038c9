"""The launch event: what the sidecar executes, measured into PCR 23 after the workload's files.

The sidecar extends PCR 23 with one launch event after the files and before the quote. The
event describes the exact process the sidecar then starts: its argument vector, the absolute
path of the executable, the executable's SHA-256, its complete environment and its working
directory. Its digest in a bank is that bank's hash over :func:`encode_launch`'s canonical
bytes (docs/measurement.md describes them byte by byte), so a party computes the same PCR 23
offline from the launch it approves, and the broker recomputes the event's digests from the
launch the event log reports, which binds every field of it into the quoted PCR.

This module is the one home of the format: the sidecar, the broker and the admin CLI use it.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from evidence.errors import EventLogError, LaunchError, MeasurementError

__all__ = [
    "LAUNCH_LABEL",
    "MAX_LAUNCH_BYTES",
    "RESERVED_VARIABLES",
    "Launch",
    "digest_executable",
    "encode_launch",
    "launch_difference",
    "launch_digests",
    "parse_command",
    "parse_env_assignments",
]

#: The domain label the encoding starts with: a launch encoding can never be mistaken for a
#: file's contents hashed for another purpose, and a future format gets another label.
LAUNCH_LABEL = b"cleanroom launch v1\x00"

#: The largest encoding accepted (argv and environment together). The kernel's own limit on
#: argv plus environment is a quarter of the stack limit, 2 MiB by default; a launch that a
#: party approves is far smaller.
MAX_LAUNCH_BYTES = 256 * 1024

#: Variables the sidecar sets itself; an approved environment must not name them.
RESERVED_VARIABLES = frozenset({"CLEANROOM_WORKLOAD_SOCKET"})

_SHA256_SIZE = 32
_U32 = struct.Struct(">I")
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Launch:
    """One launch: the process the sidecar starts, as measured and as approved.

    Attributes:
        argv: the argument vector, ``argv[0]`` included (the executable's path).
        executable: the absolute path the sidecar executes (no PATH lookup).
        executable_sha256: SHA-256 of the executable's contents (the file the path names,
            symbolic links followed).
        env: the complete environment, as (name, value) pairs sorted by name; nothing else is
            passed except the variables the sidecar adds itself (:data:`RESERVED_VARIABLES`).
        cwd: the absolute working directory (the workload root).

    Raises:
        LaunchError: an empty argv, a relative executable or working directory, a digest that
            is not 32 bytes, an environment that is unsorted, repeats a name, names a reserved
            variable or has a malformed name, a NUL character anywhere, or an encoding larger
            than :data:`MAX_LAUNCH_BYTES`.
    """

    argv: tuple[str, ...]
    executable: str
    executable_sha256: bytes
    env: tuple[tuple[str, str], ...]
    cwd: str

    def __post_init__(self) -> None:
        if not self.argv:
            raise LaunchError("a launch needs a command (argv must not be empty)")
        for n, arg in enumerate(self.argv):
            # An empty argument is a real one (``prog ""``); only the program needs a name.
            _check_text(arg, f"argument {n}", allow_empty=n > 0)
        _check_text(self.executable, "the executable")
        if not self.executable.startswith("/"):
            raise LaunchError(f"the executable {self.executable!r} must be an absolute path")
        if self.argv[0] != self.executable:
            # The sidecar runs the command's first word itself: argv[0] names the executable.
            raise LaunchError(
                f"argv[0] {self.argv[0]!r} must be the executable {self.executable!r}"
            )
        if len(self.executable_sha256) != _SHA256_SIZE:
            raise LaunchError(f"the executable's SHA-256 must be {_SHA256_SIZE} bytes")
        _check_text(self.cwd, "the working directory")
        if not self.cwd.startswith("/"):
            raise LaunchError(f"the working directory {self.cwd!r} must be an absolute path")
        names = [name for name, _ in self.env]
        for name, value in self.env:
            check_variable_name(name)
            _check_text(value, f"the value of {name}", allow_empty=True)
        if names != sorted(names, key=_utf8):
            raise LaunchError("the environment must be sorted by name")
        if len(set(names)) != len(names):
            raise LaunchError("the environment names a variable twice")
        size = len(encode_launch(self))
        if size > MAX_LAUNCH_BYTES:
            raise LaunchError(f"the launch is {size} bytes encoded, more than {MAX_LAUNCH_BYTES}")

    @classmethod
    def create(
        cls,
        *,
        argv: Sequence[str],
        executable_sha256: bytes,
        env: Mapping[str, str],
        cwd: str,
    ) -> Launch:
        """The launch of ``argv`` (whose first word is the executable) with ``env`` in ``cwd``.

        Raises:
            LaunchError: as the class does.
        """
        items = tuple(sorted(env.items(), key=lambda item: _utf8(item[0])))
        argv = tuple(argv)
        return cls(
            argv=argv,
            executable=argv[0] if argv else "",
            executable_sha256=bytes(executable_sha256),
            env=items,
            cwd=cwd,
        )

    @property
    def environment(self) -> dict[str, str]:
        """The environment as a dictionary."""
        return dict(self.env)

    def command_line(self) -> str:
        """The argv as one shell-quoted string (what ``--command`` takes)."""
        return shlex.join(self.argv)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _check_text(value: str, what: str, *, allow_empty: bool = False) -> None:
    if not value and not allow_empty:
        raise LaunchError(f"{what} must not be empty")
    if "\x00" in value:
        raise LaunchError(f"{what} must not contain a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise LaunchError(f"{what} is not valid UTF-8") from e


def check_variable_name(name: str) -> None:
    """Checks an environment variable's name for an approved environment.

    Raises:
        LaunchError: empty, containing ``=`` or NUL, or reserved for the sidecar.
    """
    if not name or "=" in name or "\x00" in name:
        raise LaunchError(f"{name!r} is not a valid environment variable name")
    if name in RESERVED_VARIABLES:
        raise LaunchError(f"{name} is set by the sidecar itself and cannot be approved")


def _field(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def encode_launch(launch: Launch) -> bytes:
    """The canonical bytes of ``launch`` (docs/measurement.md, "The launch event").

    ``LAUNCH_LABEL || u32 argc || (u32 len || arg)* || u32 len || executable ||
    executable_sha256 (32) || u32 envc || (u32 len || name || u32 len || value)* ||
    u32 len || cwd``; integers big-endian, strings UTF-8, the environment sorted by name.
    """
    parts = [LAUNCH_LABEL, _U32.pack(len(launch.argv))]
    parts.extend(_field(_utf8(arg)) for arg in launch.argv)
    parts.append(_field(_utf8(launch.executable)))
    parts.append(launch.executable_sha256)
    parts.append(_U32.pack(len(launch.env)))
    for name, value in launch.env:
        parts.append(_field(_utf8(name)))
        parts.append(_field(_utf8(value)))
    parts.append(_field(_utf8(launch.cwd)))
    return b"".join(parts)


def launch_digests(launch: Launch, banks: Iterable[str]) -> dict[str, bytes]:
    """The launch event's digest in each bank: the bank's hash over :func:`encode_launch`.

    Raises:
        EventLogError: a bank is not a hash this module knows.
    """
    data = encode_launch(launch)
    out: dict[str, bytes] = {}
    for bank in banks:
        try:
            out[bank] = hashlib.new(bank, data).digest()
        except ValueError as e:
            raise EventLogError(f"unsupported PCR bank {bank!r}") from e
    return out


def digest_executable(path: str | os.PathLike[str]) -> bytes:
    """SHA-256 of the file ``path`` names (symbolic links followed).

    Raises:
        MeasurementError: the file is missing, unreadable or not a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise MeasurementError(f"cannot measure the executable {path}: {e.strerror or e}") from e
    try:
        return digest_fd(fd, str(path))
    finally:
        os.close(fd)


def digest_fd(fd: int, name: str) -> bytes:
    """SHA-256 of the regular file open as ``fd``, read from its start.

    Raises:
        MeasurementError: ``fd`` is not a regular file or cannot be read.
    """
    import stat

    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MeasurementError(f"cannot measure the executable {name}: not a regular file")
        h = hashlib.sha256()
        offset = 0
        while chunk := os.pread(fd, _READ_CHUNK, offset):
            h.update(chunk)
            offset += len(chunk)
    except OSError as e:
        raise MeasurementError(f"cannot measure the executable {name}: {e.strerror or e}") from e
    return h.digest()


def parse_command(text: str) -> tuple[str, ...]:
    """Splits a command given as one shell-quoted string (``--command "CMD"``) with shlex.

    Raises:
        LaunchError: the string does not split (an unclosed quote), is empty, or its first
            word is not an absolute path (a bare name would be looked up on PATH, which the
            sidecar never does).
    """
    try:
        argv = tuple(shlex.split(text))
    except ValueError as e:
        raise LaunchError(f"cannot split the command {text!r}: {e}") from e
    check_command(argv)
    return argv


def check_command(argv: Sequence[str]) -> None:
    """Checks that ``argv`` is non-empty and starts with an absolute path.

    Raises:
        LaunchError: empty, or a first word that is not an absolute path.
    """
    if not argv:
        raise LaunchError("the command is empty")
    program = argv[0]
    if not program.startswith("/"):
        hint = "/usr/bin/python3" if program.startswith("python") else f"/usr/bin/{program}"
        raise LaunchError(
            f"the command's first word {program!r} must be an absolute path (such as {hint}): "
            "the sidecar executes exactly the measured path and never searches PATH"
        )


def parse_env_assignments(items: Iterable[str]) -> dict[str, str]:
    """Reads ``NAME=VALUE`` strings (``--env``, repeatable) into an environment.

    Raises:
        LaunchError: an item without ``=``, a malformed or reserved name, or a name twice.
    """
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise LaunchError(f"--env {item!r}: expected NAME=VALUE")
        check_variable_name(name)
        if "\x00" in value:
            raise LaunchError(f"--env {name}: the value must not contain a NUL character")
        if name in env:
            raise LaunchError(f"--env names {name} twice")
        env[name] = value
    return env


def launch_difference(approved: Launch, measured: Launch) -> str | None:
    """``None`` when both launches are equal; else what differs, field by field, in words.

    The words are the audit log's: "command", "executable", "interpreter digest",
    "environment", "working directory".
    """
    parts: list[str] = []
    if approved.argv != measured.argv:
        parts.append(
            f"command: approved `{approved.command_line()}`, measured `{measured.command_line()}`"
        )
    if approved.executable != measured.executable:
        parts.append(
            f"executable: approved {approved.executable!r}, measured {measured.executable!r}"
        )
    if approved.executable_sha256 != measured.executable_sha256:
        parts.append(
            f"interpreter digest: approved sha256 {approved.executable_sha256.hex()}, "
            f"measured {measured.executable_sha256.hex()}"
        )
    if approved.env != measured.env:
        parts.append(f"environment: {_env_difference(approved.environment, measured.environment)}")
    if approved.cwd != measured.cwd:
        parts.append(f"working directory: approved {approved.cwd!r}, measured {measured.cwd!r}")
    return "; ".join(parts) if parts else None


def _env_difference(approved: Mapping[str, str], measured: Mapping[str, str]) -> str:
    # Names only for variables that differ: values may be long, and the names say what to fix.
    added = sorted(set(measured) - set(approved))
    missing = sorted(set(approved) - set(measured))
    changed = sorted(n for n in set(approved) & set(measured) if approved[n] != measured[n])
    parts = []
    if added:
        parts.append("not approved " + ", ".join(added))
    if missing:
        parts.append("missing " + ", ".join(missing))
    if changed:
        parts.append("other value for " + ", ".join(changed))
    return ", ".join(parts)


def launch_to_json(launch: Launch) -> dict[str, object]:
    """The launch as the JSON event logs and manifests write it: ``{"argv", "executable",
    "executable_sha256" (hex), "env" (an object), "working_directory"}``."""
    return {
        "argv": list(launch.argv),
        "executable": launch.executable,
        "executable_sha256": launch.executable_sha256.hex(),
        "env": dict(launch.env),
        "working_directory": launch.cwd,
    }


def launch_from_json(doc: object) -> Launch:
    """Reads :func:`launch_to_json`'s form back.

    Raises:
        LaunchError: the object is malformed or the launch it describes is.
    """
    if not isinstance(doc, dict):
        raise LaunchError("a launch must be a JSON object")
    argv, env = doc.get("argv"), doc.get("env", {})
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise LaunchError('a launch needs "argv", a list of strings')
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise LaunchError('a launch\'s "env" must be an object of strings')
    try:
        digest = bytes.fromhex(str(doc.get("executable_sha256", "")))
    except ValueError as e:
        raise LaunchError('a launch\'s "executable_sha256" must be hex') from e
    launch = Launch.create(
        argv=argv, executable_sha256=digest, env=env, cwd=str(doc.get("working_directory", ""))
    )
    if doc.get("executable", launch.executable) != launch.executable:
        raise LaunchError('a launch\'s "executable" must be its argv[0]')
    return launch

"""A real PostgreSQL server in a private data directory on a free loopback port.

When ``CLEANROOM_TEST_POSTGRES_URL`` is set (a server started elsewhere), that one is used
instead. PostgreSQL refuses to run as root, so as root the cluster runs as the ``postgres`` user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.harness.net import free_port, wait_for_port


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's server binaries are missing or the server failed to start."""


def _bindir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise PostgresUnavailable("PostgreSQL server binaries not found (Debian: postgresql)")


@dataclass
class Postgres:
    url: str
    _datadir: Path | None = None
    _bindir: Path | None = None
    _user: str | None = None

    def stop(self) -> None:
        if self._datadir is not None and self._bindir is not None:
            _run_as(
                self._user,
                [str(self._bindir / "pg_ctl"), "-D", str(self._datadir), "-m", "immediate", "stop"],
                check=False,
            )
            shutil.rmtree(self._datadir.parent, ignore_errors=True)


def _run_as(user: str | None, cmd: list[str], *, check: bool = True) -> None:
    if user is not None:
        cmd = ["runuser", "-u", user, "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    if check and proc.returncode != 0:
        raise PostgresUnavailable(f"{' '.join(cmd)} failed: {proc.stdout}\n{proc.stderr}")


def start_postgres(*, fsync: bool = False) -> Postgres:
    """Starts (or finds, through CLEANROOM_TEST_POSTGRES_URL) a PostgreSQL server.

    Tests run it with ``fsync`` off (nothing they check depends on durability); the storage
    benchmark turns it on, as a production server has it, because a commit's flush is what
    serializes appenders that hold a lock across their commit.

    Raises:
        PostgresUnavailable: no server binaries, or the server did not start.
    """
    url = os.environ.get("CLEANROOM_TEST_POSTGRES_URL")
    if url:
        return Postgres(url=url)
    bindir = _bindir()
    user = "postgres" if os.geteuid() == 0 else None
    base = Path(tempfile.mkdtemp(prefix="cleanroom-pg-"))
    datadir = base / "data"
    datadir.mkdir()
    if user is not None:
        pw = pwd.getpwnam(user)
        os.chown(base, pw.pw_uid, pw.pw_gid)
        os.chown(datadir, pw.pw_uid, pw.pw_gid)
    os.chmod(base, 0o755)
    _run_as(
        user,
        [
            str(bindir / "initdb"),
            "-D",
            str(datadir),
            "-A",
            "trust",
            "-U",
            "cleanroom",
            "--no-sync",
            "-E",
            "UTF8",
        ],
    )
    port = free_port()
    opts = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={base} "
        f"-c fsync={'on' if fsync else 'off'} -c max_connections=200"
    )
    _run_as(
        user,
        [
            str(bindir / "pg_ctl"),
            "-D",
            str(datadir),
            "-o",
            opts,
            "-w",
            "-l",
            str(base / "log"),
            "start",
        ],
    )
    wait_for_port(port)
    pg = Postgres(
        url=f"postgresql+psycopg://cleanroom@127.0.0.1:{port}/postgres",
        _datadir=datadir,
        _bindir=bindir,
        _user=user,
    )
    return pg

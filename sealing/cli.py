"""``cleanroom keygen``, ``cleanroom seal`` and ``cleanroom open``.

* ``cleanroom keygen --out PREFIX [--kem x25519|mlkem768-x25519]``: a party's recipient key
  pair, PREFIX.key (mode 0600) and PREFIX.pub.
* ``cleanroom seal [-r PUB ...] [--key-id ID] [--data-key FILE | --data-key-out FILE]
  [INPUT|-] [-o OUTPUT|-]``: seals a file or stdin to recipients and/or a data key.
* ``cleanroom open (-k KEY | --data-key FILE) [INPUT|-] [-o OUTPUT|-]``: opens a sealed file
  or stdin. A file output appears only once the whole input authenticated; on stdout, output
  already written stays written, and the command exits non-zero on any failure.

INPUT and OUTPUT may also be blob URLs (``azure://account/container/blob`` or
``https://account.blob.core.windows.net/container/blob``), read and written through
:mod:`blobstore` with the ``CLEANROOM_BLOB_*`` settings; a blob output is committed only when
complete, like a file output.

A progress bar goes to stderr when stderr is a terminal and the input is large. Heavy imports
(cryptography) happen inside the handlers so that ``cleanroom --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from cleanroom.progress import Progress

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

_log = logging.getLogger("cleanroom.sealing")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keygen = sub.add_parser(
        "keygen",
        help="generate a party's recipient key pair",
        description="Writes PREFIX.key (private, mode 0600) and PREFIX.pub (public) and prints "
        "the public key's fingerprint.",
    )
    keygen.add_argument("--out", required=True, metavar="PREFIX", help="output path prefix")
    keygen.add_argument(
        "--kem",
        choices=("x25519", "mlkem768-x25519"),
        default="x25519",
        help="key encapsulation (default %(default)s; mlkem768-x25519 is post-quantum hybrid)",
    )
    keygen.add_argument("--force", action="store_true", help="overwrite existing key files")
    keygen.set_defaults(func=_keygen)

    seal = sub.add_parser(
        "seal",
        help="seal a file or stdin to one or more recipients",
        description="Encrypts INPUT (default stdin) into the sealed format. Each -r recipient "
        "can open it with its private key; whoever holds the data key can too. Without "
        "--data-key a fresh data key is made; --data-key-out saves it (mode 0600) for "
        "registering with the broker.",
    )
    seal.add_argument("input", nargs="?", default="-", metavar="INPUT", help="file, or - (stdin)")
    seal.add_argument("-o", "--output", default="-", metavar="OUTPUT", help="file, or - (stdout)")
    seal.add_argument(
        "-r",
        "--recipient",
        dest="recipients",
        action="append",
        default=[],
        metavar="PUBFILE",
        help="recipient public key file (repeatable)",
    )
    seal.add_argument("--key-id", metavar="ID", help="the data key's id (default: a new UUID)")
    keys = seal.add_mutually_exclusive_group()
    keys.add_argument("--data-key", metavar="FILE", help="seal with this existing raw data key")
    keys.add_argument(
        "--data-key-out", metavar="FILE", help="write the new raw data key here (mode 0600)"
    )
    seal.add_argument(
        "--chunk-size",
        type=_parse_size,
        default=None,
        metavar="BYTES",
        help="plaintext bytes per segment, e.g. 65536 or 4M (default 1M)",
    )
    seal.set_defaults(func=_seal)

    open_ = sub.add_parser(
        "open",
        help="open a sealed file with a recipient private key",
        description="Decrypts and authenticates INPUT (default stdin). An OUTPUT file (mode "
        "0600) appears only after the whole input authenticated; on stdout the command exits "
        "non-zero on any failure.",
    )
    open_.add_argument("input", nargs="?", default="-", metavar="INPUT", help="file, or - (stdin)")
    open_.add_argument("-o", "--output", default="-", metavar="OUTPUT", help="file, or - (stdout)")
    with_key = open_.add_mutually_exclusive_group(required=True)
    with_key.add_argument("-k", "--key", metavar="KEYFILE", help="recipient private key file")
    with_key.add_argument("--data-key", metavar="FILE", help="raw data key file")
    open_.set_defaults(func=_open)


def _parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "KI": 1 << 10, "M": 1 << 20, "MI": 1 << 20}
    t = text.strip().upper().removesuffix("B")
    digits = t.rstrip("KMI")
    try:
        return int(digits) * units[t[len(digits) :]]
    except (ValueError, KeyError) as e:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from e


# --- progress ---------------------------------------------------------------------------------


class _CountingReader:
    """Forwards reads to ``raw`` and reports the bytes read to a :class:`Progress`."""

    def __init__(self, raw: BinaryIO, progress: Progress) -> None:
        self._raw = raw
        self._progress = progress

    def read(self, size: int = -1, /) -> bytes:
        data = self._raw.read(size)
        self._progress.update(len(data))
        return data

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        n = self._raw.readinto(buffer)  # type: ignore[attr-defined]
        self._progress.update(n or 0)
        return int(n or 0)


# --- helpers ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _io_errors(what: str) -> Iterator[None]:
    """Turns OSError into the package's error, so the CLI prints one line."""
    from sealing.errors import SealingIOError

    try:
        yield
    except BrokenPipeError:
        # The reader of stdout went away: the CLI ends quietly (cleanroom.app.cli.main).
        raise
    except OSError as e:
        raise SealingIOError(f"{what}: {e.strerror or e}") from e


#: Inputs and outputs named by these URL prefixes go through ``blobstore`` (Azure Blob), which
#: reads its settings from ``CLEANROOM_BLOB_*`` environment variables.
_BLOB_PREFIXES = ("azure://", "https://", "http://")


def _is_blob(name: str) -> bool:
    return name.lower().startswith(_BLOB_PREFIXES)


def _shown(name: str) -> str:
    # A blob URL's query may hold a SAS token: never print it.
    return name.split("?", 1)[0] if _is_blob(name) else name


@contextlib.contextmanager
def _input(name: str) -> Iterator[tuple[BinaryIO, int | None]]:
    """The input stream and its size when known."""
    if name == "-":
        f = sys.stdin.buffer
        yield f, _regular_size(f)
        return
    if _is_blob(name):
        from blobstore import load_blob_config, open_reader

        with _io_errors(f"cannot open {_shown(name)}"):
            blob = open_reader(name, config=load_blob_config())
        with blob:
            yield blob, getattr(blob, "size", None)
        return
    with _io_errors(f"cannot open {name}"):
        f = open(name, "rb")
    with f:
        yield f, _regular_size(f)


def _regular_size(f: BinaryIO) -> int | None:
    try:
        st = os.fstat(f.fileno())
    except (OSError, ValueError):
        return None
    import stat

    return st.st_size if stat.S_ISREG(st.st_mode) else None


@contextlib.contextmanager
def _output(name: str, *, binary_to_tty_ok: bool) -> Iterator[BinaryIO]:
    """The output stream; a file is written atomically (see ``atomic_output``)."""
    from sealing.envelope import atomic_output
    from sealing.errors import ParameterError

    if name == "-":
        out = sys.stdout.buffer
        if not binary_to_tty_ok and out.isatty():
            raise ParameterError("refusing to write sealed data to a terminal; use -o FILE")
        yield out
        with _io_errors("cannot write to stdout"):
            out.flush()
        return
    if _is_blob(name):
        from blobstore import load_blob_config, open_writer

        # The blob is committed only if the block completes; an exception aborts it.
        with (
            _io_errors(f"cannot write {_shown(name)}"),
            open_writer(name, overwrite=True, config=load_blob_config()) as blob,
        ):
            yield blob
        return
    with _io_errors(f"cannot write {name}"), atomic_output(name) as f:
        yield f


# --- handlers ---------------------------------------------------------------------------------


def _keygen(args: argparse.Namespace) -> int:
    from sealing.keys import (
        generate_recipient_key,
        kem_from_name,
        write_private_key,
        write_public_key,
    )

    key_path = Path(f"{args.out}.key")
    pub_path = Path(f"{args.out}.pub")
    with generate_recipient_key(kem_from_name(args.kem)) as key:
        write_private_key(key, key_path, overwrite=args.force)
        try:
            write_public_key(key.public_key(), pub_path, overwrite=args.force)
        except BaseException:
            key_path.unlink(missing_ok=True)
            raise
        print(f"{key.fingerprint()}  {pub_path} ({args.kem}); private key {key_path}")
    return 0


def _seal(args: argparse.Namespace) -> int:
    import uuid

    from sealing.envelope import DEFAULT_CHUNK_SIZE, SealWriter, new_data_key
    from sealing.errors import ParameterError
    from sealing.keys import load_data_key, load_public_key, write_data_key

    recipients = [load_public_key(p) for p in args.recipients]
    if not recipients and not args.data_key and not args.data_key_out:
        raise ParameterError(
            "nobody could open the output: give -r PUBFILE, --data-key or --data-key-out"
        )
    data_key = load_data_key(args.data_key) if args.data_key else new_data_key()
    key_id = args.key_id or str(uuid.uuid4())
    if args.data_key_out:
        # Written first so that an existing file stops us before any work; removed on failure.
        write_data_key(data_key, args.data_key_out)
    ok = False
    try:
        with (
            _input(args.input) as (src, size),
            _output(args.output, binary_to_tty_ok=False) as sink,
        ):
            progress = Progress(label="sealing", total=size)
            with _io_errors("sealing failed"):
                with SealWriter(
                    sink,
                    data_key=data_key,
                    key_id=key_id,
                    recipients=recipients,
                    chunk_size=args.chunk_size or DEFAULT_CHUNK_SIZE,
                ) as writer:
                    n = writer.copy_from(_CountingReader(src, progress))
            progress.finish()
        ok = True
    finally:
        if not ok and args.data_key_out:
            Path(args.data_key_out).unlink(missing_ok=True)
    if not args.key_id:
        print(f"cleanroom: key id {key_id}", file=sys.stderr)
    if not sys.stderr.isatty():
        # Without a terminal there is no progress bar: one line says what was done.
        names = ", ".join(r.fingerprint() for r in recipients) or "none"
        where = "stdout" if args.output == "-" else _shown(args.output)
        print(
            f"cleanroom: sealed {n} bytes to {where} (key id {key_id}; recipients {names})",
            file=sys.stderr,
        )
    _log.info(
        "sealed %d bytes, key id %s, recipients %s",
        n,
        key_id,
        ", ".join(r.fingerprint() for r in recipients) or "none",
    )
    return 0


def _open(args: argparse.Namespace) -> int:
    from sealing.envelope import OpenReader, read_header
    from sealing.errors import NoMatchingRecipientError
    from sealing.keys import load_data_key, load_private_key

    private_key = load_private_key(args.key) if args.key else None
    data_key = load_data_key(args.data_key) if args.data_key else None
    try:
        with _input(args.input) as (src, size):
            progress = Progress(label="opening", total=size)
            counted = _CountingReader(src, progress)
            with _io_errors("cannot read the input"):
                header = read_header(counted)
            if private_key is not None and data_key is None and not header.recipients:
                raise NoMatchingRecipientError(
                    "this file has no recipients: it opens only with its data key "
                    "(--data-key FILE instead of -k)"
                )
            with _io_errors("cannot read the input"):
                reader = OpenReader(
                    counted, data_key=data_key, private_key=private_key, header=header
                )
            with reader, _output(args.output, binary_to_tty_ok=True) as sink:
                with _io_errors("opening failed"):
                    n = reader.copy_to(sink)
            progress.finish()
    finally:
        if private_key is not None:
            private_key.close()
    _log.info("opened %d bytes, key id %s", n, header.key_id)
    return 0

"""``cleanroom admin ...``: the operators' and parties' client of the broker's admin service.

A thin layer over :class:`broker.client.BrokerClient`: parse the arguments, build the request
(reading key files, measuring workload files, reading a reference quote), make the call, print
the answer as a table (default) or JSON (``--json``). Errors are :class:`BrokerError`
subclasses (or another package's root error), which ``cleanroom.app.cli`` prints as one line before
exiting non-zero.

The connection options (``--broker``, ``--cert``, ``--key``, ``--ca``, ``--timeout``) and
``--json`` may be given before the command group or after the subcommand; they default from the
environment (``CLEANROOM_ADMIN_BROKER``, ``CLEANROOM_ADMIN_CERT``, ``CLEANROOM_ADMIN_KEY``,
``CLEANROOM_ADMIN_CA``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from broker.admin_common import (
    b64,
    command_group,
    connection_options,
    format_fields,
    format_table,
    format_time,
    leaf_command,
    open_client,
    output_for,
    yes_no,
)
from broker.errors import AdminUsageError, BrokerError
from broker.manifests import check_bank_name, hex_value, manifest_from_files, manifest_from_json
from evidence.manifest import MANIFEST_BANKS, expected_pcr23
from evidence.pcr import BANK_SIZES, WORKLOAD_PCR

if TYPE_CHECKING:
    from cleanroom.v1 import admin_pb2, common_pb2
    from evidence.launch import Launch
    from evidence.manifest import ManifestEntry

_MAX_INPUT_FILE: Final = 1 << 20  # public keys, certificates, quotes and manifests are small
#: The broker's bounds on ``audit list`` (``broker.server.validate.MAX_AUDIT_SEQUENCE`` and
#: ``MAX_AUDIT_PAGE``; repeated here so that building the parser imports nothing heavy). A
#: number outside them is a usage error, before anything is sent.
AUDIT_MAX_SEQUENCE: Final = 2**63 - 1
AUDIT_MAX_PAGE: Final = 1000


# --- small parsers ---------------------------------------------------------------------------


def read_input(path: str | os.PathLike[str], what: str) -> bytes:
    """Reads a small input file (key, certificate, quote, manifest).

    Raises:
        AdminUsageError: the file is missing, unreadable, not a regular file or too large.
    """
    p = Path(path)
    try:
        if not p.is_file():
            raise AdminUsageError(f"{what} {p} does not exist or is not a regular file")
        if p.stat().st_size > _MAX_INPUT_FILE:
            raise AdminUsageError(f"{what} {p} is too large")
        return p.read_bytes()
    except OSError as e:
        raise AdminUsageError(f"cannot read {what} {p}: {e.strerror or e}") from e


@dataclass(frozen=True, order=True)
class PcrSpec:
    """One accepted PCR value: ``bank:index=value``."""

    index: int
    bank: str
    value: bytes

    def label(self) -> str:
        return f"{self.bank}:{self.index}"


def parse_pcr_spec(text: str) -> PcrSpec:
    """Parses ``BANK:INDEX=HEX`` (tpm2-tools spelling; a ``0x`` prefix is accepted).

    Raises:
        AdminUsageError: malformed, unknown bank, index outside 0..23, or the value's length is
            not the bank's digest size.
    """
    spec, sep, value = text.partition("=")
    bank, colon, index_text = spec.partition(":")
    if not sep or not colon:
        raise AdminUsageError(f"--pcr {text!r}: expected BANK:INDEX=HEX, e.g. sha256:23=ab12...")
    b = check_bank_name(bank, f"--pcr {text!r}")
    try:
        index = int(index_text)
    except ValueError:
        raise AdminUsageError(f"--pcr {text!r}: the PCR index must be a number") from None
    if not 0 <= index <= WORKLOAD_PCR:
        raise AdminUsageError(f"--pcr {text!r}: the PCR index must be 0..{WORKLOAD_PCR}")
    raw = hex_value(value, f"--pcr {spec}")
    if len(raw) != BANK_SIZES[b]:
        raise AdminUsageError(
            f"--pcr {spec}: a {b} value is {BANK_SIZES[b]} bytes "
            f"({2 * BANK_SIZES[b]} hex digits), got {len(raw)}"
        )
    return PcrSpec(index=index, bank=b, value=raw)


def golden_from_files(files: Sequence[str], banks: Sequence[str]) -> list[PcrSpec]:
    """The PCR 23 values, per bank, that measuring ``files`` in order produces.

    Raises:
        AdminUsageError: an unknown bank.
        MeasurementError: a file cannot be read.
    """
    from evidence.pcr import measure_files

    checked = list(dict.fromkeys(check_bank_name(b, "--bank") for b in banks))
    measurement = measure_files(files, checked)
    return [PcrSpec(WORKLOAD_PCR, b, measurement.pcrs[b]) for b in checked]


def golden_from_quote(directory: str | os.PathLike[str]) -> list[PcrSpec]:
    """The PCR values in a reference machine's ``quote.msg`` and ``quote.pcrs``.

    The values file is read by :func:`broker.quote.pcr_values_from_tools` (either tpm2-tools
    format), and its values must hash to the PCR digest inside the quote, so that a values file
    from another quote is caught here rather than becoming a golden set.

    Raises:
        AdminUsageError: a file is missing or malformed, or the values do not match the quote's
            PCR digest.
    """
    from broker.quote import pcr_values_from_tools

    d = Path(directory)
    attest = read_input(d / "quote.msg", "quote message")
    pcrs = read_input(d / "quote.pcrs", "quote PCR file")
    quoted_digest = _quoted_pcr_digest(attest, d / "quote.msg")
    try:
        values = pcr_values_from_tools(pcrs, attest=attest)
    except BrokerError as e:
        raise AdminUsageError(f"{d / 'quote.pcrs'}: {e}") from e
    # The values come in the selection order of the PCR file, which is the order the TPM
    # digested them in; a file whose selection differs from the quote's fails this check too.
    algorithm = {20: "sha1", 32: "sha256", 48: "sha384", 64: "sha512"}.get(len(quoted_digest))
    joined = b"".join(values.values())
    if algorithm is None or hashlib.new(algorithm, joined).digest() != quoted_digest:
        raise AdminUsageError(
            f"{d}: quote.pcrs does not match the PCR digest in quote.msg (files of two "
            "different quotes?)"
        )
    return sorted(PcrSpec(index, bank, value) for (index, bank), value in values.items())


def _quoted_pcr_digest(attest: bytes, where: Path) -> bytes:
    """The pcrDigest of a TPMS_ATTEST quote (tpm2-pytss unmarshals it).

    Raises:
        AdminUsageError: the bytes are not a TPMS_ATTEST of a quote.
    """
    from tpm2_pytss import TPM2_ST, TPMS_ATTEST

    try:
        parsed, consumed = TPMS_ATTEST.unmarshal(attest)
    except Exception as e:  # tpm2-pytss raises TSS2_Exception and friends for malformed input
        raise AdminUsageError(f"{where} is not a TPM quote (TPMS_ATTEST)") from e
    if consumed != len(attest) or parsed.type != TPM2_ST.ATTEST_QUOTE:
        raise AdminUsageError(f"{where} is not a TPM quote (TPMS_ATTEST of a quote)")
    # The digest uses the signing scheme's hash, which the quote message alone does not name;
    # its length does.
    return bytes(parsed.attested.quote.pcrDigest)


def recipient_key_pb(path: str | os.PathLike[str]) -> common_pb2.RecipientKey:
    """A party's public key file (``cleanroom keygen`` output) as a RecipientKey.

    Raises:
        KeyFileError: the file cannot be read or is not a supported public key.
    """
    from cleanroom.v1 import common_pb2
    from sealing.keys import load_public_key

    key = load_public_key(path)
    return common_pb2.RecipientKey(
        kem=common_pb2.KemAlgorithm.ValueType(key.kem), public_key=key.raw
    )


# --- workload manifests ----------------------------------------------------------------------


# --- output ----------------------------------------------------------------------------------


def _bank(value: int) -> str:
    from evidence.proto import bank_from_pb

    return bank_from_pb(value)


def _kem_name(kem: int) -> str:
    from sealing.keys import KEM_NAMES

    return KEM_NAMES.get(kem, f"kem-{kem}")


def _fingerprint(key: common_pb2.RecipientKey) -> str:
    from sealing.errors import SealingError
    from sealing.keys import RecipientPublicKey

    try:
        return RecipientPublicKey(kem=int(key.kem), raw=bytes(key.public_key)).fingerprint()
    except SealingError:
        return "(invalid key)"


def ek_dict(ek: admin_pb2.EkInfo) -> dict[str, Any]:
    return {
        "ek_id": ek.ek_id,
        "revoked": ek.revoked,
        "revoked_reason": ek.revoked_reason,
        "enrolled_at": format_time(ek.enrolled_at),
        "has_certificate": bool(ek.ek_certificate),
        "ek_public": b64(ek.ek_public),
        "ek_certificate": b64(ek.ek_certificate),
    }


def ak_dict(ak: admin_pb2.AkInfo) -> dict[str, Any]:
    return {
        "ak_name": ak.ak_name,
        "ek_id": ak.ek_id,
        "enrolled_by": ak.enrolled_by,
        "revoked": ak.revoked,
        "enrolled_at": format_time(ak.enrolled_at),
        "ak_public": b64(ak.ak_public),
    }


def pcr_value_dict(v: common_pb2.PcrValue) -> dict[str, Any]:
    return {"pcr": v.index, "bank": _bank(v.bank), "value": v.value.hex()}


def golden_dict(g: admin_pb2.GoldenPcrSet) -> dict[str, Any]:
    return {
        "name": g.name,
        "updated_at": format_time(g.updated_at),
        "values": [pcr_value_dict(v) for v in g.accepted_values],
    }


def party_dict(p: admin_pb2.Party) -> dict[str, Any]:
    return {
        "name": p.name,
        "kem": _kem_name(p.recipient_key.kem),
        "fingerprint": _fingerprint(p.recipient_key),
        "public_key": b64(p.recipient_key.public_key),
    }


def data_key_dict(k: admin_pb2.DataKeyInfo) -> dict[str, Any]:
    return {
        "key_id": k.key_id,
        "owner": k.owner_party,
        "description": k.description,
        "kek_ref": k.kek_ref,
        "created_at": format_time(k.created_at),
    }


def party_kek_dict(k: admin_pb2.PartyKek) -> dict[str, Any]:
    return {
        "party": k.party,
        "kek_ref": k.kek_ref,
        "source": k.source,
        "checked_key": k.checked_key,
        "updated_at": format_time(k.updated_at),
    }


def manifest_dict(m: common_pb2.WorkloadManifest) -> dict[str, Any]:
    """The manifest in the JSON form that ``workload approve --manifest`` reads back (its
    files; the launch is shown too, and given to ``approve`` with ``--command``)."""
    doc: dict[str, Any] = {
        "name": m.name,
        "entries": [
            {
                "path": e.path,
                "size": e.size,
                "digests": {_bank(d.algorithm): d.value.hex() for d in e.digests},
            }
            for e in m.entries
        ],
    }
    if m.HasField("launch"):
        from evidence.launch import launch_to_json
        from evidence.proto import launch_from_pb

        doc["launch"] = launch_to_json(launch_from_pb(m.launch))
    return doc


def approval_dict(a: admin_pb2.Approval) -> dict[str, Any]:
    return {
        "approval_id": a.approval_id,
        "party": a.party,
        "workload": a.manifest.name,
        "key_ids": list(a.key_ids),
        "output_recipients": list(a.output_recipients),
        "golden_set": a.golden_set,
        "require_snp": a.require_snp,
        "revoked": a.revoked,
        "created_at": format_time(a.created_at),
        "expected_pcrs": {_bank(v.bank): v.value.hex() for v in a.expected_pcrs},
        "manifest": manifest_dict(a.manifest),
    }


def audit_dict(r: admin_pb2.AuditRecord) -> dict[str, Any]:
    return {
        "sequence": r.sequence,
        "time": format_time(r.time),
        "actor": r.actor,
        "action": r.action,
        "subject": r.subject,
        "decision": r.decision,
        "reason": r.reason,
        "evidence_digest": r.evidence_digest,
        "parties": list(r.parties),
        "previous_hash": r.previous_hash,
        "record_hash": r.record_hash,
    }


# --- connection ------------------------------------------------------------------------------


# --- ek ----------------------------------------------------------------------------------------


def _ek_fields(ek: admin_pb2.EkInfo) -> str:
    return format_fields(
        [
            ("EK id", ek.ek_id),
            ("certificate", yes_no(bool(ek.ek_certificate))),
            ("revoked", (ek.revoked_reason or "yes") if ek.revoked else "no"),
            ("enrolled at", format_time(ek.enrolled_at)),
        ]
    )


def _ek_enroll(args: argparse.Namespace) -> int:
    public = read_input(args.public, "EK public")
    cert = read_input(args.certificate, "EK certificate") if args.certificate else b""
    with open_client(args) as client:
        ek = client.enroll_ek(
            public, ek_certificate=cert, allow_without_certificate=args.no_certificate
        )
    output_for(args).emit(ek_dict(ek), _ek_fields(ek))
    return 0


def _ek_revoke(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        client.revoke_ek(args.ek_id, reason=args.reason)
    output_for(args).emit({"ek_id": args.ek_id, "revoked": True}, f"revoked EK {args.ek_id}\n")
    return 0


def _ek_readmit(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        was_revoked = client.readmit_ek(args.ek_id, reason=args.reason)
    text = (
        f"re-admitted EK {args.ek_id}\n"
        if was_revoked
        else f"EK {args.ek_id} was not revoked (nothing changed)\n"
    )
    output_for(args).emit({"ek_id": args.ek_id, "was_revoked": was_revoked}, text)
    return 0


def _ek_list(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        eks = client.list_eks()
    # The reason is last: it is free text (an AK revocation keeps the EK out with
    # "AK <name> revoked: <reason>").
    rows = [
        [
            e.ek_id,
            yes_no(bool(e.ek_certificate)),
            yes_no(e.revoked),
            format_time(e.enrolled_at),
            (e.revoked_reason or "-") if e.revoked else "-",
        ]
        for e in eks
    ]
    text = format_table(["EK ID", "CERTIFICATE", "REVOKED", "ENROLLED AT", "REASON"], rows)
    output_for(args).emit([ek_dict(e) for e in eks], text)
    return 0


# --- ak ----------------------------------------------------------------------------------------


def _ak_enroll(args: argparse.Namespace) -> int:
    public = read_input(args.public, "AK public")
    with open_client(args) as client:
        ak = client.enroll_ak(public, ek_id=args.ek or "")
    text = format_fields(
        [
            ("AK name", ak.ak_name),
            ("EK id", ak.ek_id or "-"),
            ("enrolled by", ak.enrolled_by),
            ("enrolled at", format_time(ak.enrolled_at)),
        ]
    )
    output_for(args).emit(ak_dict(ak), text)
    return 0


def _ak_revoke(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        client.revoke_ak(args.ak_name, reason=args.reason)
    output_for(args).emit(
        {"ak_name": args.ak_name, "revoked": True}, f"revoked AK {args.ak_name}\n"
    )
    return 0


def _ak_list(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        aks = client.list_aks()
    rows = [
        [a.ak_name, a.ek_id or "-", a.enrolled_by, yes_no(a.revoked), format_time(a.enrolled_at)]
        for a in aks
    ]
    text = format_table(["AK NAME", "EK ID", "ENROLLED BY", "REVOKED", "ENROLLED AT"], rows)
    output_for(args).emit([ak_dict(a) for a in aks], text)
    return 0


# --- golden ------------------------------------------------------------------------------------


def _golden_text(g: admin_pb2.GoldenPcrSet) -> str:
    rows = [[f"{_bank(v.bank)}:{v.index}", v.value.hex()] for v in g.accepted_values]
    head = f"golden set {g.name} (updated {format_time(g.updated_at) or '-'})\n"
    return head + format_table(["PCR", "ACCEPTED VALUE"], rows)


def golden_values(args: argparse.Namespace) -> list[PcrSpec]:
    """Every value the ``golden set`` sources name, in order, without duplicates.

    Raises:
        AdminUsageError: no source, or a malformed source.
        MeasurementError: a --from-files file cannot be read.
        BrokerError: the --from-quote files are malformed.
    """
    values = [parse_pcr_spec(s) for s in args.pcr]
    if args.from_files:
        values += golden_from_files(args.from_files, args.bank or MANIFEST_BANKS)
    elif args.bank:
        raise AdminUsageError("--bank applies to --from-files only")
    if args.from_quote:
        values += golden_from_quote(args.from_quote)
    if not values:
        raise AdminUsageError("golden set needs --pcr, --from-files or --from-quote")
    return list(dict.fromkeys(values))


def _golden_set(args: argparse.Namespace) -> int:
    from cleanroom.v1 import common_pb2
    from evidence.proto import bank_to_pb

    values = golden_values(args)
    pbs = [
        common_pb2.PcrValue(index=v.index, bank=bank_to_pb(v.bank), value=v.value) for v in values
    ]
    with open_client(args) as client:
        golden = client.set_golden_pcr_set(args.name, pbs)
    output_for(args).emit(golden_dict(golden), _golden_text(golden))
    return 0


def _golden_list(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        sets = client.list_golden_pcr_sets()
    rows = [
        [g.name, f"{_bank(v.bank)}:{v.index}", v.value.hex(), format_time(g.updated_at)]
        for g in sets
        for v in g.accepted_values
    ]
    text = format_table(["NAME", "PCR", "ACCEPTED VALUE", "UPDATED AT"], rows)
    output_for(args).emit([golden_dict(g) for g in sets], text)
    return 0


def _golden_delete(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        client.delete_golden_pcr_set(args.name)
    output_for(args).emit({"name": args.name, "deleted": True}, f"deleted golden set {args.name}\n")
    return 0


# --- party -------------------------------------------------------------------------------------


def _party_add(args: argparse.Namespace) -> int:
    key = recipient_key_pb(args.public_key)
    with open_client(args) as client:
        party = client.add_party(args.name, key)
    d = party_dict(party)
    text = format_fields(
        [("party", d["name"]), ("kem", d["kem"]), ("fingerprint", d["fingerprint"])]
    )
    output_for(args).emit(d, text)
    return 0


def _party_list(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        parties = client.list_parties()
    docs = [party_dict(p) for p in parties]
    rows = [[d["name"], d["kem"], d["fingerprint"]] for d in docs]
    output_for(args).emit(docs, format_table(["PARTY", "KEM", "FINGERPRINT"], rows))
    return 0


# --- key ---------------------------------------------------------------------------------------


def _key_register(args: argparse.Namespace) -> int:
    from sealing.keys import load_data_key

    data_key = bytearray(load_data_key(args.data_key))
    try:
        with open_client(args) as client:
            info = client.register_plain_data_key(
                args.key_id, data_key, description=args.description
            )
    finally:
        # Best effort: shorten the plain key's life in this process (see broker.custody).
        data_key[:] = bytes(len(data_key))
    d = data_key_dict(info)
    text = format_fields(
        [("key id", d["key_id"]), ("owner", d["owner"]), ("wrapped by", d["kek_ref"])]
    )
    output_for(args).emit(d, text)
    return 0


def _key_list(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        keys = client.list_data_keys()
    rows = [
        [k.key_id, k.owner_party, k.kek_ref, format_time(k.created_at), k.description] for k in keys
    ]
    text = format_table(["KEY ID", "OWNER", "KEK", "CREATED AT", "DESCRIPTION"], rows)
    output_for(args).emit([data_key_dict(k) for k in keys], text)
    return 0


def _key_rewrap(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        response = client.rewrap_data_key(args.key_id, args.kek)
    d = data_key_dict(response.key)
    d["previous_kek_ref"] = response.previous_kek_ref
    text = format_fields(
        [
            ("key id", d["key_id"]),
            ("owner", d["owner"]),
            ("wrapped by", d["kek_ref"]),
            ("was wrapped by", response.previous_kek_ref or "-"),
        ]
    )
    output_for(args).emit(d, text)
    return 0


# --- kek ---------------------------------------------------------------------------------------


def _kek_import(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        record = client.set_party_kek(args.party, args.ref)
    d = party_kek_dict(record)
    text = format_fields(
        [
            ("party", d["party"]),
            ("KEK", d["kek_ref"]),
            ("checked", f"wraps and unwraps with {d['checked_key'] or d['kek_ref']}"),
            ("applies to", "data keys the party registers from now on"),
        ]
    )
    output_for(args).emit(d, text)
    return 0


def _kek_check(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        response = client.check_kek(args.ref)
    d = {"kek_ref": response.kek_ref, "checked_key": response.checked_key, "usable": True}
    text = f"{response.kek_ref}: the broker wraps and unwraps with {response.checked_key}\n"
    output_for(args).emit(d, text)
    return 0


def _kek_list(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        keks = client.list_party_keks()
    rows = [[k.party, k.kek_ref, k.source, format_time(k.updated_at)] for k in keks]
    text = format_table(["PARTY", "KEK", "SOURCE", "IMPORTED AT"], rows)
    output_for(args).emit([party_kek_dict(k) for k in keks], text)
    return 0


# --- workload ----------------------------------------------------------------------------------


def workload_files(args: argparse.Namespace) -> list[ManifestEntry]:
    """The manifest files from ``--file``/``--root`` or ``--manifest``.

    Raises:
        AdminUsageError: neither or both given, or the manifest is malformed.
        MeasurementError: a file cannot be read.
    """
    if bool(args.file) == bool(args.manifest):
        raise AdminUsageError("give the workload's files with --file or a --manifest, not both")
    if args.manifest:
        if args.root:
            raise AdminUsageError("--root applies to --file only")
        return manifest_from_json(read_input(args.manifest, "manifest"), str(args.manifest))
    return manifest_from_files(args.file, root=args.root)


_LAUNCH_HELP = (
    'an approval covers the launch: give --command "/absolute/program ARGS" (the exact '
    "command the sidecar runs) and --env NAME=VALUE for each variable the workload gets"
)


def workload_launch(args: argparse.Namespace) -> Launch:
    """The launch from ``--command``, ``--env``, ``--workdir``/``--root`` and
    ``--interpreter-sha256`` (default: the SHA-256 of the executable as found here).

    Raises:
        AdminUsageError: no command, a command whose first word is not an absolute path, a
            malformed ``--env``, no working directory, or an executable that cannot be read
            here without ``--interpreter-sha256``.
    """
    from evidence.errors import LaunchError, MeasurementError
    from evidence.launch import digest_executable, parse_command, parse_env_assignments

    if not args.command:
        raise AdminUsageError(_LAUNCH_HELP)
    try:
        argv = parse_command(args.command)
        env = parse_env_assignments(args.env or ())
    except LaunchError as e:
        raise AdminUsageError(str(e)) from e
    if args.workdir:
        if not args.workdir.startswith("/"):
            raise AdminUsageError(
                f"--workdir {args.workdir!r} must be absolute (the workload root on the TEE)"
            )
        workdir = os.path.normpath(args.workdir)
    elif getattr(args, "root", None):
        workdir = os.path.abspath(args.root)
    else:
        raise AdminUsageError(
            "give --workdir DIR: the workload's working directory on the TEE (its root), "
            "or --root to use the local root's absolute path"
        )
    if args.interpreter_sha256:
        try:
            digest = bytes.fromhex(args.interpreter_sha256)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise AdminUsageError("--interpreter-sha256 must be 64 hexadecimal digits")
    else:
        try:
            digest = digest_executable(argv[0])
        except MeasurementError as e:
            raise AdminUsageError(
                f"{e}; give the executable's SHA-256 as it is on the TEE with "
                "--interpreter-sha256 (sha256sum there, or 'cleanroom sidecar measure "
                "--offline --command ...')"
            ) from e
    try:
        from evidence.launch import Launch

        return Launch.create(argv=argv, executable_sha256=digest, env=env, cwd=workdir)
    except LaunchError as e:
        raise AdminUsageError(str(e)) from e


def _approval_text(a: admin_pb2.Approval) -> str:
    fields = [
        ("approval id", a.approval_id),
        ("party", a.party),
        ("workload", a.manifest.name),
        ("files", str(len(a.manifest.entries))),
        ("keys", ", ".join(a.key_ids)),
        ("recipients", ", ".join(a.output_recipients)),
        ("golden set", a.golden_set or "-"),
        ("needs SNP", yes_no(a.require_snp)),
        ("revoked", yes_no(a.revoked)),
    ]
    fields += _launch_fields(a.manifest)
    for v in a.expected_pcrs:
        fields.append((f"{_bank(v.bank)}:{v.index}", v.value.hex()))
    return format_fields(fields)


def _launch_fields(m: common_pb2.WorkloadManifest) -> list[tuple[str, str]]:
    if not m.HasField("launch"):
        return [("command", "(none: approved before launches were measured)")]
    import shlex

    launch = m.launch
    env = " ".join(shlex.quote(f"{v.name}={v.value}") for v in launch.env)
    return [
        ("command", shlex.join(launch.argv)),
        ("interpreter sha256", launch.executable_sha256.hex()),
        ("environment", env or "(empty)"),
        ("working dir", launch.working_directory),
    ]


def _workload_approve(args: argparse.Namespace) -> int:
    files = workload_files(args)
    launch = workload_launch(args)
    from evidence.proto import manifest_to_pb

    manifest = manifest_to_pb(args.name, files, launch)
    local = expected_pcr23(files, launch=launch)
    with open_client(args) as client:
        approval = client.approve_workload(
            manifest,
            key_ids=args.key_ids,
            output_recipients=args.recipient,
            golden_set=args.golden_set or "",
            require_snp=args.require_snp,
        )
    # The broker computes the expected PCR 23 itself; a difference from the local computation
    # means the two disagree on the manifest, which the party must hear about.
    for v in approval.expected_pcrs:
        bank = _bank(v.bank)
        if bank in local and local[bank] != v.value:
            raise AdminUsageError(
                f"approval {approval.approval_id}: the broker expects {bank}:{v.index}="
                f"{v.value.hex()} but the manifest gives {local[bank].hex()}; revoke it with "
                f"'cleanroom admin workload revoke {approval.approval_id}'"
            )
    output_for(args).emit(approval_dict(approval), _approval_text(approval))
    return 0


def _workload_manifest(args: argparse.Namespace) -> int:
    files = manifest_from_files(args.file, root=args.root)
    launch = workload_launch(args) if args.command else None
    from evidence.proto import manifest_to_pb

    doc = manifest_dict(manifest_to_pb(args.name, files, launch))
    doc["expected_pcrs"] = {b: v.hex() for b, v in expected_pcr23(files, launch=launch).items()}
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    return 0


def _workload_revoke(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        client.revoke_approval(args.approval_id)
    doc = {"approval_id": args.approval_id, "revoked": True}
    output_for(args).emit(doc, f"revoked approval {args.approval_id}\n")
    return 0


def _workload_list(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        approvals = client.list_approvals()
    rows = [
        [
            a.approval_id,
            a.party,
            a.manifest.name,
            ",".join(a.key_ids),
            ",".join(a.output_recipients),
            a.golden_set or "-",
            yes_no(a.revoked),
        ]
        for a in approvals
    ]
    text = format_table(
        ["APPROVAL ID", "PARTY", "WORKLOAD", "KEYS", "RECIPIENTS", "GOLDEN SET", "REVOKED"], rows
    )
    output_for(args).emit([approval_dict(a) for a in approvals], text)
    return 0


# --- audit -------------------------------------------------------------------------------------


def _audit_list(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        records = client.list_audit_records(after_sequence=args.after, limit=args.limit)
    rows = [
        [str(r.sequence), format_time(r.time), r.actor, r.action, r.subject, r.decision, r.reason]
        for r in records
    ]
    text = format_table(["SEQ", "TIME", "ACTOR", "ACTION", "SUBJECT", "DECISION", "REASON"], rows)
    output_for(args).emit([audit_dict(r) for r in records], text)
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from broker.errors import AuditChainError

    with open_client(args) as client:
        report = client.verify_audit_log()
    doc = {
        "valid": report.valid,
        "records_checked": report.records_checked,
        "first_bad_sequence": report.first_bad_sequence if not report.valid else None,
        "problem": report.problem,
    }
    if report.valid:
        output_for(args).emit(doc, f"audit log intact: {report.records_checked} records checked\n")
        return 0
    message = (
        f"audit log chain is broken at sequence {report.first_bad_sequence}: "
        f"{report.problem or 'hash mismatch'} ({report.records_checked} records checked)"
    )
    if getattr(args, "json", False):
        # Scripts get the report on stdout and the verdict in the exit status.
        output_for(args).emit(doc, "")
        print(f"cleanroom: error: {message}", file=sys.stderr)
        return 1
    raise AuditChainError(message)


# --- the parser --------------------------------------------------------------------------------


def _register_ek(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = command_group(sub, "ek", "endorsement keys (operator)")
    p = leaf_command(
        g, "enroll", "enroll an EK with its certificate, or vouch for it without", _ek_enroll
    )
    p.add_argument(
        "--public",
        required=True,
        metavar="FILE",
        help="EK public as tpm2_createek --public writes it (TPM2B_PUBLIC; PEM is refused)",
    )
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--certificate", metavar="FILE", help="EK certificate, DER or PEM")
    how.add_argument(
        "--no-certificate",
        action="store_true",
        help="enroll without a certificate: the operator vouches for this EK",
    )
    p = leaf_command(
        g, "revoke", "revoke an EK: no AK of its TPM, old or new, can attest", _ek_revoke
    )
    p.add_argument("ek_id", metavar="ID", help="the EK id (ek list)")
    p.add_argument("--reason", default="", help="recorded in the audit log")
    p = leaf_command(
        g,
        "readmit",
        "re-admit a revoked EK (after ek revoke or ak revoke): its TPM may enroll new AKs",
        _ek_readmit,
    )
    p.add_argument("ek_id", metavar="ID", help="the EK id (ek list)")
    p.add_argument("--reason", default="", help="recorded in the audit log")
    leaf_command(g, "list", "list enrolled EKs", _ek_list)


def _register_ak(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = command_group(sub, "ak", "attestation keys (operator)")
    p = leaf_command(g, "enroll", "enroll an AK directly: the operator vouches for it", _ak_enroll)
    p.add_argument(
        "--public", required=True, metavar="FILE", help="AK public: tpm2_createak --public or PEM"
    )
    p.add_argument("--ek", metavar="ID", help="the enrolled EK this AK belongs to")
    p = leaf_command(
        g, "revoke", "revoke an AK and keep its TPM out until its EK is re-admitted", _ak_revoke
    )
    p.add_argument("ak_name", metavar="NAME", help="the AK name (ak list)")
    p.add_argument("--reason", default="", help="recorded in the audit log")
    leaf_command(g, "list", "list enrolled AKs", _ak_list)


def _register_golden(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = command_group(sub, "golden", "golden PCR sets (operator)")
    p = leaf_command(g, "set", "create or replace a golden PCR set", _golden_set)
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--pcr",
        action="append",
        default=[],
        metavar="BANK:INDEX=HEX",
        help="an accepted value (repeatable; several for one PCR accept any of them)",
    )
    p.add_argument(
        "--from-files",
        nargs="+",
        default=[],
        metavar="FILE",
        help="accept the PCR 23 that measuring these files in order gives",
    )
    p.add_argument(
        "--bank",
        action="append",
        default=[],
        metavar="BANK",
        help="banks for --from-files (repeatable; default sha1 and sha256)",
    )
    p.add_argument(
        "--from-quote",
        metavar="DIR",
        help="accept the PCR values in DIR/quote.msg and DIR/quote.pcrs of a reference machine",
    )
    leaf_command(g, "list", "list golden PCR sets", _golden_list)
    p = leaf_command(g, "delete", "delete a golden PCR set", _golden_delete)
    p.add_argument("name", metavar="NAME")


def _register_party(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = command_group(sub, "party", "parties and their output keys (operator)")
    p = leaf_command(
        g, "add", "add a party with the public key its outputs are sealed to", _party_add
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--public-key", required=True, metavar="FILE", help="the party's cleanroom keygen .pub"
    )
    leaf_command(g, "list", "list parties", _party_list)


def _register_key(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = command_group(sub, "key", "data keys (parties register; the operator rewraps)")
    p = leaf_command(g, "register", "seal a data key to the broker and register it", _key_register)
    p.add_argument("--key-id", required=True, metavar="ID")
    p.add_argument(
        "--data-key",
        required=True,
        metavar="FILE",
        help="the raw 32-byte key written by cleanroom seal --data-key-out",
    )
    p.add_argument("--description", default="")
    leaf_command(g, "list", "list data keys (a party sees its own)", _key_list)
    p = leaf_command(
        g,
        "rewrap",
        "rewrap a data key under another KEK inside the broker (operator)",
        _key_rewrap,
    )
    p.add_argument("key_id", metavar="KEY_ID")
    p.add_argument(
        "--kek",
        required=True,
        metavar="REF",
        help="the new KEK: local or azurekv:https://<vault>/keys/<name>[/<version>]",
    )


def _register_kek(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = command_group(sub, "kek", "key-encryption keys that wrap the parties' data keys (operator)")
    p = leaf_command(
        g,
        "import",
        "use a party's existing Key Vault key for its new data keys, once the broker checked it",
        _kek_import,
    )
    p.add_argument("--party", required=True, metavar="NAME")
    p.add_argument(
        "--ref",
        required=True,
        metavar="REF",
        help="azurekv:https://<vault>/keys/<name>[/<version>] (or local)",
    )
    p = leaf_command(g, "check", "check that the broker can wrap and unwrap with a KEK", _kek_check)
    p.add_argument("ref", metavar="REF", help="azurekv:https://<vault>/keys/<name> or local")
    leaf_command(g, "list", "which KEK each party's new data keys get, and why", _kek_list)


def _workload_file_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--file",
        action="extend",
        nargs="+",
        default=[],
        metavar="PATH",
        help="the workload's files in measurement order (repeatable)",
    )
    p.add_argument("--root", metavar="DIR", help="name the files relative to DIR")


def _workload_launch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--command",
        metavar='"CMD"',
        help="the command the sidecar runs, one shell-quoted string (split like a shell "
        'would); its first word must be an absolute path, e.g. "/usr/bin/python3 run.py"',
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a variable of the workload's environment (repeatable); nothing else is passed "
        "except the sidecar's socket variable",
    )
    p.add_argument(
        "--workdir",
        metavar="DIR",
        help="the workload root on the TEE, its working directory (absolute; default: the "
        "absolute path of --root)",
    )
    p.add_argument(
        "--interpreter-sha256",
        metavar="HEX",
        help="pin the executable's SHA-256 (default: the SHA-256 of the command's first word "
        "as found on this machine)",
    )


def _register_workload(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = command_group(sub, "workload", "workload approvals (parties)")
    # Here --key names data keys, so the client key must come before the group (or from env).
    p = leaf_command(
        g,
        "approve",
        "approve a workload for your keys",
        _workload_approve,
        skip=frozenset({"--key"}),
    )
    p.add_argument("--name", required=True, help="the workload's name")
    p.add_argument(
        "--key",
        dest="key_ids",
        action="extend",
        nargs="+",
        required=True,
        metavar="ID",
        help="your key ids",
    )
    p.add_argument(
        "--recipient",
        action="extend",
        nargs="+",
        required=True,
        metavar="PARTY",
        help="parties the outputs are sealed to",
    )
    p.add_argument("--golden-set", metavar="NAME", help="boot PCRs must also match this set")
    _workload_file_options(p)
    p.add_argument(
        "--manifest", metavar="FILE.json", help="the files' digests as JSON instead of --file"
    )
    p.add_argument(
        "--require-snp",
        action="store_true",
        help="release your keys under this approval only to an Azure SEV-SNP confidential VM "
        "whose hardware evidence (HCL report, VCEK) the broker verified",
    )
    _workload_launch_options(p)
    p = g.add_parser(
        "manifest",
        help="print a workload manifest (JSON) of files, offline",
        description="Measures files offline and prints the manifest JSON --manifest reads.",
    )
    p.add_argument("--name", required=True, help="the workload's name")
    _workload_file_options(p)
    _workload_launch_options(p)
    p.set_defaults(func=_workload_manifest)
    p = leaf_command(g, "revoke", "revoke one of your approvals", _workload_revoke)
    p.add_argument("approval_id", metavar="ID")
    leaf_command(g, "list", "list approvals (a party sees its own)", _workload_list)


def _whole_number(maximum: int) -> Callable[[str], int]:
    """An argparse type: a whole number from 0 to ``maximum`` (a usage error otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not 0 <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be from 0 to {maximum}, not {value}")
        return value

    return parse


def _register_audit(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = command_group(sub, "audit", "the audit log")
    p = leaf_command(g, "list", "list audit records", _audit_list)
    p.add_argument(
        "--after",
        type=_whole_number(AUDIT_MAX_SEQUENCE),
        default=0,
        metavar="N",
        help="records after sequence N",
    )
    p.add_argument(
        "--limit",
        type=_whole_number(AUDIT_MAX_PAGE),
        default=0,
        metavar="N",
        help=f"at most N records (0: the broker's default page; at most {AUDIT_MAX_PAGE})",
    )
    leaf_command(
        g, "verify", "check the audit log's hash chain (exit 1 when broken)", _audit_verify
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "admin",
        help="manage EKs, AKs, golden PCR sets, parties, keys, KEKs, approvals, audit",
        description=(
            "The broker's admin client. Operators manage EKs, AKs, golden PCR sets and "
            "parties; parties register data keys and approve workloads. Connection options "
            "may also follow the subcommand."
        ),
    )
    connection_options(parser, leaf=False)
    groups = parser.add_subparsers(dest="admin_command", metavar="GROUP", required=True)
    for reg in (
        _register_ek,
        _register_ak,
        _register_golden,
        _register_party,
        _register_key,
        _register_kek,
        _register_workload,
        _register_audit,
    ):
        reg(groups)
    from broker.admin_status import register_status

    register_status(groups)


__all__ = [
    "AUDIT_MAX_PAGE",
    "AUDIT_MAX_SEQUENCE",
    "AdminUsageError",
    "PcrSpec",
    "golden_from_files",
    "golden_from_quote",
    "parse_pcr_spec",
    "register",
]

"""``cleanroom broker ...``: run and operate the key broker."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.quote import VerifiedQuote
    from broker.snp import SnpClaims
    from broker.tpmkeys import ParsedPublic
    from evidence.pcr import MeasurementEvent

Golden = dict[tuple[int, str], set[bytes]]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("broker", help="run the key broker and verify evidence")
    group = parser.add_subparsers(dest="broker_command", metavar="SUBCOMMAND", required=True)
    _register_init(group)
    _register_serve(group)
    from broker.kek_cli import register_kek
    from broker.migrate_cli import register_migrate

    register_migrate(group)
    register_kek(group)
    _register_verify_quote(group)


def _register_init(group: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = group.add_parser(
        "init",
        help="create the broker's database and KEK (once, before serve)",
        description=(
            "Creates what `broker serve` needs and says where it is: the database (migrated), "
            "the state directory with the local KEK and the registration key, and the KEKs' "
            "fingerprints in the database. Keeps and checks what exists; refuses a new KEK "
            "for a database that records another."
        ),
    )
    p.add_argument(
        "--config",
        "-c",
        type=Path,
        required=True,
        help="broker TOML file ([broker] and [keyvault] tables); relative paths in it are "
        "relative to its directory",
    )
    p.set_defaults(func=_init)


def _init(args: argparse.Namespace) -> int:
    from broker.app import init_broker
    from broker.config import load_broker_config
    from broker.kek_azure import load_key_vault_config

    config = load_broker_config(args.config)
    state = init_broker(config, key_vault=load_key_vault_config(args.config))
    print(f"database: {state.database} (schema {state.schema_revision})")
    print(f"state directory: {state.state_dir}")
    print(f"local KEK: {state.kek_file}")
    print(f"registration key: {state.registration_key_file}")
    for ref, fingerprint in sorted(state.kek_fingerprints.items()):
        print(f"KEK {ref}: fingerprint {fingerprint}")
    if state.created:
        print("created: " + ", ".join(state.created))
    else:
        print("nothing to create: the broker's state exists and matches")
    return 0


def _register_serve(group: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = group.add_parser(
        "serve",
        help="serve the attestation and admin services over mTLS",
        description=(
            "Runs the key broker: the attestation and admin services, health and reflection on "
            "one mTLS port, metrics over HTTP on another. Stops gracefully on SIGTERM or SIGINT."
        ),
    )
    p.add_argument(
        "--config",
        "-c",
        type=Path,
        help="broker TOML file ([broker] and [keyvault] tables); env overrides apply",
    )
    p.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="serve from N processes sharing the port (SO_REUSEPORT; about one core each; "
        "tls.listen needs a fixed port; metrics on the configured port + 0..N-1)",
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import logging

    from broker.config import load_broker_config
    from broker.kek_azure import load_key_vault_config
    from broker.server.logs import configure_logging
    from broker.server.server import ServerAddresses, serve

    config = load_broker_config(args.config)
    # Always read: [keyvault] may be absent (its defaults use the machine's Azure identity), and
    # the provider contacts Key Vault only when an azurekv: ref is used.
    key_vault = load_key_vault_config(args.config)
    from broker.server.logs import SDK_DEBUG

    # A server logs every call at INFO (its access log); -v adds DEBUG detail, -vv the Azure
    # SDK's HTTP lines too.
    level = (logging.INFO, logging.DEBUG, SDK_DEBUG)[min(args.verbose, 2)]
    configure_logging(json_output=args.log_json, level=level)

    def ready(addresses: ServerAddresses) -> None:
        print(f"broker listening on {addresses.grpc} (gRPC, mTLS)", flush=True)
        if addresses.metrics is not None:
            print(f"metrics on http://{addresses.metrics}/metrics", flush=True)

    if args.processes == 1:
        serve(config, on_ready=ready, key_vault=key_vault)
        return 0

    from broker.server.processes import serve_processes

    def all_ready(addresses: Sequence[ServerAddresses]) -> None:
        print(
            f"broker listening on {addresses[0].grpc} (gRPC, mTLS; {len(addresses)} processes)",
            flush=True,
        )
        for n, a in enumerate(addresses):
            if a.metrics is not None:
                print(f"metrics on http://{a.metrics}/metrics (process {n})", flush=True)

    serve_processes(
        config,
        processes=args.processes,
        on_ready=all_ready,
        key_vault=key_vault,
        log_json=args.log_json,
        log_level=level,
    )
    return 0


def _register_verify_quote(group: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = group.add_parser(
        "verify-quote",
        help="verify tpm2_quote output against an AK and golden values",
        description=(
            "Verifies a quote made by tpm2_quote (or the sidecar): magic, type, signature, "
            "qualifying data, PCR selection and digest, event log, golden values. Exits 0 only "
            "when everything holds."
        ),
    )
    p.add_argument(
        "--public",
        "-u",
        type=Path,
        help="AK public: tpm2_createak --public or PEM (optional with --hcl-report, which "
        "names the AK; given too, it must be the same key)",
    )
    p.add_argument("--message", "-m", required=True, type=Path, help="quote (TPMS_ATTEST)")
    p.add_argument("--signature", "-s", required=True, type=Path, help="signature (TPMT_SIGNATURE)")
    p.add_argument("--pcr", "-f", required=True, type=Path, help="tpm2_quote --pcr output")
    p.add_argument(
        "--pcr-format",
        choices=("auto", "serialized", "values"),
        default="auto",
        help="format of the --pcr file (default: detect)",
    )
    p.add_argument(
        "--qualification",
        "-q",
        required=True,
        help="the qualifying data as hex (what tpm2_quote --qualification was given)",
    )
    golden = p.add_mutually_exclusive_group()
    golden.add_argument(
        "--golden",
        type=Path,
        help='golden values, TOML or JSON: {"sha256": {"23": ["hex", ...]}}',
    )
    golden.add_argument(
        "--expect-pcr",
        action="append",
        default=[],
        metavar="BANK:INDEX=HEX",
        help="an accepted PCR value (repeatable; several for one PCR accept any of them)",
    )
    p.add_argument(
        "--require-pcr",
        action="append",
        default=[],
        metavar="BANK:INDEX[,INDEX...]",
        help="PCRs the quote must cover (repeatable; default sha256:23)",
    )
    p.add_argument("--event-log", type=Path, help="measurement event log (JSON)")
    p.add_argument(
        "--allow-unchecked-pem",
        action="store_true",
        help="accept a PEM AK even though its TPM attributes cannot be checked",
    )
    snp = p.add_argument_group("Azure SEV-SNP (the hardware root behind the vTPM)")
    snp.add_argument(
        "--hcl-report",
        type=Path,
        help="the vTPM's HCL report (NV index 0x01400001): the AK comes from its runtime claims",
    )
    snp.add_argument("--vcek", type=Path, help="the chip's VCEK (or VLEK) certificate, DER or PEM")
    snp.add_argument(
        "--amd-root",
        action="append",
        default=[],
        type=Path,
        metavar="PEM",
        help="an extra trusted AMD root (ARK with its ASK/ASVK), besides the pinned Milan, "
        "Genoa and Turin roots (repeatable)",
    )
    snp.add_argument(
        "--snp-fresh",
        action="store_true",
        help="require the report's user-data to be the digest of --qualification, as the "
        "sidecar writes it (off: evidence captured without it still verifies)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_verify_quote)


# --- argument parsing ----------------------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    from broker.errors import BrokerError

    try:
        return path.read_bytes()
    except OSError as e:
        raise BrokerError(f"cannot read {what} {path}: {e.strerror or e}") from e


def _bank_index(text: str) -> tuple[str, list[int]]:
    from broker.errors import BrokerError
    from evidence.pcr import BANK_SIZES

    bank, sep, indices = text.partition(":")
    bank = bank.strip().lower()
    if not sep or bank not in BANK_SIZES:
        raise BrokerError(f"{text!r}: expected BANK:INDEX with BANK one of {', '.join(BANK_SIZES)}")
    try:
        out = [int(i) for i in indices.split(",")]
    except ValueError:
        raise BrokerError(f"{text!r}: PCR indices must be integers") from None
    if any(not 0 <= i < 32 for i in out):
        raise BrokerError(f"{text!r}: PCR index out of range")
    return bank, out


def _hex(text: str, what: str) -> bytes:
    from broker.errors import BrokerError

    t = text.strip().lower()
    t = t.removeprefix("0x")
    try:
        return bytes.fromhex(t)
    except ValueError:
        raise BrokerError(f"{what} is not hex: {_shorten(text)}") from None


def _shorten(text: str, limit: int = 80) -> str:
    """``repr(text)``, cut to ``limit`` characters: error lines stay one readable line."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


def _pcr_value(bank: str, index: int, value: object, where: str) -> bytes:
    """One accepted value for ``bank:index``: hex of exactly the bank's digest size.

    A value of the wrong size could never match a quoted PCR, so it is refused here as what it
    is (a typo or a value from another bank) rather than reported later as a mismatch.
    """
    from broker.errors import BrokerError
    from evidence.pcr import BANK_SIZES

    label = f"{where}{bank}:{index}"
    if not isinstance(value, str):
        raise BrokerError(f"{label} value must be a hex string, not {type(value).__name__}")
    digest = _hex(value, f"{label} value")
    size = BANK_SIZES[bank]
    if len(digest) != size:
        n = len(digest)
        raise BrokerError(
            f"{label} value is {n} byte{'' if n == 1 else 's'}; {bank} values are {size} bytes"
        )
    return digest


# A golden document names PCR indices as table keys, so they are strings: digits only (int()
# would also take "2_3", " 23" or "+23").
_PCR_KEY = frozenset(str(i) for i in range(32))

_GOLDEN_EXAMPLE = '{"sha256": {"23": "HEX"}}'


def _golden_from_doc(doc: Any, source: str) -> Golden:
    """Reads a parsed golden document: ``{bank: {index: hex or [hex, ...]}}``.

    Raises:
        BrokerError: one line naming the first problem: not a table, an unknown bank, a PCR
            index that is not 0..31, a value that is not hex or not the bank's digest size, or
            a document (or bank) that names no PCR at all.
    """
    from broker.errors import BrokerError
    from evidence.pcr import BANK_SIZES

    if not isinstance(doc, Mapping):
        raise BrokerError(f"{source}: expected a table of banks, such as {_GOLDEN_EXAMPLE}")
    golden: Golden = {}
    for bank_key, pcrs in doc.items():
        bank = str(bank_key).strip().lower()
        if bank not in BANK_SIZES:
            raise BrokerError(
                f"{source}: unknown bank {_shorten(str(bank_key))} "
                f"(supported: {', '.join(BANK_SIZES)})"
            )
        if not isinstance(pcrs, Mapping):
            raise BrokerError(f"{source}: {bank} must map PCR indices to values")
        if not pcrs:
            raise BrokerError(f"{source}: {bank} names no PCR")
        for index_key, values in pcrs.items():
            if index_key not in _PCR_KEY:
                raise BrokerError(
                    f"{source}: {bank}: PCR index {_shorten(str(index_key))} is not an integer "
                    "from 0 to 31"
                )
            index = int(index_key)
            vals = [values] if isinstance(values, str) else values
            if not isinstance(vals, list) or not vals:
                raise BrokerError(f"{source}: {bank}:{index} needs a hex value or a list of them")
            golden.setdefault((index, bank), set()).update(
                _pcr_value(bank, index, v, f"{source}: ") for v in vals
            )
    if not golden:
        # An empty golden set would compare nothing and let every quote through as VALID.
        raise BrokerError(f"{source}: names no PCR; give at least one, such as {_GOLDEN_EXAMPLE}")
    return golden


def _parse_golden(data: bytes, path: Path) -> Any:
    """Parses a golden file as JSON, else as TOML. When it is neither, the error is the one of
    the format its suffix names (``.json``, ``.toml``), or both when the suffix names neither."""
    import tomllib

    from broker.errors import BrokerError

    try:
        return json.loads(data)
    except ValueError as e:  # also UnicodeDecodeError
        json_error = str(e)
    except RecursionError:
        json_error = "nested too deeply"
    try:
        return tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        toml_error = str(e)
    except RecursionError:
        toml_error = "nested too deeply"
    suffix = path.suffix.lower()
    if suffix == ".json":
        raise BrokerError(f"{path}: not valid JSON: {json_error}")
    if suffix == ".toml":
        raise BrokerError(f"{path}: not valid TOML: {toml_error}")
    raise BrokerError(f"{path}: neither JSON ({json_error}) nor TOML ({toml_error})")


def _load_golden(path: Path) -> Golden:
    from broker.errors import BrokerError

    data = _read(path, "golden file")
    if not data.strip():
        raise BrokerError(f"{path}: golden file is empty; it must name at least one PCR")
    return _golden_from_doc(_parse_golden(data, path), str(path))


def _expected(args: argparse.Namespace) -> Golden | None:
    from broker.errors import BrokerError

    if args.golden is not None:
        return _load_golden(args.golden)
    if not args.expect_pcr:
        return None
    golden: Golden = {}
    for item in args.expect_pcr:
        spec, sep, value = item.partition("=")
        bank, indices = _bank_index(spec)
        if not sep or len(indices) != 1:
            raise BrokerError(f"--expect-pcr {item!r}: expected BANK:INDEX=HEX")
        golden.setdefault((indices[0], bank), set()).add(
            _pcr_value(bank, indices[0], value, "--expect-pcr ")
        )
    return golden


def _load_event_log(path: Path, data: bytes) -> tuple[MeasurementEvent, ...]:
    """Reads the ``--event-log`` file. An empty file is refused: it would otherwise mean "no
    log", and the replay check would be skipped without a word.

    Raises:
        EventLogReplayError: the file is empty or malformed; the message names the file.
    """
    from broker import quote
    from broker.errors import EventLogReplayError

    if not data.strip():
        raise EventLogReplayError(
            f"event log {path} is empty; give the log the measurement wrote "
            "(cleanroom sidecar measure --log-out) or leave --event-log out"
        )
    try:
        return quote.event_log_from_json(data)
    except EventLogReplayError as e:
        # The library's messages say "event log ..." without knowing the file; name it.
        message = str(e)
        if message.startswith("event log "):
            message = message.removeprefix("event log ")
            raise EventLogReplayError(f"event log {path} {message}") from e
        raise EventLogReplayError(f"event log {path}: {message}") from e
    except RecursionError as e:
        raise EventLogReplayError(f"event log {path} is malformed: nested too deeply") from e
    except (OverflowError, ValueError, TypeError) as e:
        # event_log_from_json lets a few of these through (a size of 1e400 is a float that
        # int() cannot take); here they are one more malformed log.
        raise EventLogReplayError(f"event log {path} is malformed: {e}") from e


# --- the command ---------------------------------------------------------------------------


def _verify_quote(args: argparse.Namespace) -> int:
    from broker import quote, snp, tpmkeys
    from broker.errors import (
        BrokerError,
        GoldenValueError,
        KeyAttributeError,
        SnpError,
        VerificationError,
    )

    if args.public is None and args.hcl_report is None:
        raise BrokerError("give the AK with --public, or an --hcl-report that names it")
    if (args.hcl_report is None) != (args.vcek is None):
        raise BrokerError("--hcl-report and --vcek go together")
    if args.hcl_report is None and (args.amd_root or args.snp_fresh):
        raise BrokerError("--amd-root and --snp-fresh need --hcl-report")
    ak_bytes = _read(args.public, "AK public") if args.public is not None else None
    hcl = _read(args.hcl_report, "HCL report") if args.hcl_report is not None else None
    vcek = _read(args.vcek, "VCEK") if args.vcek is not None else None
    roots = snp.pinned_amd_roots()
    for path in args.amd_root:
        roots = roots + snp.load_amd_roots(_read(path, "AMD root"), what=str(path))
    attest = _read(args.message, "quote message")
    signature = _read(args.signature, "signature")
    pcr_file = _read(args.pcr, "PCR file")
    qualification = _hex(args.qualification, "--qualification")
    golden = _expected(args)
    required: dict[str, list[int]] = {}
    for item in args.require_pcr:
        bank, indices = _bank_index(item)
        required.setdefault(bank, []).extend(indices)
    event_log_bytes = _read(args.event_log, "event log") if args.event_log is not None else None

    warnings: list[str] = []
    ak: ParsedPublic | None = None
    verified: VerifiedQuote | None = None
    golden_report: list[tuple[str, str, bool]] = []
    claims: snp.SnpClaims | None = None
    try:
        if hcl is not None and vcek is not None:
            # The report is checked first: without --public, the AK that must have signed the
            # quote is the one the hardware-signed runtime claims name.
            claims = snp.verify_hcl_report(
                hcl_report=hcl,
                vcek=vcek,
                roots=roots,
                expected_user_data=snp.user_data_for(qualification) if args.snp_fresh else None,
            )
            hcl_ak = tpmkeys.load_public(_pem(claims.ak_public))
            if ak_bytes is not None:
                ak = tpmkeys.load_public(ak_bytes)
                snp.check_ak_binding(claims, ak.key)
                tpmkeys.check_ak_attributes(ak, allow_pem=args.allow_unchecked_pem)
            else:
                # The vTPM's own paravisor vouches for this key in the signed runtime claims,
                # so its TPM attributes are not needed to trust that it is the vTPM's AK.
                ak = hcl_ak
        else:
            assert ak_bytes is not None
            ak = tpmkeys.load_public(ak_bytes)
            tpmkeys.check_ak_attributes(ak, allow_pem=args.allow_unchecked_pem)
        if not ak.is_tpm_public and claims is None:
            warnings.append("AK given as PEM: its TPM attributes (restricted) are not checked")
        events = (
            None if event_log_bytes is None else _load_event_log(args.event_log, event_log_bytes)
        )
        pcr_values = quote.pcr_values_from_tools(
            pcr_file, attest=attest, pcr_format=args.pcr_format
        )
        verified = quote.verify_quote(
            ak=ak,
            attest=attest,
            signature=signature,
            pcr_values=pcr_values,
            expected_qualifying_data=qualification,
            required_pcrs=required or quote.DEFAULT_REQUIRED_PCRS,
            event_log=events,
        )
        if golden is not None:
            for key in sorted(golden):
                value = verified.pcr_values.get(key)
                golden_report.append(
                    (
                        quote.format_pcr(*key),
                        value.hex() if value is not None else "",
                        value in golden[key],
                    )
                )
            quote.check_golden(verified, golden)
        reason = None
    except GoldenValueError as e:
        reason = f"golden values: {e}"
    except KeyAttributeError as e:
        reason = f"AK refused: {e}"
    except SnpError as e:
        reason = f"SEV-SNP: {type(e).__name__}: {e}"
    except VerificationError as e:
        reason = str(e)
    _print_result(args, ak, verified, reason, golden_report, warnings, claims)
    return 0 if reason is None else 1


def _pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _print_result(
    args: argparse.Namespace,
    ak: ParsedPublic | None,
    verified: VerifiedQuote | None,
    reason: str | None,
    golden_report: Sequence[tuple[str, str, bool]],
    warnings: Sequence[str],
    claims: SnpClaims | None = None,
) -> None:
    if args.json:
        doc: dict[str, Any] = {"valid": reason is None}
        if ak is not None:
            doc["ak_key_id"] = ak.key_id
        if reason is not None:
            doc["reason"] = reason
        if warnings:
            doc["warnings"] = list(warnings)
        if verified is not None:
            doc.update(_verified_doc(verified))
        if golden_report:
            doc["golden"] = {pcr: {"value": v, "match": ok} for pcr, v, ok in golden_report}
        if claims is not None:
            doc["snp"] = claims.to_json()
            doc["runtime_claims"] = dict(claims.runtime_claims)
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    print("VALID" if reason is None else f"INVALID: {reason}")
    for w in warnings:
        print(f"warning: {w}")
    if ak is not None:
        print(f"AK: {ak.key_type.upper()}-{ak.key_bits} key id {ak.key_id}")
    if claims is not None:
        tcb = ", ".join(f"{k} {v}" for k, v in claims.reported_tcb.components().items())
        print(
            f"SEV-SNP: {claims.product} {claims.signing_key.upper()}, "
            f"report v{claims.report_version}"
        )
        print(f"  measurement {claims.measurement.hex()}")
        print(
            f"  policy 0x{claims.policy:x} (debug {'allowed' if claims.debug else 'off'}), "
            f"VMPL {claims.vmpl}"
        )
        print(f"  reported TCB: {tcb}")
        print(f"  vm-configuration: {json.dumps(dict(claims.vm_configuration), sort_keys=True)}")
    if verified is None:
        return
    c = verified.clock_info
    print(f"signer: {verified.qualified_signer.hex()}")
    print(f"signature: {verified.signature_scheme}/{verified.signature_hash}")
    print(
        f"clock: {c.clock} ms, reset_count {c.reset_count}, restart_count {c.restart_count}, "
        f"safe {'yes' if c.safe else 'no'}"
    )
    print(f"firmware: 0x{verified.firmware_version:016x}")
    print("PCRs:")
    matches = {pcr: ok for pcr, _, ok in golden_report}
    for (index, bank), value in verified.pcr_values.items():
        label = f"{bank}:{index}"
        note = ""
        if label in matches:
            note = "  golden: match" if matches[label] else "  golden: MISMATCH"
        print(f"  {label:<10} {value.hex()}{note}")
    quoted = {f"{b}:{i}" for i, b in verified.pcr_values}
    for pcr, _, _ in golden_report:
        if pcr not in quoted:
            print(f"  {pcr:<10} (not quoted)  golden: MISMATCH")
    if verified.event_log_banks:
        print(
            f"event log: {len(verified.event_log)} events, replays in "
            f"{', '.join(verified.event_log_banks)}"
        )
    print(f"evidence digest: {verified.evidence_digest}")


def _verified_doc(v: VerifiedQuote) -> dict[str, Any]:
    return {
        "pcrs": {f"{bank}:{index}": value.hex() for (index, bank), value in v.pcr_values.items()},
        "clock": {
            "clock": v.clock_info.clock,
            "reset_count": v.clock_info.reset_count,
            "restart_count": v.clock_info.restart_count,
            "safe": v.clock_info.safe,
        },
        "firmware_version": v.firmware_version,
        "qualified_signer": v.qualified_signer.hex(),
        "signature": {"scheme": v.signature_scheme, "hash": v.signature_hash},
        "event_log": {
            "events": len(v.event_log),
            "banks": list(v.event_log_banks),
        },
        "evidence_digest": v.evidence_digest,
    }

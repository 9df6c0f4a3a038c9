"""``cleanroom sidecar ...``: the attester and workload runtime inside the confidential VM.

``enroll``, ``measure`` and ``quote`` do with tpm2-pytss what the manual recipe did with
``tpm2_createek``/``tpm2_createak``, ``tpm2_pcrreset``/``tpm2_pcrextend`` and ``tpm2_quote``,
writing the same files, so ``tpm2_checkquote`` can check the result. ``run`` attests with the
broker and runs the workload beside its data (docs/sidecar-run.md); its runtime, which loads
gRPC and tpm2-pytss, is imported only when ``run`` is invoked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evidence.launch import Launch
    from evidence.pcr import Measurement
    from sidecar.config import TpmConfig
    from sidecar.runconfig import RunConfig


def _add_tpm_options(parser: argparse.ArgumentParser, *, default: Any) -> None:
    parser.add_argument(
        "--config", metavar="FILE", default=default, help="sidecar config file (TOML, [tpm])"
    )
    parser.add_argument(
        "--tcti",
        metavar="TCTI",
        default=default,
        help="TPM TCTI, e.g. swtpm:host=127.0.0.1,port=2321 (default: $CLEANROOM_SIDECAR_TPM_TCTI,"
        " the config file, $TPM2TOOLS_TCTI, then device:/dev/tpmrm0)",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("sidecar", help="TPM attester and workload runtime")
    # Accepted both before the subcommand (cleanroom sidecar --tcti T quote ...) and after it;
    # the subcommands' copies default to SUPPRESS so they do not overwrite the group's value.
    _add_tpm_options(parser, default=None)
    group = parser.add_subparsers(dest="sidecar_command", metavar="SUBCOMMAND", required=True)

    enroll = group.add_parser(
        "enroll", help="create or load the EK and AK and write the enrollment material"
    )
    _add_tpm_options(enroll, default=argparse.SUPPRESS)
    enroll.add_argument(
        "--out",
        metavar="DIR",
        help="write ek.pub, ek.crt (if the TPM has one), ak.pub, ak.pem and ak.name here",
    )
    enroll.set_defaults(func=_enroll)

    measure = group.add_parser("measure", help="measure files into PCR 23 and print the PCR values")
    _add_tpm_options(measure, default=argparse.SUPPRESS)
    measure.add_argument(
        "--offline",
        action="store_true",
        help="compute the PCR 23 values without a TPM (what a party computes as golden values)",
    )
    measure.add_argument("--log-out", metavar="FILE", help="write the event log here as JSON")
    measure.add_argument(
        "--command",
        metavar='"CMD"',
        help="measure this launch after the files, as 'sidecar run' does: one shell-quoted "
        "string whose first word is an absolute path",
    )
    measure.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a variable of the launch's environment (repeatable; with --command)",
    )
    measure.add_argument(
        "--workdir",
        metavar="DIR",
        help="the launch's working directory, the workload root (default: the current one)",
    )
    measure.add_argument(
        "--interpreter-sha256",
        metavar="HEX",
        help="the executable's SHA-256, when the executable is not on this machine",
    )
    measure.add_argument("files", metavar="FILE", nargs="+", help="files in measurement order")
    measure.set_defaults(func=_measure)

    quote = group.add_parser("quote", help="quote PCR 23 with a nonce into tpm2_quote-format files")
    _add_tpm_options(quote, default=argparse.SUPPRESS)
    quote.add_argument(
        "--nonce",
        metavar="HEX",
        required=True,
        help="qualifying data in hex, used as is (tpm2_checkquote --qualification HEX)",
    )
    quote.add_argument(
        "--out", metavar="DIR", required=True, help="write quote.msg, quote.sig, quote.pcrs here"
    )
    quote.set_defaults(func=_quote)

    run = group.add_parser(
        "run",
        help="attest, then run the workload with plaintext over a local socket",
        description="Measure the workload's files and its launch ([workload] command and env) "
        "into PCR 23, attest with the broker, receive the inputs' data keys, and run exactly "
        "the measured command with its inputs served as plaintext over a private Unix socket "
        "(CLEANROOM_WORKLOAD_SOCKET); outputs are sealed to the approved recipients. A "
        "COMMAND after '--' must equal [workload] command. Exits with the workload's exit "
        "status. See docs/sidecar-run.md.",
        usage="%(prog)s [-h] (--config FILE [--tcti TCTI] | --prepared PATH) "
        "[-- COMMAND [ARGS ...]]",
    )
    _add_tpm_options(run, default=argparse.SUPPRESS)
    run.add_argument(
        "--prepared",
        metavar="PATH",
        help="have the prepared sidecar listening at PATH ('sidecar serve') do the run, with "
        "its config; this process only passes its stdin/stdout/stderr and waits",
    )
    run.add_argument(
        "command", metavar="COMMAND", nargs=argparse.REMAINDER, help="the workload and its args"
    )
    run.set_defaults(func=_run)

    serve = group.add_parser(
        "serve",
        help="prepare 'sidecar run' ahead of time and serve runs on a control socket",
        description="Import what 'sidecar run' needs and load the config once, then wait on a "
        "control Unix socket: each 'cleanroom sidecar run --prepared PATH' is run by a fresh "
        "child forked from this process, exactly as 'sidecar run --config FILE' would run it. "
        "Holds no TPM context, broker connection or key while waiting. See "
        "docs/sidecar-run.md.",
    )
    _add_tpm_options(serve, default=argparse.SUPPRESS)
    serve.add_argument(
        "--control",
        metavar="PATH",
        help="the control socket (default: $XDG_RUNTIME_DIR/cleanroom-sidecar/control, else "
        "/tmp/cleanroom-sidecar-UID/control); its directory is created 0700",
    )
    serve.set_defaults(func=_serve)


def _config(args: argparse.Namespace) -> TpmConfig:
    from sidecar.config import load_tpm_config

    # Without -v, keep the TSS library's own stderr logging quiet: the CLI reports a failure
    # in one line, and the TSS would add several for, say, a TPM that is not listening.
    if not getattr(args, "verbose", 0):
        os.environ.setdefault("TSS2_LOG", "all+NONE")
    return load_tpm_config(args.config, tcti=args.tcti)


def _run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if args.prepared:
        if args.config or args.tcti:
            from cleanroom.config import ConfigError

            raise ConfigError(
                "sidecar run --prepared uses the prepared sidecar's config; drop --config/--tcti"
            )
        # Only the standard library: the point is to start the workload without the imports.
        from sidecar.control import run_prepared

        return run_prepared(args.prepared, command, verbose=getattr(args, "verbose", 0))
    if not args.config:
        from cleanroom.config import ConfigError

        raise ConfigError("sidecar run needs --config FILE (sidecar.toml; see docs/sidecar-run.md)")
    if not getattr(args, "verbose", 0):
        os.environ.setdefault("TSS2_LOG", "all+NONE")
    from sidecar.runconfig import load_run_config

    return run_configured(load_run_config(args.config, tcti=args.tcti), command)


def run_configured(config: RunConfig, command: list[str]) -> int:
    """``sidecar run`` with its config loaded: runs the workload, prints the one-line summary,
    returns the workload's exit status (the prepared sidecar's run children call it too).

    Raises:
        RunError: and the other errors of :func:`sidecar.run.run_workload`.
    """
    # Imported only now: the runtime pulls in gRPC and tpm2-pytss, which the other commands
    # (and --help) do not need.
    from sidecar.run import run_workload

    result = run_workload(config, command)
    if result.exit_code == 0:
        # The workload's own output is its business; this one line says what the sidecar did.
        outputs = ", ".join(sorted(result.outputs)) or "none"
        sessions = ", ".join(result.session_ids) or "none"
        print(
            f"cleanroom: workload exited 0; sealed {len(result.outputs)} output(s) ({outputs}); "
            f"session {sessions}",
            file=sys.stderr,
        )
    return result.exit_code


def _serve(args: argparse.Namespace) -> int:
    if not args.config:
        from cleanroom.config import ConfigError

        raise ConfigError(
            "sidecar serve needs --config FILE (sidecar.toml; see docs/sidecar-run.md)"
        )
    if not getattr(args, "verbose", 0):
        os.environ.setdefault("TSS2_LOG", "all+NONE")
    from sidecar.runconfig import load_run_config

    config = load_run_config(args.config, tcti=args.tcti)
    from cleanroom.handler import call_handler
    from sidecar.run.prepared import default_control_path, serve

    def run(config: RunConfig, argv: list[str], verbose: int) -> int:
        return call_handler(lambda: run_configured(config, argv), verbose=verbose)

    control = Path(args.control) if args.control else default_control_path()
    return serve(config, control.absolute(), run=run)


def _enroll(args: argparse.Namespace) -> int:
    from sidecar.attester import enroll_material

    config = _config(args)
    material = enroll_material(config)
    ek, ak = material.ek, material.ak
    where = (
        f"persistent handle 0x{ak.handle:08x}"
        if ak.handle is not None
        else f"key blob {config.ak_context_file}"
    )
    print(f"AK name: {ak.name_hex}")
    print(
        f"AK: {ak.algorithm.upper()} restricted signing key at {where} "
        f"({'created' if ak.created else 'existing'})"
    )
    cert = (
        f"certificate from NV 0x{ek.certificate_index:08x}"
        if ek.certificate is not None
        else f"no certificate at NV 0x{ek.certificate_index:08x}"
    )
    print(f"EK: {ek.algorithm.upper()}, name {ek.name_hex}, {cert}")
    if args.out:
        from sidecar.tpm.files import write_enrollment_files

        files = write_enrollment_files(ek, ak, args.out)
        written = [files.ek_public, files.ek_certificate, files.ak_public, files.ak_pem]
        written.append(files.ak_name)
        print("wrote: " + ", ".join(str(p) for p in written if p is not None))
    return 0


def _event_log_json(measurement: Measurement, banks: tuple[str, ...]) -> str:
    from evidence.eventlog import event_to_json

    doc = {
        "banks": list(banks),
        "events": [event_to_json(e, banks) for e in measurement.events],
        "pcrs": {bank: measurement.pcrs[bank].hex() for bank in banks},
    }
    return json.dumps(doc, indent=2) + "\n"


def _launch(args: argparse.Namespace) -> Launch | None:
    """The launch of ``--command``/``--env``/``--workdir``/``--interpreter-sha256``, or None.

    Raises:
        LaunchError: a malformed command, variable, directory or digest.
        MeasurementError: the executable cannot be read (and no digest was given).
    """
    from evidence.errors import LaunchError
    from evidence.launch import (
        Launch,
        digest_executable,
        parse_command,
        parse_env_assignments,
    )

    if not args.command:
        if args.env or args.workdir or args.interpreter_sha256:
            raise LaunchError("--env, --workdir and --interpreter-sha256 need --command")
        return None
    argv = parse_command(args.command)
    env = parse_env_assignments(args.env)
    workdir = os.path.abspath(args.workdir or os.getcwd())
    if args.interpreter_sha256:
        try:
            digest = bytes.fromhex(args.interpreter_sha256)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise LaunchError("--interpreter-sha256 must be 64 hexadecimal digits")
    else:
        digest = digest_executable(argv[0])
    return Launch.create(argv=argv, executable_sha256=digest, env=env, cwd=workdir)


def _measure(args: argparse.Namespace) -> int:
    from evidence.pcr import WORKLOAD_PCR, measure_files

    config = _config(args)
    launch = _launch(args)
    if args.offline:
        measurement = measure_files(args.files, config.banks, launch=launch)
    else:
        from sidecar.attester import measure_manifest

        measurement = measure_manifest(config, args.files, launch=launch)
    for bank in config.banks:
        print(f"{bank}:{WORKLOAD_PCR} 0x{measurement.pcrs[bank].hex().upper()}")
    if args.log_out:
        from sidecar.tpm.files import write_file

        write_file(Path(args.log_out), _event_log_json(measurement, config.banks).encode())
    return 0


def _quote(args: argparse.Namespace) -> int:
    from sidecar.errors import InvalidNonceError

    try:
        nonce = bytes.fromhex(args.nonce)
    except ValueError:
        raise InvalidNonceError(
            "--nonce must be an even number of hexadecimal digits (1 to 64 bytes)"
        ) from None
    from sidecar.attester import make_quote
    from sidecar.tpm.files import write_tools_quote_files

    config = _config(args)
    result = make_quote(config, nonce=nonce)
    files = write_tools_quote_files(result, args.out)
    # What the TPM actually quoted (read from the signed TPMS_ATTEST), not what was asked for.
    by_bank: dict[str, list[int]] = {}
    for index, bank in result.pcr_order:
        by_bank.setdefault(bank, []).append(index)
    quoted = "+".join(f"{bank}:{','.join(map(str, pcrs))}" for bank, pcrs in by_bank.items())
    print(f"quoted {quoted} with qualifying data {nonce.hex()}")
    print(f"wrote: {files.message}, {files.signature}, {files.pcrs}")
    return 0

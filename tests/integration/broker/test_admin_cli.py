"""``cleanroom admin`` against a real ``cleanroom broker serve`` process (mTLS, SQLite).

Certificates come from ``init_pki``; TPM files from tpm2-tools on a real swtpm. Most commands
run in-process through ``cleanroom.app.cli.main`` (what the console script runs); the ones whose
exit status and stderr matter run as subprocesses of the installed ``cleanroom`` script. The
commands are the ones shown in docs/admin-cli.md.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cleanroom.app.cli import main
from evidence.launch import Launch, encode_launch
from pki.ca import PkiLayout, init_pki
from tests.harness.swtpm import Swtpm
from tests.support.admin import (
    admin,
    admin_env,
    admin_fails,
    admin_json,
    approve_argv,
    use_admin_env,
)
from tests.support.broker import spawn_broker as support_spawn_broker
from tests.vectors import tpm2tools

CLEANROOM = Path(sys.executable).parent / "cleanroom"


@dataclass
class Broker:
    proc: subprocess.Popen[bytes]
    address: str
    pki: PkiLayout
    workdir: Path

    def env(self, who: str = "operator") -> dict[str, str]:
        """The environment that points ``cleanroom admin`` at this broker as ``who``
        (``operator`` or ``party-<name>``)."""
        kind, _, name = who.partition("-")
        return admin_env(self.pki, self.address, kind, name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def spawn_broker(config: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Runs ``cleanroom broker init`` and starts ``cleanroom broker serve --config CONFIG``
    (the launcher of tests/support), waiting for its listening line.

    Returns the process and the address it listens on; stderr goes to ``workdir/broker.log``.
    """
    spawned = support_spawn_broker(config, workdir, log_json=False, stderr_name="broker.log")
    return spawned.proc, spawned.grpc_address


def start_broker(workdir: Path) -> Broker:
    """Starts a broker on a free loopback port (port 0; the address is read from its output)."""
    pki = init_pki(workdir / "pki")
    cert, key = pki.cert_and_key("broker")
    config = workdir / "broker.toml"
    config.write_text(
        "\n".join(
            [
                "[broker]",
                f'database_url = "sqlite:///{workdir / "broker.db"}"',
                f'state_dir = "{workdir / "state"}"',
                # Every quote must cover PCR 0, so golden sets may name it.
                "boot_pcrs = [0]",
                "[broker.tls]",
                'listen = "127.0.0.1:0"',
                f'cert_file = "{cert}"',
                f'key_file = "{key}"',
                f'ca_file = "{pki.ca_cert}"',
                "[broker.metrics]",
                "enabled = false",
            ]
        )
        + "\n"
    )
    proc, address = spawn_broker(config, workdir)
    return Broker(proc=proc, address=address, pki=pki, workdir=workdir)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = start_broker(tmp_path_factory.mktemp("broker"))
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def as_operator(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> Broker:
    use_admin_env(monkeypatch, broker.env("operator"))
    return broker


def party(broker: Broker, name: str) -> list[str]:
    cert, key = broker.pki.cert_and_key("party", name)
    return ["--cert", str(cert), "--key", str(key)]


def pcr_chain(bank: str, contents: list[bytes]) -> str:
    pcr = bytes(hashlib.new(bank).digest_size)
    for c in contents:
        pcr = hashlib.new(bank, pcr + hashlib.new(bank, c).digest()).digest()
    return pcr.hex()


# --- EKs and AKs ----------------------------------------------------------------------------


@pytest.mark.swtpm
@pytest.mark.tpm2tools
def test_operator_enrolls_aks_from_tpm2b_and_pem_lists_and_revokes(
    as_operator: Broker, swtpm: Swtpm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ek = tpm2tools.create_ek(swtpm, tmp_path)
    ak = tpm2tools.create_ak(swtpm, tmp_path, ek)
    # A second AK, its public written as PEM by tpm2_createak --format pem.
    ak2_pem = tmp_path / "ak2.pem"
    try:
        swtpm.tools(
            "tpm2_createak",
            *("-C", str(ek.context), "-c", str(tmp_path / "ak2.ctx")),
            *("-G", "ecc", "-g", "sha256", "-s", "ecdsa"),
            *("-u", str(ak2_pem), "-f", "pem", "-n", str(tmp_path / "ak2.name")),
        )
    finally:
        tpm2tools.flush(swtpm)
    assert ak2_pem.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")

    enrolled_ek = admin_json(capsys, "ek", "enroll", "--public", str(ek.public), "--no-certificate")
    assert isinstance(enrolled_ek, dict)
    ek_id = enrolled_ek["ek_id"]
    out = admin(capsys, "ak", "enroll", "--public", str(ak.public), "--ek", ek_id)
    assert ak.name is not None
    ak_name = ak.name.read_bytes().hex()  # the name tpm2_createak computed
    assert f"AK name:     {ak_name}\n" in out
    pem_doc = admin_json(capsys, "ak", "enroll", "--public", str(ak2_pem))
    assert isinstance(pem_doc, dict) and pem_doc["enrolled_by"] == "operator"
    pem_name = pem_doc["ak_name"]

    listed = admin_json(capsys, "ak", "list")
    assert isinstance(listed, list)
    by_name = {a["ak_name"]: a for a in listed}
    assert by_name[ak_name]["ek_id"] == ek_id and by_name[ak_name]["revoked"] is False
    assert pem_name in by_name
    table = admin(capsys, "ak", "list")
    assert table.splitlines()[0].split()[:2] == ["AK", "NAME"]
    assert any(line.startswith(ak_name) for line in table.splitlines())

    assert admin(capsys, "ak", "revoke", ak_name, "--reason", "decommissioned") == (
        f"revoked AK {ak_name}\n"
    )
    after = {a["ak_name"]: a["revoked"] for a in admin_json(capsys, "ak", "list")}
    assert after[ak_name] is True and after[pem_name] is False

    eks = admin_json(capsys, "ek", "list")
    assert isinstance(eks, list) and [e["ek_id"] for e in eks] == [ek_id]
    admin(capsys, "ek", "revoke", ek_id, "--reason", "test")
    assert admin_json(capsys, "ek", "list")[0]["revoked"] is True

    # Enrolling the same AK again is a clear ALREADY_EXISTS.
    err = admin_fails(capsys, "ak", "enroll", "--public", str(ak2_pem))
    assert "[ALREADY_EXISTS]" in err


def test_party_certificate_cannot_enroll_an_ak(broker: Broker, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "ak.pem").write_bytes(pem)
    proc = subprocess.run(
        [str(CLEANROOM), "admin", "ak", "enroll", "--public", str(tmp_path / "ak.pem")],
        env=broker.env("party-advertiser"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == (
        "cleanroom: error: EnrollAk: permission denied: /cleanroom.v1.AdminService/EnrollAk "
        "needs the operator role [PERMISSION_DENIED]\n"
    )


# --- golden PCR sets ------------------------------------------------------------------------


def test_golden_set_from_values_and_files(
    as_operator: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    boot = "5a" * 32
    admin(
        capsys,
        "golden",
        "set",
        "literal",
        "--pcr",
        f"sha256:0={boot}",
        "--pcr",
        f"sha256:0={'5b' * 32}",
    )
    (tmp_path / "train.py").write_bytes(b"print('train')\n")
    (tmp_path / "model.cfg").write_bytes(b"depth = 4\n")
    files = [str(tmp_path / "train.py"), str(tmp_path / "model.cfg")]
    out = admin(capsys, "golden", "set", "measured", "--from-files", *files)
    contents = [b"print('train')\n", b"depth = 4\n"]
    assert f"sha1:23    {pcr_chain('sha1', contents)}" in out
    assert f"sha256:23  {pcr_chain('sha256', contents)}" in out

    sets = admin_json(capsys, "golden", "list")
    assert isinstance(sets, list)
    by_name = {g["name"]: g for g in sets}
    assert sorted(v["value"] for v in by_name["literal"]["values"]) == [boot, "5b" * 32]
    assert {(v["bank"], v["pcr"], v["value"]) for v in by_name["measured"]["values"]} == {
        ("sha1", 23, pcr_chain("sha1", contents)),
        ("sha256", 23, pcr_chain("sha256", contents)),
    }

    assert admin(capsys, "golden", "delete", "literal") == "deleted golden set literal\n"
    names = [g["name"] for g in admin_json(capsys, "golden", "list")]
    assert "literal" not in names and "measured" in names
    err = admin_fails(capsys, "golden", "delete", "literal")
    assert "[NOT_FOUND]" in err

    # PCR 7 is neither PCR 23 nor one of the broker's boot_pcrs: no quote is sure to cover it.
    err = admin_fails(capsys, "golden", "set", "secure-boot", "--pcr", f"sha256:7={boot}")
    assert "[INVALID_ARGUMENT]" in err
    assert "names PCR 7, which no quote is sure to cover: quotes cover PCR 0, 23" in err


@pytest.mark.swtpm
@pytest.mark.tpm2tools
def test_golden_set_from_a_reference_quote(
    as_operator: Broker, swtpm: Swtpm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ek = tpm2tools.create_ek(swtpm, tmp_path)
    ak = tpm2tools.create_ak(swtpm, tmp_path, ek)
    tpm2tools.reset_pcr23(swtpm)
    tpm2tools.measure(swtpm, [("train.py", b"train"), ("data.csv", b"a,b\n")])
    expected = {bank: pcr_chain(bank, [b"train", b"a,b\n"]) for bank in ("sha1", "sha256")}
    for fmt in ("serialized", "values"):
        d = tmp_path / fmt
        d.mkdir()
        tpm2tools.quote(swtpm, d, ak, pcr_format=fmt)
        doc = admin_json(capsys, "golden", "set", f"ref-{fmt}", "--from-quote", str(d))
        assert isinstance(doc, dict)
        assert {(v["bank"], v["pcr"], v["value"]) for v in doc["values"]} == {
            ("sha1", 23, expected["sha1"]),
            ("sha256", 23, expected["sha256"]),
        }

    # A values file from another quote (PCR 23 extended since) is caught.
    tpm2tools.measure(swtpm, [("extra", b"x")])
    other = tmp_path / "other"
    other.mkdir()
    tpm2tools.quote(swtpm, other, ak)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "quote.msg").write_bytes((tmp_path / "serialized" / "quote.msg").read_bytes())
    (mixed / "quote.pcrs").write_bytes((other / "quote.pcrs").read_bytes())
    err = admin_fails(capsys, "golden", "set", "mixed", "--from-quote", str(mixed))
    assert "does not match the PCR digest" in err

    # A genuine TPM attest that is not a quote (tpm2_certify) is refused by name.
    attest, _ = tpm2tools.certify(swtpm, tmp_path, ak)
    (mixed / "quote.msg").write_bytes(attest.read_bytes())
    err = admin_fails(capsys, "golden", "set", "mixed", "--from-quote", str(mixed))
    assert "is not a TPM quote" in err


# --- parties, keys, approvals ---------------------------------------------------------------


def test_party_registers_a_key_and_approves_a_workload(
    as_operator: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = as_operator
    for name in ("advertiser", "publisher"):
        assert main(["keygen", "--out", str(tmp_path / name)]) == 0
        capsys.readouterr()
        out = admin(capsys, "party", "add", name, "--public-key", str(tmp_path / f"{name}.pub"))
        assert out.startswith(f"party:       {name}\n")
    parties = admin_json(capsys, "party", "list")
    assert isinstance(parties, list)
    assert sorted(p["name"] for p in parties) == ["advertiser", "publisher"]

    # The party seals its dataset with a fresh data key and keeps the key for registration.
    (tmp_path / "impressions.csv").write_bytes(b"user,ad\n1,7\n")
    assert (
        main(
            [
                "seal",
                str(tmp_path / "impressions.csv"),
                "-o",
                str(tmp_path / "impressions.csv.sealed"),
                "-r",
                str(tmp_path / "advertiser.pub"),
                "--key-id",
                "advertiser-2024",
                "--data-key-out",
                str(tmp_path / "advertiser.datakey"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    data_key = (tmp_path / "advertiser.datakey").read_bytes()
    assert len(data_key) == 32
    adv = party(broker, "advertiser")
    out = admin(
        capsys,
        *adv,
        "key",
        "register",
        "--key-id",
        "advertiser-2024",
        "--data-key",
        str(tmp_path / "advertiser.datakey"),
        "--description",
        "ad impressions",
    )
    assert "key id:     advertiser-2024\nowner:      advertiser\n" in out
    assert data_key.hex() not in out
    keys = admin_json(capsys, *adv, "key", "list")
    assert keys == [
        {
            "key_id": "advertiser-2024",
            "owner": "advertiser",
            "description": "ad impressions",
            "kek_ref": "local",
            "created_at": keys[0]["created_at"],
        }
    ]
    err = admin_fails(
        capsys,
        *adv,
        "key",
        "register",
        "--key-id",
        "advertiser-2024",
        "--data-key",
        str(tmp_path / "advertiser.datakey"),
    )
    assert "[ALREADY_EXISTS]" in err

    workload = tmp_path / "workload"
    (workload / "src").mkdir(parents=True)
    (workload / "src" / "train.py").write_bytes(b"import model\n")
    (workload / "requirements.txt").write_bytes(b"numpy\n")
    contents = [b"import model\n", b"numpy\n"]
    # The launch: the image's interpreter (pinned, it is not on this machine) and the script.
    interpreter = hashlib.sha256(b"the image's python3").hexdigest()
    launch_options = [
        "--command",
        "/usr/bin/python3 src/train.py --epochs 3",
        "--env",
        "LANG=C.UTF-8",
        "--workdir",
        "/srv/workload",
        "--interpreter-sha256",
        interpreter,
    ]
    launch = encode_launch(
        Launch.create(
            argv=("/usr/bin/python3", "src/train.py", "--epochs", "3"),
            executable_sha256=bytes.fromhex(interpreter),
            env={"LANG": "C.UTF-8"},
            cwd="/srv/workload",
        )
    )
    out = admin(
        capsys,
        *adv,
        *approve_argv("lookalike-model", "advertiser-2024", "advertiser", "publisher"),
        "--file",
        str(workload / "src" / "train.py"),
        str(workload / "requirements.txt"),
        "--root",
        str(workload),
        *launch_options,
    )
    fields = dict(line.split(": ", 1) for line in out.splitlines())
    approval_id = fields["approval id"].strip()
    assert fields["sha256:23"].strip() == pcr_chain("sha256", [*contents, launch])
    assert fields["sha1:23"].strip() == pcr_chain("sha1", [*contents, launch])
    assert fields["command"].strip() == "/usr/bin/python3 src/train.py --epochs 3"
    assert fields["environment"].strip() == "LANG=C.UTF-8"

    approvals = admin_json(capsys, *adv, "workload", "list")
    assert isinstance(approvals, list)
    (approval,) = approvals
    assert approval["approval_id"] == approval_id
    assert approval["output_recipients"] == ["advertiser", "publisher"]
    assert [e["path"] for e in approval["manifest"]["entries"]] == [
        "src/train.py",
        "requirements.txt",
    ]
    # The JSON manifest of an approval is accepted back by --manifest (same digests, same PCR).
    (tmp_path / "manifest.json").write_text(json.dumps(approval["manifest"]))
    again = admin_json(
        capsys,
        *adv,
        *approve_argv("lookalike-model", "advertiser-2024", "advertiser"),
        "--manifest",
        str(tmp_path / "manifest.json"),
        *launch_options,
    )
    assert isinstance(again, dict)
    assert again["expected_pcrs"] == approval["expected_pcrs"]

    # The operator sees both approvals; the other party sees none of them.
    assert len(admin_json(capsys, "workload", "list")) == 2
    assert admin_json(capsys, *party(broker, "publisher"), "workload", "list") == []

    assert admin(capsys, *adv, "workload", "revoke", approval_id) == (
        f"revoked approval {approval_id}\n"
    )
    revoked = {a["approval_id"]: a["revoked"] for a in admin_json(capsys, *adv, "workload", "list")}
    assert revoked[approval_id] is True and list(revoked.values()).count(False) == 1

    # Only the owner may approve its keys.
    err = admin_fails(
        capsys,
        *party(broker, "publisher"),
        *approve_argv("w", "advertiser-2024", "publisher"),
        "--manifest",
        str(tmp_path / "manifest.json"),
        *launch_options,
    )
    assert "[PERMISSION_DENIED]" in err or "[NOT_FOUND]" in err

    records = admin_json(capsys, "audit", "list")
    assert isinstance(records, list)
    actions = [r["action"] for r in records]
    assert len(actions) >= 5
    sequences = [r["sequence"] for r in records]
    assert sequences == sorted(sequences)
    page = admin_json(capsys, "audit", "list", "--after", str(sequences[1]), "--limit", "2")
    assert [r["sequence"] for r in page] == sequences[2:4]


def test_unreachable_broker_is_one_line(
    as_operator: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.harness.net import free_port

    err = admin_fails(
        capsys, "--broker", f"127.0.0.1:{free_port()}", "--timeout", "2", "ak", "list"
    )
    assert "[UNAVAILABLE]" in err


# --- audit ----------------------------------------------------------------------------------


def test_audit_verify_passes_and_detects_tampering(tmp_path: Path) -> None:
    broker = start_broker(tmp_path)
    try:
        env = broker.env("operator")
        ok = [str(CLEANROOM), "admin", "golden", "set", "g", "--pcr", f"sha256:23={'ab' * 32}"]
        for argv in (ok, ok):
            subprocess.run(argv, env=env, check=True, capture_output=True, timeout=60)
        verify = [str(CLEANROOM), "admin", "audit", "verify"]
        proc = subprocess.run(verify, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("audit log intact: ")

        # Alter a record behind the broker's back: the chain no longer verifies.
        with sqlite3.connect(broker.workdir / "broker.db") as db:
            db.execute("UPDATE audit_records SET reason = 'nothing happened' WHERE sequence = 1")
        proc = subprocess.run(verify, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1
        assert proc.stdout == ""
        assert proc.stderr.startswith("cleanroom: error: audit log chain is broken at sequence 1")
        assert proc.stderr.count("\n") == 1
        proc = subprocess.run(
            [*verify, "--json"], env=env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 1
        report = json.loads(proc.stdout)
        assert report["valid"] is False and report["first_bad_sequence"] == 1
    finally:
        broker.stop()

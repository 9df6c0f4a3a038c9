"""``cleanroom admin``: argument handling, manifest and golden-value building, output formats.

Commands run through ``cleanroom.app.cli.main`` (exactly what the console script runs) against the
scripted fake broker, a real gRPC server over mTLS; expected PCR values are computed here
independently with hashlib.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from broker.admin_cli import (
    AUDIT_MAX_PAGE,
    AUDIT_MAX_SEQUENCE,
    AdminUsageError,
    PcrSpec,
    golden_from_files,
    golden_from_quote,
    parse_pcr_spec,
)
from broker.admin_common import format_fields, format_table
from broker.keyseal import open_registered_key
from broker.manifests import manifest_from_files, manifest_from_json
from broker.server.validate import MAX_AUDIT_PAGE, MAX_AUDIT_SEQUENCE
from cleanroom.app.cli import build_parser, main
from cleanroom.v1 import admin_pb2, common_pb2
from evidence.launch import Launch, encode_launch
from evidence.manifest import ManifestEntry, expected_pcr23
from evidence.proto import manifest_to_pb
from pki.ca import PkiLayout
from sealing.keys import generate_recipient_key, write_data_key, write_public_key
from tests.support.admin import approve_argv
from tests.support.fake_broker import RunningFake

SHA256_A = "aa" * 32
SHA1_B = "bb" * 20


def pcr_chain(bank: str, contents: list[bytes], launch: bytes | None = None) -> bytes:
    """PCR 23 after extending each content's digest, from zeros, then the launch encoding's
    digest when given: computed independently of the product's replay."""
    size = hashlib.new(bank).digest_size
    pcr = bytes(size)
    for c in [*contents, *([launch] if launch is not None else [])]:
        pcr = hashlib.new(bank, pcr + hashlib.new(bank, c).digest()).digest()
    return pcr


#: A pinned interpreter digest (the approving machine need not have the image's Python).
PINNED = hashlib.sha256(b"the image's python").hexdigest()
LAUNCH_OPTIONS = (
    "--command",
    "/usr/bin/python3 train.py --depth '3 4'",
    "--env",
    "LANG=C.UTF-8",
    "--workdir",
    "/srv/workload",
    "--interpreter-sha256",
    PINNED,
)


def pinned_launch_encoding() -> bytes:
    return encode_launch(
        Launch.create(
            argv=("/usr/bin/python3", "train.py", "--depth", "3 4"),
            executable_sha256=bytes.fromhex(PINNED),
            env={"LANG": "C.UTF-8"},
            cwd="/srv/workload",
        )
    )


@pytest.fixture
def fake(module_fake: RunningFake, monkeypatch: pytest.MonkeyPatch) -> RunningFake:
    """The fake broker, reset, with the operator's connection in the environment."""
    module_fake.fake.reset()
    cert, key = module_fake.layout.cert_and_key("operator")
    monkeypatch.setenv("CLEANROOM_ADMIN_BROKER", module_fake.target)
    monkeypatch.setenv("CLEANROOM_ADMIN_CERT", str(cert))
    monkeypatch.setenv("CLEANROOM_ADMIN_KEY", str(key))
    monkeypatch.setenv("CLEANROOM_ADMIN_CA", str(module_fake.layout.ca_cert))
    return module_fake


def party_options(layout: PkiLayout, name: str = "advertiser") -> list[str]:
    cert, key = layout.cert_and_key("party", name)
    return ["--cert", str(cert), "--key", str(key)]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["admin", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- PCR specs and golden values ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"sha256:23={SHA256_A}", PcrSpec(23, "sha256", bytes.fromhex(SHA256_A))),
        (f"SHA1:0=0x{SHA1_B.upper()}", PcrSpec(0, "sha1", bytes.fromhex(SHA1_B))),
        (f"sha384:7={'cc' * 48}", PcrSpec(7, "sha384", bytes.fromhex("cc" * 48))),
    ],
)
def test_parse_pcr_spec(text: str, expected: PcrSpec) -> None:
    assert parse_pcr_spec(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"sha256{SHA256_A}", "expected BANK:INDEX=HEX"),
        (f"sha256={SHA256_A}", "expected BANK:INDEX=HEX"),
        (f"md5:23={SHA256_A}", "unknown PCR bank"),
        (f"sha256:x={SHA256_A}", "must be a number"),
        (f"sha256:24={SHA256_A}", "0..23"),
        ("sha256:23=zz", "not hexadecimal"),
        (f"sha256:23={SHA1_B}", "32 bytes"),
        (f"sha1:23={SHA256_A}", "20 bytes"),
    ],
)
def test_parse_pcr_spec_rejects(text: str, message: str) -> None:
    with pytest.raises(AdminUsageError, match=message):
        parse_pcr_spec(text)


def test_golden_from_files_is_the_pcr23_of_measuring_them(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"first")
    (tmp_path / "b").write_bytes(b"second" * 1000)
    files = [str(tmp_path / "a"), str(tmp_path / "b")]
    values = golden_from_files(files, ["sha256", "sha1", "sha256"])
    assert values == [
        PcrSpec(23, "sha256", pcr_chain("sha256", [b"first", b"second" * 1000])),
        PcrSpec(23, "sha1", pcr_chain("sha1", [b"first", b"second" * 1000])),
    ]
    # Order matters, as with tpm2_pcrextend.
    assert golden_from_files(files[::-1], ["sha256"]) != values[:1]


def test_golden_set_sends_literal_and_measured_values(
    fake: RunningFake, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "app").write_bytes(b"app")
    other = "11" * 32
    fake.fake.responses["SetGoldenPcrSet"] = admin_pb2.SetGoldenPcrSetResponse(
        golden_set=admin_pb2.GoldenPcrSet(
            name="prod",
            accepted_values=[
                common_pb2.PcrValue(
                    index=0, bank=common_pb2.HASH_ALGORITHM_SHA256, value=bytes.fromhex(other)
                )
            ],
        )
    )
    code, out, _ = run(
        capsys,
        "golden",
        "set",
        "prod",
        "--pcr",
        f"sha256:0={other}",
        "--pcr",
        f"sha256:0={other}",  # a duplicate is sent once
        "--from-files",
        str(tmp_path / "app"),
        "--bank",
        "sha256",
    )
    assert code == 0
    (req,) = fake.fake.requests["SetGoldenPcrSet"]
    assert isinstance(req, admin_pb2.SetGoldenPcrSetRequest)
    assert req.golden_set.name == "prod"
    sent = [(v.index, v.bank, v.value) for v in req.golden_set.accepted_values]
    assert sent == [
        (0, common_pb2.HASH_ALGORITHM_SHA256, bytes.fromhex(other)),
        (23, common_pb2.HASH_ALGORITHM_SHA256, pcr_chain("sha256", [b"app"])),
    ]
    assert "golden set prod" in out and f"sha256:0  {other}" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["golden", "set", "g"], "needs --pcr, --from-files or --from-quote"),
        (["golden", "set", "g", "--pcr", f"sha256:23={SHA256_A}", "--bank", "sha1"], "--bank"),
    ],
)
def test_golden_set_usage_errors(
    fake: RunningFake, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert err.startswith("cleanroom: error: ") and message in err
    assert err.count("\n") == 1
    assert fake.fake.calls["SetGoldenPcrSet"] == 0


def test_golden_from_quote_refuses_files_that_are_not_a_quote(tmp_path: Path) -> None:
    with pytest.raises(AdminUsageError, match="does not exist"):
        golden_from_quote(tmp_path)
    (tmp_path / "quote.msg").write_bytes(b"\xff\x54\x43\x47" + bytes(10))
    (tmp_path / "quote.pcrs").write_bytes(bytes(8))
    with pytest.raises(AdminUsageError, match="is not a TPM quote"):
        golden_from_quote(tmp_path)


# --- manifests ------------------------------------------------------------------------------


def test_manifest_from_files_names_relative_to_root(tmp_path: Path) -> None:
    root = tmp_path / "wl"
    (root / "src").mkdir(parents=True)
    (root / "src" / "train.py").write_bytes(b"train")
    (root / "conf.toml").write_bytes(b"conf")
    files = manifest_from_files(
        [str(root / "src" / "train.py"), str(root / "conf.toml")], root=str(root)
    )
    assert [f.path for f in files] == ["src/train.py", "conf.toml"]
    assert files[0].size == 5
    assert files[0].digests == {
        "sha1": hashlib.new("sha1", b"train", usedforsecurity=False).digest(),
        "sha256": hashlib.sha256(b"train").digest(),
    }


def test_manifest_from_files_without_root_keeps_the_paths_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("model.py").write_bytes(b"m")
    assert [f.path for f in manifest_from_files(["model.py"])] == ["model.py"]


def test_manifest_from_files_refuses_a_file_outside_root(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").write_bytes(b"x")
    with pytest.raises(AdminUsageError, match="not inside --root"):
        manifest_from_files([str(tmp_path / "outside")], root=str(tmp_path / "root"))


def test_manifest_json_forms(tmp_path: Path) -> None:
    entry = {"path": "a.py", "size": 3, "digests": {"sha256": SHA256_A, "sha1": SHA1_B}}
    expected = [
        ManifestEntry("a.py", 3, {"sha256": bytes.fromhex(SHA256_A), "sha1": bytes.fromhex(SHA1_B)})
    ]
    assert manifest_from_json(json.dumps({"entries": [entry]}).encode(), "m") == expected
    assert manifest_from_json(json.dumps([entry]).encode(), "m") == expected
    # What `cleanroom sidecar measure --log-out` writes.
    log = {"banks": ["sha1", "sha256"], "events": [{**entry, "pcr_index": 23}], "pcrs": {}}
    assert manifest_from_json(json.dumps(log).encode(), "m") == expected


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("not json", "not valid JSON"),
        ({"entries": []}, "non-empty"),
        ({"files": []}, "non-empty"),
        ({"entries": [{"size": 1, "digests": {"sha256": SHA256_A}}]}, 'needs a "path"'),
        # The size is compared with the measured one: an entry must state it.
        ({"entries": [{"path": "a", "digests": {"sha256": SHA256_A}}]}, 'needs a "size"'),
        ({"entries": [{"path": "a", "size": 1, "digests": {"sha1": SHA1_B}}]}, "sha256"),
        ({"entries": [{"path": "a", "size": -1, "digests": {"sha256": SHA256_A}}]}, "size"),
        # A size that no uint64 holds: refused here, not by protobuf with a traceback.
        ({"entries": [{"path": "a", "size": 2**64, "digests": {"sha256": SHA256_A}}]}, "64 bits"),
        ({"entries": [{"path": "a", "size": 1, "digests": {"sha256": "aa"}}]}, "32 bytes"),
        ({"entries": [{"path": "a", "size": 1, "digests": {"sha256": "xyz"}}]}, "not hexadecimal"),
        (
            {"entries": [{"path": "a", "size": 1, "digests": {"md5": "aa", "sha256": SHA256_A}}]},
            "bank",
        ),
    ],
)
def test_manifest_json_rejects(doc: object, message: str) -> None:
    data = doc.encode() if isinstance(doc, str) else json.dumps(doc).encode()
    with pytest.raises(AdminUsageError, match=message):
        manifest_from_json(data, "m.json")


def test_manifest_to_pb_and_expected_pcr23(tmp_path: Path) -> None:
    for name, data in (("a", b"alpha"), ("b", b"beta")):
        (tmp_path / name).write_bytes(data)
    files = manifest_from_files([str(tmp_path / "a"), str(tmp_path / "b")], root=str(tmp_path))
    msg = manifest_to_pb("w", files)
    assert msg.name == "w"
    assert [(e.path, e.size) for e in msg.entries] == [("a", 5), ("b", 4)]
    assert [d.algorithm for d in msg.entries[0].digests] == [
        common_pb2.HASH_ALGORITHM_SHA1,
        common_pb2.HASH_ALGORITHM_SHA256,
    ]
    assert expected_pcr23(files) == {
        "sha1": pcr_chain("sha1", [b"alpha", b"beta"]),
        "sha256": pcr_chain("sha256", [b"alpha", b"beta"]),
    }


# --- formatting -----------------------------------------------------------------------------


def test_format_table_aligns_columns() -> None:
    text = format_table(["A", "LONG HEADER"], [["x" * 5, "1"], ["y", "22"]])
    assert text.splitlines() == ["A      LONG HEADER", "xxxxx  1", "y      22"]
    assert format_table(["A"], []) == "(none)\n"


def test_format_fields_aligns_values() -> None:
    assert format_fields([("a", "1"), ("long", "2")]) == "a:    1\nlong: 2\n"


# --- argument handling ----------------------------------------------------------------------


CONNECTION = ["admin", "--json", "--broker", "h:1", "--cert", "c", "--key", "k", "--ca", "a"]


def test_global_options_go_before_or_after_the_subcommand() -> None:
    parser = build_parser()
    before = parser.parse_args([*CONNECTION, "ak", "list"])
    after = parser.parse_args(["admin", "ak", "list", *CONNECTION[1:]])
    for ns in (before, after):
        assert (ns.json, ns.broker, ns.tls_cert, ns.tls_key, ns.tls_ca) == (
            True,
            "h:1",
            "c",
            "k",
            "a",
        )
    plain = parser.parse_args(["admin", "ak", "list"])
    assert plain.json is False and plain.broker is None


def test_workload_approve_key_means_key_ids() -> None:
    ns = build_parser().parse_args(
        [
            *("admin", "--key", "tls.key", "workload", "approve", "--name", "w"),
            *("--key", "k1", "k2", "--key", "k3", "--recipient", "p1", "--file", "f"),
        ]
    )
    assert ns.key_ids == ["k1", "k2", "k3"]
    assert ns.tls_key == "tls.key"


@pytest.mark.parametrize(
    "argv",
    [
        ["ek", "enroll", "--public", "ek.pub"],  # neither --certificate nor --no-certificate
        ["ek", "enroll", "--public", "p", "--certificate", "c", "--no-certificate"],
        ["audit", "list", "--limit", "-1"],
        # Numbers that do not fit the request's fields, or are beyond what the broker takes.
        ["audit", "list", "--after", "99999999999999999999"],
        ["audit", "list", "--after", str(2**63)],
        ["audit", "list", "--limit", "99999999999"],
        ["audit", "list", "--limit", "1001"],
        ["audit", "list", "--after", "x"],
        ["workload", "approve", "--name", "w", "--key", "k", "--file", "f"],  # no --recipient
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["admin", *argv])
    assert info.value.code == 2
    capsys.readouterr()


def test_the_docs_and_the_help_say_what_the_broker_does_with_a_pem_ek(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from broker.errors import KeyAttributeError
    from broker.tpmkeys import check_ek_attributes, load_public

    pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(KeyAttributeError) as refused:
        check_ek_attributes(load_public(pem))
    doc = (Path(__file__).parents[3] / "docs" / "admin-cli.md").read_text()
    eks = " ".join(doc[doc.index("## EKs (operator)") : doc.index("## AKs (operator)")].split())
    # The page quotes the broker's refusal and says why, rather than offering PEM.
    assert f"A PEM public key is refused (`{refused.value}`)" in eks
    assert "MakeCredential" in eks and "or a PEM public key" not in eks
    with pytest.raises(SystemExit):
        build_parser().parse_args(["admin", "ek", "enroll", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "TPM2B_PUBLIC; PEM is refused" in help_text


def test_missing_certificate_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("BROKER", "CERT", "KEY", "CA"):
        monkeypatch.delenv(f"CLEANROOM_ADMIN_{name}", raising=False)
    code, out, err = run(capsys, "ak", "list")
    assert code == 1 and out == ""
    assert err == "cleanroom: error: no --cert given: pass --cert or set CLEANROOM_ADMIN_CERT\n"


def test_workload_files_and_manifest_are_exclusive(
    fake: RunningFake, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "m.json").write_text("[]")
    code, _, err = run(
        capsys,
        *approve_argv(),
        "--file",
        "x",
        "--manifest",
        str(tmp_path / "m.json"),
    )
    assert code == 1 and "not both" in err


# --- commands against the fake broker -------------------------------------------------------


def test_ak_list_table_and_json(fake: RunningFake, capsys: pytest.CaptureFixture[str]) -> None:
    name = "000b" + "cd" * 32
    fake.fake.responses["ListAks"] = admin_pb2.ListAksResponse(
        aks=[admin_pb2.AkInfo(ak_name=name, ak_public=b"pub", enrolled_by="operator", revoked=True)]
    )
    code, out, _ = run(capsys, "ak", "list")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == [
        "AK",
        "NAME",
        "EK",
        "ID",
        "ENROLLED",
        "BY",
        "REVOKED",
        "ENROLLED",
        "AT",
    ]
    assert row.split() == [name, "-", "operator", "yes"]
    code, out, _ = run(capsys, "ak", "list", "--json")
    assert code == 0
    (doc,) = json.loads(out)
    assert doc["ak_name"] == name and doc["revoked"] is True and doc["ak_public"] == "cHVi"


def test_audit_verify_broken_chain_exits_non_zero(
    fake: RunningFake, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.fake.responses["VerifyAuditLog"] = admin_pb2.VerifyAuditLogResponse(
        valid=False, records_checked=9, first_bad_sequence=4, problem="record hash mismatch"
    )
    code, out, err = run(capsys, "audit", "verify")
    assert code == 1 and out == ""
    assert err == (
        "cleanroom: error: audit log chain is broken at sequence 4: record hash mismatch "
        "(9 records checked)\n"
    )
    code, out, err = run(capsys, "--json", "audit", "verify")
    assert code == 1
    assert json.loads(out) == {
        "valid": False,
        "records_checked": 9,
        "first_bad_sequence": 4,
        "problem": "record hash mismatch",
    }
    assert "broken at sequence 4" in err


def test_audit_list_sends_the_largest_numbers_the_broker_takes(
    fake: RunningFake, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.fake.responses["ListAuditRecords"] = admin_pb2.ListAuditRecordsResponse()
    code, out, err = run(
        capsys, "--json", "audit", "list", "--after", str(2**63 - 1), "--limit", "1000"
    )
    assert (code, json.loads(out), err) == (0, [], "")
    (request,) = fake.fake.requests["ListAuditRecords"]
    assert isinstance(request, admin_pb2.ListAuditRecordsRequest)
    assert (request.after_sequence, request.limit) == (2**63 - 1, 1000)
    # The bounds are the broker's (repeated in the CLI to keep the parser light).
    assert (AUDIT_MAX_SEQUENCE, AUDIT_MAX_PAGE) == (MAX_AUDIT_SEQUENCE, MAX_AUDIT_PAGE)


def test_a_manifest_file_size_beyond_64_bits_is_one_clear_line(
    fake: RunningFake, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    entry = {"path": "a", "size": 2**64, "digests": {"sha256": SHA256_A}}
    (tmp_path / "m.json").write_text(json.dumps([entry]))
    argv = ["workload", "approve", "--name", "w", "--key", "k", "--recipient", "p"]
    code, out, err = run(capsys, *argv, "--manifest", str(tmp_path / "m.json"))
    assert (code, out) == (1, "")
    assert err.startswith("cleanroom: error: manifest ") and "64 bits" in err
    assert err.count("\n") == 1
    assert not fake.fake.requests["ApproveWorkload"]


def test_audit_verify_intact(fake: RunningFake, capsys: pytest.CaptureFixture[str]) -> None:
    fake.fake.responses["VerifyAuditLog"] = admin_pb2.VerifyAuditLogResponse(
        valid=True, records_checked=12
    )
    code, out, _ = run(capsys, "audit", "verify")
    assert (code, out) == (0, "audit log intact: 12 records checked\n")


def test_workload_approve_sends_the_manifest_and_prints_expected_pcrs(
    fake: RunningFake, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "train.py").write_bytes(b"train")
    (tmp_path / "data.csv").write_bytes(b"a,b\n")
    contents = [b"train", b"a,b\n"]
    launch = pinned_launch_encoding()
    approval = admin_pb2.Approval(approval_id="ap1", party="advertiser", key_ids=["k1"])
    for bank, enum in (
        ("sha1", common_pb2.HASH_ALGORITHM_SHA1),
        ("sha256", common_pb2.HASH_ALGORITHM_SHA256),
    ):
        approval.expected_pcrs.add(index=23, bank=enum, value=pcr_chain(bank, contents, launch))
    fake.fake.responses["ApproveWorkload"] = admin_pb2.ApproveWorkloadResponse(approval=approval)
    code, out, _ = run(
        capsys,
        *party_options(fake.layout),
        *approve_argv("train", "k1", "advertiser", "publisher"),
        "--golden-set",
        "prod",
        "--file",
        str(tmp_path / "train.py"),
        str(tmp_path / "data.csv"),
        "--root",
        str(tmp_path),
        *LAUNCH_OPTIONS,
    )
    assert code == 0
    (req,) = fake.fake.requests["ApproveWorkload"]
    assert isinstance(req, admin_pb2.ApproveWorkloadRequest)
    assert list(req.key_ids) == ["k1"]
    assert list(req.output_recipients) == ["advertiser", "publisher"]
    assert req.golden_set == "prod"
    assert [e.path for e in req.manifest.entries] == ["train.py", "data.csv"]
    sent = req.manifest.launch
    assert list(sent.argv) == ["/usr/bin/python3", "train.py", "--depth", "3 4"]
    assert sent.executable == "/usr/bin/python3"
    assert sent.executable_sha256.hex() == PINNED
    assert [(v.name, v.value) for v in sent.env] == [("LANG", "C.UTF-8")]
    assert sent.working_directory == "/srv/workload"
    assert "approval id: ap1" in out
    assert f"sha256:23:   {pcr_chain('sha256', contents, launch).hex()}" in out
    assert f"sha1:23:     {pcr_chain('sha1', contents, launch).hex()}" in out


def test_workload_approve_refuses_a_broker_that_disagrees(
    fake: RunningFake, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "f").write_bytes(b"f")
    approval = admin_pb2.Approval(approval_id="ap2")
    approval.expected_pcrs.add(index=23, bank=common_pb2.HASH_ALGORITHM_SHA256, value=bytes(32))
    fake.fake.responses["ApproveWorkload"] = admin_pb2.ApproveWorkloadResponse(approval=approval)
    code, _, err = run(
        capsys,
        *party_options(fake.layout),
        *approve_argv(),
        "--file",
        str(tmp_path / "f"),
        *LAUNCH_OPTIONS,
    )
    assert code == 1
    assert "the broker expects sha256:23=" in err and "workload revoke ap2" in err


def test_workload_manifest_round_trips_through_approve(
    fake: RunningFake, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "a").write_bytes(b"a")
    code, out, _ = run(
        capsys,
        "workload",
        "manifest",
        "--name",
        "w",
        "--file",
        str(tmp_path / "a"),
        "--root",
        str(tmp_path),
        *LAUNCH_OPTIONS,
    )
    assert code == 0
    doc = json.loads(out)
    assert doc["expected_pcrs"]["sha256"] == (
        pcr_chain("sha256", [b"a"], pinned_launch_encoding()).hex()
    )
    (tmp_path / "m.json").write_text(out)
    code, _, _ = run(
        capsys,
        *party_options(fake.layout),
        *approve_argv(),
        "--manifest",
        str(tmp_path / "m.json"),
        *LAUNCH_OPTIONS,
    )
    assert code == 0
    (req,) = fake.fake.requests["ApproveWorkload"]
    assert isinstance(req, admin_pb2.ApproveWorkloadRequest)
    assert [(e.path, e.size) for e in req.manifest.entries] == [("a", 1)]
    assert req.manifest.entries[0].digests[1].value == hashlib.sha256(b"a").digest()


def test_key_register_seals_and_never_prints_the_key(
    fake: RunningFake, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data_key = bytes(range(100, 132))
    write_data_key(data_key, tmp_path / "k.bin")
    fake.fake.responses["RegisterDataKey"] = admin_pb2.RegisterDataKeyResponse(
        key=admin_pb2.DataKeyInfo(key_id="adv-1", owner_party="advertiser", kek_ref="local")
    )
    code, out, err = run(
        capsys,
        *party_options(fake.layout),
        "key",
        "register",
        "--key-id",
        "adv-1",
        "--data-key",
        str(tmp_path / "k.bin"),
        "--json",
    )
    assert code == 0
    assert json.loads(out)["key_id"] == "adv-1"
    for text in (out, err):
        assert data_key.hex() not in text
    (req,) = fake.fake.requests["RegisterDataKey"]
    assert isinstance(req, admin_pb2.RegisterDataKeyRequest)
    assert (
        open_registered_key(
            fake.fake.registration_key, req.sealed_data_key, key_id="adv-1", owner="advertiser"
        )
        == data_key
    )


def test_key_register_with_operator_certificate_is_refused_locally(
    fake: RunningFake, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write_data_key(bytes(32), tmp_path / "k.bin")
    code, _, err = run(
        capsys, "key", "register", "--key-id", "k", "--data-key", str(tmp_path / "k.bin")
    )
    assert code == 1 and "needs a party certificate" in err
    assert fake.fake.calls["RegisterDataKey"] == 0


def test_party_add_sends_the_public_key(
    fake: RunningFake, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    key = generate_recipient_key()
    write_public_key(key.public_key(), tmp_path / "p.pub")
    code, _, _ = run(capsys, "party", "add", "publisher", "--public-key", str(tmp_path / "p.pub"))
    assert code == 0
    (req,) = fake.fake.requests["AddParty"]
    assert isinstance(req, admin_pb2.AddPartyRequest)
    assert req.party.name == "publisher"
    assert req.party.recipient_key.public_key == key.public_key().raw
    assert req.party.recipient_key.kem == common_pb2.KEM_ALGORITHM_X25519


def test_permission_denied_is_one_line(
    fake: RunningFake, capsys: pytest.CaptureFixture[str]
) -> None:
    import grpc

    fake.fake.failures["ListEks"] = [grpc.StatusCode.PERMISSION_DENIED]
    code, out, err = run(capsys, "ek", "list")
    assert code == 1 and out == ""
    assert err == (
        "cleanroom: error: ListEks: scripted permission_denied for ListEks [PERMISSION_DENIED]\n"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param((), "an approval covers the launch: give --command", id="no-command"),
        pytest.param(
            ("--command", "python3 train.py", "--workdir", "/srv/w"),
            "the command's first word 'python3' must be an absolute path (such as "
            "/usr/bin/python3): the sidecar executes exactly the measured path and never "
            "searches PATH",
            id="bare-name",
        ),
        pytest.param(
            ("--command", "/usr/bin/python3 'train.py", "--workdir", "/srv/w"),
            "cannot split the command",
            id="unclosed-quote",
        ),
        pytest.param(
            ("--command", "/usr/bin/python3 t.py", "--env", "LANG", "--workdir", "/srv/w"),
            "--env 'LANG': expected NAME=VALUE",
            id="env-without-value",
        ),
        pytest.param(
            ("--command", "/usr/bin/python3 t.py", "--env", "A=1", "--env", "A=2"),
            "--env names A twice",
            id="env-twice",
        ),
        pytest.param(
            ("--command", "/usr/bin/python3 t.py", "--env", "CLEANROOM_WORKLOAD_SOCKET=/x"),
            "CLEANROOM_WORKLOAD_SOCKET is set by the sidecar itself",
            id="reserved-variable",
        ),
        pytest.param(
            ("--command", "/usr/bin/python3 t.py", "--workdir", "srv/w"),
            "--workdir 'srv/w' must be absolute",
            id="relative-workdir",
        ),
        pytest.param(
            ("--command", "/nonexistent/python3 t.py", "--workdir", "/srv/w"),
            "give the executable's SHA-256 as it is on the TEE with --interpreter-sha256",
            id="executable-not-here",
        ),
        pytest.param(
            ("--command", "/usr/bin/python3 t.py", "--interpreter-sha256", "abcd"),
            "--interpreter-sha256 must be 64 hexadecimal digits",
            id="short-digest",
        ),
    ],
)
def test_workload_approve_refuses_a_malformed_launch_in_one_line(
    fake: RunningFake,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    options: tuple[str, ...],
    message: str,
) -> None:
    (tmp_path / "t.py").write_bytes(b"t")
    code, _, err = run(
        capsys,
        *party_options(fake.layout),
        *approve_argv(),
        "--root",
        str(tmp_path),
        "--file",
        str(tmp_path / "t.py"),
        *options,
    )
    assert code != 0
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "ApproveWorkload" not in fake.fake.requests


def test_workload_approve_digests_the_executable_found_here_by_default(
    fake: RunningFake, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "t.py").write_bytes(b"t")
    code, _, err = run(
        capsys,
        *party_options(fake.layout),
        *approve_argv(),
        "--root",
        str(tmp_path),
        "--file",
        str(tmp_path / "t.py"),
        "--command",
        f"{sys.executable} t.py",
    )
    assert code == 0, err
    (req,) = fake.fake.requests["ApproveWorkload"]
    assert isinstance(req, admin_pb2.ApproveWorkloadRequest)
    expected = hashlib.sha256(Path(sys.executable).read_bytes()).digest()
    assert req.manifest.launch.executable_sha256 == expected
    # The working directory defaults to --root's absolute path, as sidecar.toml's root.
    assert req.manifest.launch.working_directory == str(tmp_path.absolute())
    assert list(req.manifest.launch.env) == []

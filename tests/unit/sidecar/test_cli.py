"""``cleanroom sidecar`` commands that need no TPM: offline measurement and argument errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cleanroom.app.cli import main
from evidence.pcr import measure_files


def _files(tmp_path: Path) -> list[Path]:
    paths = []
    for name, data in (("a.py", b"print(1)\n"), ("b.bin", b"\x00" * 1000)):
        path = tmp_path / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def test_offline_measure_prints_pcr23_per_bank(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CLEANROOM_SIDECAR_TPM_BANKS", raising=False)
    files = _files(tmp_path)
    log_out = tmp_path / "log" / "events.json"
    args = ["sidecar", "measure", "--offline", "--log-out", str(log_out), *map(str, files)]
    assert main(args) == 0
    expected = measure_files(files)
    assert capsys.readouterr().out.splitlines() == [
        f"sha1:23 0x{expected.pcrs['sha1'].hex().upper()}",
        f"sha256:23 0x{expected.pcrs['sha256'].hex().upper()}",
    ]
    log = json.loads(log_out.read_text())
    assert log["banks"] == ["sha1", "sha256"]
    assert [(e["path"], e["size"], e["pcr_index"]) for e in log["events"]] == [
        (str(files[0]), 9, 23),
        (str(files[1]), 1000, 23),
    ]
    assert log["events"][1]["digests"]["sha1"] == expected.events[1].digests["sha1"].hex()
    assert log["pcrs"]["sha256"] == expected.pcrs["sha256"].hex()


def test_offline_measure_order_matters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _files(tmp_path)
    assert main(["sidecar", "measure", "--offline", str(a), str(b)]) == 0
    forward = capsys.readouterr().out
    assert main(["sidecar", "measure", "--offline", str(b), str(a)]) == 0
    assert capsys.readouterr().out != forward


def test_offline_measure_banks_from_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEANROOM_SIDECAR_TPM_BANKS", "sha256")
    (a, _) = _files(tmp_path)
    assert main(["sidecar", "measure", "--offline", str(a)]) == 0
    assert capsys.readouterr().out.startswith("sha256:23 0x")


def test_missing_file_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.py"
    assert main(["sidecar", "measure", "--offline", str(missing)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"cleanroom: error: cannot measure {missing}: not a regular file or does not exist"
    ]


@pytest.mark.parametrize("nonce", ["xyz", "123"])
def test_non_hex_nonce_is_refused_before_any_tpm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nonce: str
) -> None:
    # The TCTI points nowhere: reaching the TPM would give another error.
    args = ["sidecar", "quote", "--tcti", "swtpm:host=127.0.0.1,port=1", "--nonce", nonce]
    assert main([*args, "--out", str(tmp_path / "q")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--nonce must be an even number of hexadecimal digits" in err[0]


def test_quote_requires_nonce_and_out(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["sidecar", "quote", "--out", "x"])
    assert info.value.code == 2
    assert "--nonce" in capsys.readouterr().err


def test_offline_measure_with_a_launch_ends_with_the_launch_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    from evidence.launch import Launch

    monkeypatch.delenv("CLEANROOM_SIDECAR_TPM_BANKS", raising=False)
    files = _files(tmp_path)
    digest = hashlib.sha256(b"python").hexdigest()
    log_out = tmp_path / "events.json"
    args = [
        "sidecar",
        "measure",
        "--offline",
        "--log-out",
        str(log_out),
        "--command",
        "/usr/bin/python3 a.py 'x y'",
        "--env",
        "LANG=C.UTF-8",
        "--workdir",
        "/srv/w",
        "--interpreter-sha256",
        digest,
        *map(str, files),
    ]
    assert main(args) == 0
    launch = Launch.create(
        argv=("/usr/bin/python3", "a.py", "x y"),
        executable_sha256=bytes.fromhex(digest),
        env={"LANG": "C.UTF-8"},
        cwd="/srv/w",
    )
    expected = measure_files(files, launch=launch)
    assert f"sha256:23 0x{expected.pcrs['sha256'].hex().upper()}" in capsys.readouterr().out
    last = json.loads(log_out.read_text())["events"][-1]
    assert last["launch"]["argv"] == ["/usr/bin/python3", "a.py", "x y"]
    assert last["launch"]["env"] == {"LANG": "C.UTF-8"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--env", "A=1"], "--env, --workdir and --interpreter-sha256 need --command"),
        (["--command", "python3 a.py"], "'python3' must be an absolute path"),
        (["--command", "/usr/bin/python3", "--env", "NOVALUE"], "expected NAME=VALUE"),
        (
            ["--command", "/usr/bin/python3", "--interpreter-sha256", "zz"],
            "64 hexadecimal digits",
        ),
        (["--command", "/nonexistent/python3"], "cannot measure the executable"),
    ],
)
def test_offline_measure_refuses_a_malformed_launch_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    files = _files(tmp_path)
    assert main(["sidecar", "measure", "--offline", *options, *map(str, files)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err

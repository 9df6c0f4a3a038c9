"""Running ``cleanroom demo`` as a user would and checking what it left behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from sealing.envelope import open_bytes, read_header
from sealing.keys import load_private_key, load_public_key

PARTIES = ("advertiser", "publisher")


OUTPUTS = ("insights.json", "report.html", "synthetic.csv")


def run_demo(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEANROOM_")}
    return subprocess.run(
        [sys.executable, "-m", "cleanroom.app.cli", "demo", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Live processes (zombies have no command line) whose command line contains ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        cmdline = raw.replace(b"\0", b" ").decode(errors="replace")
        if text in cmdline:
            found.append((int(entry), cmdline.strip()))
    return found


def summary_rows(stdout: str) -> dict[str, str]:
    """The summary's ``name: value`` rows (a row without a name continues the one above)."""
    _, sep, tail = stdout.partition("\nSummary\n")
    assert sep, f"no summary in:\n{stdout}"
    rows: dict[str, str] = {}
    last = ""
    for line in tail.splitlines():
        if not line.startswith("  "):
            break
        name, colon, value = line.strip().partition(": ")
        if colon and not line.startswith("   "):
            last = name
            rows[name] = value.strip()
        else:
            rows[last] += " " + line.strip()
    return rows


def check_completed_demo(proc: subprocess.CompletedProcess[str], directory: Path) -> None:
    """The checks every successful run must pass: exit 0, the summary, the opened outputs."""
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = summary_rows(proc.stdout)
    assert rows["attestation"].startswith("allowed")
    pcr = re.fullmatch(
        r"sha256=([0-9a-f]{64}) \(the approved value, read back from the TPM\)", rows["PCR 23"]
    )
    assert pcr, rows["PCR 23"]
    assert rows["keys released"] == "advertiser-data (of advertiser), publisher-data (of publisher)"
    for name in OUTPUTS:
        assert rows[f"output {name}"].startswith("sealed to advertiser, publisher: ")
    assert re.match(r"denied, 0 keys released, no outputs", rows["tampered run"])
    why = rows["why, per the audit log"]
    record = re.match(r"record #(\d+) in broker/broker\.db", why)
    assert record, why
    assert "no key released" in why
    assert rows["files"] == str(directory)
    assert proc.stdout.rstrip().endswith(f"files left in {directory}")
    assert (directory / "summary.txt").read_text().startswith("Summary\n")

    # Each party opens each output with its own private key, and the outputs name both parties
    # as recipients in their sealed headers.
    fingerprints = {
        load_public_key(directory / "parties" / p / f"{p}.pub").fingerprint(): p for p in PARTIES
    }
    opened: dict[str, dict[str, bytes]] = {}
    for name in OUTPUTS:
        sealed = (directory / "outputs" / f"{name}.sealed").read_bytes()
        with open(directory / "outputs" / f"{name}.sealed", "rb") as f:
            recipients = {fingerprints.get(fp) for fp in read_header(f).recipient_fingerprints}
        assert recipients == set(PARTIES)
        for party in PARTIES:
            with load_private_key(directory / "parties" / party / f"{party}.key") as key:
                opened.setdefault(party, {})[name] = open_bytes(sealed, private_key=key)
            # The demo's own opened copy is the same plaintext.
            assert (directory / "parties" / party / "opened" / name).read_bytes() == opened[party][
                name
            ]
    insights = json.loads(opened["advertiser"]["insights.json"])
    overlap = insights["join"]["overlap"]
    assert f"{overlap:,} people in common" in rows["output insights.json"]
    synthetic = opened["publisher"]["synthetic.csv"].decode().splitlines()
    assert synthetic[0].startswith("user_id,")
    assert f"{len(synthetic) - 1:,} synthetic rows" in rows["output synthetic.csv"]
    # Each party's report is where the demo says, and is the page the workload sealed.
    for party in PARTIES:
        report = directory / "parties" / party / "opened" / "report.html"
        assert rows[f"{party}'s report"] == str(report)
        assert f"its visual report, to open in a browser: {report}" in proc.stdout
        assert report.read_bytes() == opened[party]["report.html"]
        assert report.read_text().startswith("<!DOCTYPE html>")

    # The tampered copy differs from the approved one in exactly one byte, and got nothing.
    good = directory / "workload" / "workload" / "example" / "analysis.py"
    bad = directory / "workload-tampered" / "workload" / "example" / "analysis.py"
    assert good.stat().st_size == bad.stat().st_size
    pairs = zip(good.read_bytes(), bad.read_bytes(), strict=True)
    assert sum(a != b for a, b in pairs) == 1
    assert list((directory / "outputs-tampered").iterdir()) == []

    # The approved files launched with another command got nothing either, and the audit log
    # says that the command differs.
    other = rows["another command"]
    assert re.match(r"denied, 0 keys released, no outputs", other), other
    assert "launch differs from the approved launch (command: approved `" in other, other
    assert list((directory / "outputs-other-command").iterdir()) == []

    # The audit log says the same as the summary, in the broker's own database.
    import sqlite3

    with sqlite3.connect(directory / "broker" / "broker.db") as db:
        action, decision, reason = db.execute(
            "SELECT action, decision, reason FROM audit_records WHERE sequence = ?",
            (int(record.group(1)),),
        ).fetchone()
    assert (action, decision) == ("attest", "deny")
    assert reason in why

    assert processes_mentioning(str(directory)) == []

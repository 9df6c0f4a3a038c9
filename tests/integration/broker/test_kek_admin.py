"""Key Vault KEKs in a served broker: ``[keyvault]`` and ``[broker.party_keks]`` in broker.toml,
and the operator's ``cleanroom admin kek ...`` and ``key rewrap`` commands.

The broker is a real ``cleanroom broker serve`` process (mTLS, SQLite); Key Vault is the local
HTTPS double (``cleanroom.app.emulators.keyvault``) reached with the real ``azure-keyvault-keys``
client, configured the way an operator configures a vault (a static token and a CA file instead
of a managed identity). The commands are the ones shown in docs/admin-cli.md.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.client import BrokerClient, FailedPreconditionError, UnavailableError
from broker.server.status import KEK_UNAVAILABLE_MESSAGE, KEK_UNUSABLE_MESSAGE
from cleanroom.app.demo.workspace import toml_document
from cleanroom.app.emulators.keyvault import FakeKeyVault
from pki.ca import PkiLayout, init_pki
from tests.support.admin import admin, admin_env, admin_fails, admin_json, use_admin_env
from tests.support.broker import spawn_broker

CLEANROOM = Path(sys.executable).parent / "cleanroom"
PARTIES = ("advertiser", "publisher")


@dataclass
class ServedBroker:
    proc: subprocess.Popen[bytes]
    address: str
    pki: PkiLayout
    workdir: Path
    vault: FakeKeyVault

    def ref(self, name: str, version: str | None = None) -> str:
        return f"azurekv:{self.vault.key_url(name, version)}"

    def client(self, kind: str, name: str = "") -> BrokerClient:
        cert, key = self.pki.cert_and_key(kind, name)
        return BrokerClient.connect(
            target=self.address, cert_file=cert, key_file=key, ca_file=self.pki.ca_cert
        )

    def env(self, kind: str = "operator", name: str = "") -> dict[str, str]:
        return admin_env(self.pki, self.address, kind, name)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def write_broker_toml(workdir: Path, pki: PkiLayout, vault: FakeKeyVault) -> Path:
    """A broker.toml whose advertiser keeps its KEK in Key Vault; everyone else uses the local
    KEK."""
    cert, key = pki.cert_and_key("broker")
    config = workdir / "broker.toml"
    config.write_text(
        toml_document(
            [
                (
                    "broker",
                    {
                        "database_url": f"sqlite:///{workdir / 'broker.db'}",
                        "state_dir": str(workdir / "state"),
                        "default_kek": "local",
                    },
                ),
                ("broker.party_keks", {"advertiser": f"azurekv:{vault.key_url('advertiser-kek')}"}),
                (
                    "broker.tls",
                    {
                        "listen": "127.0.0.1:0",
                        "cert_file": str(cert),
                        "key_file": str(key),
                        "ca_file": str(pki.ca_cert),
                    },
                ),
                ("broker.metrics", {"enabled": False}),
                ("keyvault", vault.broker_settings()),
            ]
        )
    )
    return config


def start_served_broker(workdir: Path, vault: FakeKeyVault) -> ServedBroker:
    pki = init_pki(workdir / "pki", parties=PARTIES)
    config = write_broker_toml(workdir, pki, vault)
    spawned = spawn_broker(config, workdir, log_json=False, stderr_name="broker.log")
    proc, address = spawned.proc, spawned.grpc_address
    return ServedBroker(proc, address, pki, workdir, vault)


@pytest.fixture
def served(tmp_path: Path, key_vault: FakeKeyVault) -> Iterator[ServedBroker]:
    for name in ("advertiser-kek", "publisher-kek", "broker-kek"):
        key_vault.create_key(name)
    broker = start_served_broker(tmp_path, key_vault)
    try:
        with broker.client("operator") as operator:
            from cleanroom.v1 import common_pb2
            from sealing.keys import generate_recipient_key

            for party in PARTIES:
                public = generate_recipient_key().public_key()
                operator.add_party(
                    party,
                    common_pb2.RecipientKey(
                        kem=common_pb2.KemAlgorithm.ValueType(public.kem), public_key=public.raw
                    ),
                )
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def as_operator(served: ServedBroker, monkeypatch: pytest.MonkeyPatch) -> ServedBroker:
    use_admin_env(monkeypatch, served.env("operator"))
    return served


def register(served: ServedBroker, party: str, key_id: str) -> str:
    """Registers a fresh data key as ``party``; returns the KEK ref the broker reports."""
    with served.client("party", party) as client:
        info = client.register_plain_data_key(key_id, os.urandom(32))
    return info.kek_ref


def kek_refs(served: ServedBroker) -> dict[str, str]:
    """key id -> kek_ref, straight from the broker's database."""
    with sqlite3.connect(served.workdir / "broker.db") as db:
        return dict(db.execute("SELECT key_id, kek_ref FROM data_keys").fetchall())


def test_a_party_with_a_configured_key_vault_kek_gets_its_keys_wrapped_by_key_vault(
    served: ServedBroker,
) -> None:
    unwraps = len(served.vault.recorded(method="POST", suffix="/unwrapkey"))
    assert register(served, "advertiser", "adv-data") == served.ref("advertiser-kek")
    assert register(served, "publisher", "pub-data") == "local"
    # The wrap was checked by one unwrap through the vault, as the broker's identity.
    assert len(served.vault.recorded(method="POST", suffix="/unwrapkey")) == unwraps + 1
    with served.client("operator") as operator:
        listed = {k.key_id: k.kek_ref for k in operator.list_data_keys()}
        choices = {k.party: (k.kek_ref, k.source) for k in operator.list_party_keks()}
    assert listed == {"adv-data": served.ref("advertiser-kek"), "pub-data": "local"}
    assert choices == {
        "advertiser": (served.ref("advertiser-kek"), "config"),
        "publisher": ("local", "default"),
    }
    # A clean stop: the Key Vault clients and credential are closed with the broker.
    assert served.stop() == 0


def test_operator_imports_checks_and_rewraps_with_the_cli(
    as_operator: ServedBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    """The commands of docs/admin-cli.md, "Key-encryption keys (operator)"."""
    served = as_operator
    publisher_ref = served.ref("publisher-kek")
    broker_ref = served.ref("broker-kek")
    versions = {k: v.versions[-1].version for k, v in served.vault.keys.items()}

    # cleanroom admin kek check REF
    out = admin(capsys, "kek", "check", publisher_ref)
    assert out == (
        f"{publisher_ref}: the broker wraps and unwraps with "
        f"{served.vault.key_url('publisher-kek', versions['publisher-kek'])}\n"
    )

    # cleanroom admin kek import --party NAME --ref REF
    doc = admin_json(capsys, "kek", "import", "--party", "publisher", "--ref", publisher_ref)
    assert doc["party"] == "publisher" and doc["kek_ref"] == publisher_ref
    assert doc["source"] == "imported"
    assert doc["checked_key"] == served.vault.key_url("publisher-kek", versions["publisher-kek"])
    listed = {d["party"]: d for d in admin_json(capsys, "kek", "list")}
    assert (listed["publisher"]["kek_ref"], listed["publisher"]["source"]) == (
        publisher_ref,
        "imported",
    )
    assert listed["advertiser"]["source"] == "config"
    # From now on the publisher's new keys are wrapped by its own Key Vault key.
    assert register(served, "publisher", "publisher-2024") == publisher_ref

    # An import takes precedence over the configuration, for the advertiser too.
    admin(capsys, "kek", "import", "--party", "advertiser", "--ref", "local")
    assert register(served, "advertiser", "advertiser-2024") == "local"

    # cleanroom admin key rewrap KEY_ID --kek REF: local -> Key Vault, then back.
    out = admin(capsys, "key", "rewrap", "advertiser-2024", "--kek", broker_ref)
    assert f"wrapped by:     {broker_ref}\n" in out
    assert "was wrapped by: local\n" in out
    assert kek_refs(served)["advertiser-2024"] == broker_ref
    keys = {k["key_id"]: k["kek_ref"] for k in admin_json(capsys, "key", "list")}
    assert keys["advertiser-2024"] == broker_ref
    doc = admin_json(capsys, "key", "rewrap", "advertiser-2024", "--kek", "local")
    assert (doc["kek_ref"], doc["previous_kek_ref"]) == ("local", broker_ref)

    records = admin_json(capsys, "audit", "list", "--limit", "1000")
    actions = [(r["action"], r["subject"], r["decision"]) for r in records]
    assert ("kek.check", publisher_ref, "allow") in actions
    assert ("party.kek", "publisher", "allow") in actions
    assert actions.count(("key.rewrap", "advertiser-2024", "allow")) == 2


def test_an_unusable_key_vault_ref_is_refused_with_the_reason(
    as_operator: ServedBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    served = as_operator
    missing = served.ref("no-such-key")
    err = admin_fails(capsys, "kek", "import", "--party", "publisher", "--ref", missing)
    assert "SetPartyKek: key not found: " in err and "[FAILED_PRECONDITION]" in err
    # The double answered 404 to the broker's read of the key: nothing was recorded.
    assert any(r.status == 404 for r in served.vault.recorded(method="GET"))
    listed = {d["party"]: d["source"] for d in admin_json(capsys, "kek", "list")}
    assert listed["publisher"] == "default"
    err = admin_fails(capsys, "kek", "check", missing)
    assert "CheckKek: key not found: " in err and "[FAILED_PRECONDITION]" in err

    # The broker's role was taken away: the import is refused as forbidden.
    served.vault.forbidden = True
    err = admin_fails(
        capsys, "kek", "import", "--party", "publisher", "--ref", served.ref("publisher-kek")
    )
    assert "SetPartyKek: forbidden: " in err and "Key Vault Crypto User" in err
    served.vault.forbidden = False

    # Malformed refs never reach the vault.
    err = admin_fails(capsys, "kek", "import", "--party", "publisher", "--ref", "azurekv:nope")
    assert "kek_ref" in err and "[INVALID_ARGUMENT]" in err
    err = admin_fails(capsys, "key", "rewrap", "pub-data", "--kek", "vault:x")
    assert "new_kek_ref" in err and "[INVALID_ARGUMENT]" in err
    err = admin_fails(capsys, "key", "rewrap", "no-such-key", "--kek", "local")
    assert "[NOT_FOUND]" in err
    err = admin_fails(capsys, "kek", "import", "--party", "nobody", "--ref", "local")
    assert "[NOT_FOUND]" in err

    records = admin_json(capsys, "audit", "list", "--limit", "1000")
    denials = [r["reason"] for r in records if r["action"] == "party.kek"]
    assert denials and all(r["decision"] == "deny" for r in records if r["action"] == "party.kek")
    assert denials[0].startswith(f"KEK {missing} refused: key not found:")


def test_a_party_whose_key_vault_kek_fails_gets_a_status_it_can_act_on(
    served: ServedBroker,
) -> None:
    """A transient Key Vault fault is UNAVAILABLE (retry later), a refusal for good is
    FAILED_PRECONDITION pointing at ``kek check``; neither names the vault to the party, and
    the operator reads the whole reason in the audit log."""
    # The broker's first request and both of its retries (retry_total = 2) get a 503.
    served.vault.fail_next(503, "ServiceUnavailable", times=3)
    with served.client("party", "advertiser") as client:
        with pytest.raises(UnavailableError) as transient:
            client.register_plain_data_key("adv-data", os.urandom(32))
        served.vault.forbidden = True
        with pytest.raises(FailedPreconditionError) as refused:
            client.register_plain_data_key("adv-data", os.urandom(32))
        served.vault.forbidden = False
        assert client.register_plain_data_key("adv-data", os.urandom(32)).kek_ref == served.ref(
            "advertiser-kek"
        )
    assert transient.value.details == KEK_UNAVAILABLE_MESSAGE
    assert refused.value.details == KEK_UNUSABLE_MESSAGE
    for error in (transient.value, refused.value):
        assert served.vault.url not in str(error) and "advertiser-kek" not in str(error)
    with served.client("operator") as operator:
        records = operator.list_audit_records(limit=1000)
    registrations = [(r.decision, r.reason) for r in records if r.action == "key.register"]
    assert [d for d, _ in registrations] == ["deny", "deny", "allow"]
    assert registrations[0][1].startswith("unavailable: ")
    assert registrations[1][1].startswith("forbidden: ") and "advertiser-kek" in registrations[1][1]


def test_a_party_cannot_call_the_kek_operations(served: ServedBroker) -> None:
    register(served, "publisher", "pub-data")
    env = served.env("party", "publisher")
    for argv in (
        ["kek", "import", "--party", "publisher", "--ref", served.ref("publisher-kek")],
        ["kek", "check", served.ref("publisher-kek")],
        ["kek", "list"],
        ["key", "rewrap", "pub-data", "--kek", served.ref("publisher-kek")],
    ):
        proc = subprocess.run(
            [str(CLEANROOM), "admin", *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "needs the operator role [PERMISSION_DENIED]" in proc.stderr, proc.stderr
    assert kek_refs(served) == {"pub-data": "local"}


def test_the_operator_learns_why_a_vault_cannot_be_reached_within_a_bounded_wait(
    as_operator: ServedBroker, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The cause class reaches the operator's KEK calls: a name that does not resolve (a
    reserved ``.invalid`` name: nothing leaves the machine), a certificate that does not
    verify, a vault that keeps failing; a lasting cause answers at once rather than after the
    retries. A party registering a key still gets the opaque message."""
    import time

    from cleanroom.app.emulators.keyvault import start_fake_key_vault

    served = as_operator
    began = time.monotonic()
    err = admin_fails(capsys, "kek", "check", "azurekv:https://nosuch-kv.vault.invalid/keys/kek")
    elapsed = time.monotonic() - began
    assert "unreachable (dns): the name nosuch-kv.vault.invalid does not resolve" in err, err
    assert "[FAILED_PRECONDITION]" in err
    assert elapsed < 5.0, elapsed  # before: UNAVAILABLE after the broker's and the CLI's retries

    # Another vault, whose certificate the broker's [keyvault] ca_file does not trust.
    other = start_fake_key_vault(tmp_path / "other-vault")
    try:
        other.create_key("kek")
        err = admin_fails(capsys, "kek", "check", f"azurekv:{other.key_url('kek')}")
    finally:
        other.stop()
    assert "unreachable (tls): the certificate of the vault does not verify" in err, err
    assert "ca_file" in err and "[FAILED_PRECONDITION]" in err

    # A vault that keeps answering 503: transient, UNAVAILABLE, with the cause for the operator.
    served.vault.fail_next(503, "ServiceUnavailable", times=100)
    err = admin_fails(capsys, "kek", "check", served.ref("publisher-kek"))
    assert "[UNAVAILABLE]" in err and "unavailable: Key Vault failed to read the key" in err
    assert "(503 ServiceUnavailable)" in err, err
    # ... and a party registering a key learns nothing of the vault.
    with served.client("party", "advertiser") as client:
        with pytest.raises(UnavailableError) as transient:
            client.register_plain_data_key("adv-data", os.urandom(32))
    assert transient.value.details == KEK_UNAVAILABLE_MESSAGE

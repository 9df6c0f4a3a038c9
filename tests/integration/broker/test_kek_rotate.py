"""``cleanroom broker kek rotate``: a new local KEK wraps every data key the old one wrapped
(the same keys: they unwrap to what the party registered), the database records its
fingerprint with an audit record, the broker serves again with it, the old KEK is kept aside
and opens nothing new; an interrupted rotation is finished or restarted by running it again;
a KEK file that is not the recorded one is refused."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.client import BrokerClient
from broker.config import load_broker_config
from broker.custody import LocalKek
from broker.errors import KekError
from broker.kek_rotate import rotate_local_kek
from broker.storage.store import Store
from cleanroom.v1 import common_pb2
from pki.ca import PkiLayout, init_pki
from sealing.keys import generate_recipient_key
from tests.support.broker import CLEANROOM, clean_env, spawn_broker
from tests.support.probes import write_config


@dataclass
class Room:
    config: Path
    pki: PkiLayout
    workdir: Path
    keys: dict[str, bytes]

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.workdir / 'broker.db'}"

    @property
    def kek_file(self) -> Path:
        return self.workdir / "state" / "kek.key"

    def wrapped(self) -> dict[str, bytes]:
        with Store.open(self.db_url, migrate=False) as store:
            return {r.key_id: r.wrapped_key for r in store.list_data_keys()}

    def unwrap_all(self, kek_file: Path) -> dict[str, bytes]:
        with (
            Store.open(self.db_url, migrate=False) as store,
            LocalKek.open(kek_file, create=False) as kek,
        ):
            return {
                r.key_id: bytes(kek.unwrap(r.wrapped_key, key_id=r.key_id, owner=r.owner))
                for r in store.list_data_keys()
            }

    def recorded_fingerprint(self) -> str:
        with Store.open(self.db_url, migrate=False) as store:
            return store.kek_fingerprints()["local"]


def _client(room: Room, address: str, kind: str, name: str = "") -> BrokerClient:
    cert, key = room.pki.cert_and_key(kind, name)
    return BrokerClient.connect(
        target=address, cert_file=cert, key_file=key, ca_file=room.pki.ca_cert
    )


@pytest.fixture
def room(tmp_path: Path) -> Iterator[Room]:
    pki = init_pki(tmp_path / "pki", parties=("advertiser",), sidecars=())
    config = write_config(tmp_path / "broker.toml", pki, f"sqlite:///{tmp_path / 'broker.db'}")
    spawned = spawn_broker(config, tmp_path)
    keys = {f"adv-{i}": os.urandom(32) for i in range(3)}
    try:
        with _client(Room(config, pki, tmp_path, {}), spawned.grpc_address, "operator") as op:
            public = generate_recipient_key().public_key()
            op.add_party(
                "advertiser",
                common_pb2.RecipientKey(
                    kem=common_pb2.KemAlgorithm.ValueType(public.kem), public_key=public.raw
                ),
            )
        with _client(
            Room(config, pki, tmp_path, {}), spawned.grpc_address, "party", "advertiser"
        ) as party:
            for key_id, key in keys.items():
                party.register_plain_data_key(key_id, key)
    finally:
        spawned.kill_all()
    yield Room(config, pki, tmp_path, keys)


def _rotate(room: Room) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLEANROOM), "broker", "kek", "rotate", "--config", str(room.config)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )


def test_rotation_rewraps_every_key_records_it_and_the_broker_serves_again(room: Room) -> None:
    before = room.wrapped()
    old_fingerprint = room.recorded_fingerprint()
    res = _rotate(room)
    assert res.returncode == 0, res.stderr
    assert "3 data key(s) rewrapped" in res.stdout

    with LocalKek.open(room.kek_file, create=False) as new:
        assert room.recorded_fingerprint() == new.fingerprint != old_fingerprint
        assert new.fingerprint in res.stdout
    previous = room.kek_file.with_name("kek.key.previous")
    with LocalKek.open(previous, create=False) as old:
        assert old.fingerprint == old_fingerprint
    # The same data keys, wrapped anew; the old KEK opens none of the new wrappings.
    after = room.wrapped()
    assert set(after) == set(before) and all(after[k] != before[k] for k in after)
    assert room.unwrap_all(room.kek_file) == room.keys
    with pytest.raises(KekError):
        room.unwrap_all(previous)
    assert not room.kek_file.with_name("kek.key.new").exists()

    # The broker starts with the new KEK (it refuses a KEK the database does not record), the
    # rotation is in the audit log and the chain holds.
    spawned = spawn_broker(room.config, room.workdir, init=False, stderr_name="again.stderr")
    try:
        with _client(room, spawned.grpc_address, "operator") as op:
            records = op.list_audit_records(limit=1000)
            report = op.verify_audit_log()
    finally:
        spawned.kill_all()
    rotations = [r for r in records if r.action == "kek.rotate"]
    assert len(rotations) == 1 and rotations[0].actor == "cleanroom broker kek rotate"
    assert old_fingerprint in rotations[0].reason and "3 data key(s)" in rotations[0].reason
    assert report.valid


def test_an_interrupted_rotation_is_finished_by_running_it_again(
    room: Room, monkeypatch: pytest.MonkeyPatch
) -> None:
    import broker.kek_rotate as kr

    # Stopped after the commit, before the files were renamed.
    def crash(*args: object) -> None:
        raise KekError("simulated crash before the renames")

    monkeypatch.setattr(kr, "_swap_files", crash)
    with pytest.raises(KekError, match="simulated crash"):
        rotate_local_kek(load_broker_config(room.config))
    monkeypatch.undo()
    pending = room.kek_file.with_name("kek.key.new")
    with LocalKek.open(pending, create=False) as new:
        assert room.recorded_fingerprint() == new.fingerprint
    done = rotate_local_kek(load_broker_config(room.config))
    assert done.resumed and not pending.exists()
    assert room.unwrap_all(room.kek_file) == room.keys


def test_a_stray_new_key_from_a_run_that_never_committed_is_discarded(room: Room) -> None:
    stray = room.kek_file.with_name("kek.key.new")
    shutil.copy(room.kek_file, stray)
    stray.write_bytes(os.urandom(32))
    stray.chmod(0o600)
    res = _rotate(room)
    assert res.returncode == 0, res.stderr
    assert room.unwrap_all(room.kek_file) == room.keys


def test_a_kek_file_that_is_not_the_recorded_one_is_refused(room: Room) -> None:
    room.kek_file.write_bytes(os.urandom(32))
    before = room.wrapped()
    res = _rotate(room)
    assert res.returncode == 1
    assert "is not the KEK to rotate" in res.stderr and res.stderr.count("\n") == 1
    assert room.wrapped() == before
    assert not room.kek_file.with_name("kek.key.new").exists()

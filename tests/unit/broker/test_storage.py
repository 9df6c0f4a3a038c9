"""The broker's Store against real SQLite files and a real PostgreSQL server.

Every test runs on both backends; the PostgreSQL runs are marked ``postgres``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from broker.errors import (
    CredentialError,
    DuplicateError,
    PolicyError,
    RevokedKeyError,
    StorageError,
    UnknownKeyError,
    UnknownPolicyObjectError,
)
from broker.model import (
    AkRecord,
    Approval,
    CredentialChallenge,
    DataKeyRecord,
    EkRecord,
    GoldenPcrSet,
    Party,
    PcrKey,
    Session,
)
from broker.storage import Store, UnknownSessionError
from broker.storage.fast import sqlite_time_text
from evidence.manifest import ManifestEntry

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]

T0 = datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'broker.db'}"
    url = request.getfixturevalue("postgres_url")
    assert isinstance(url, str)
    return url


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    with Store.open(db_url) as s:
        yield s


def ek(ek_id: str = "ek1", **kw: object) -> EkRecord:
    fields: dict[str, object] = {
        "ek_id": ek_id,
        "public": b"\x00\x01ek-public-" + ek_id.encode(),
        "certificate": b"0\x82cert",
        "enrolled_at": T0,
    }
    fields.update(kw)
    return EkRecord(**fields)  # type: ignore[arg-type]


def ak(ak_name: str = "000bak1", ek_id: str | None = "ek1") -> AkRecord:
    return AkRecord(
        ak_name=ak_name,
        public=b"\x00\x02ak-public-" + ak_name.encode(),
        ek_id=ek_id,
        enrolled_by="credential-activation" if ek_id else "operator",
        enrolled_at=T0,
    )


def party(name: str) -> Party:
    return Party(name=name, kem=1, public_key=name.encode() * 4)


def data_key(key_id: str, owner: str) -> DataKeyRecord:
    return DataKeyRecord(
        key_id=key_id,
        owner=owner,
        wrapped_key=b"wrapped:" + key_id.encode(),
        kek_ref="local",
        created_at=T0,
        description=f"{owner}'s {key_id}",
    )


PCR_A = bytes(range(32))
PCR_B = bytes(range(1, 33))


def approval(
    approval_id: str,
    party_name: str,
    key_ids: tuple[str, ...],
    *,
    pcr: bytes = PCR_A,
    recipients: tuple[str, ...] = (),
    golden: str | None = None,
    created_at: datetime = T0,
) -> Approval:
    return Approval(
        approval_id=approval_id,
        party=party_name,
        workload_name="train-model",
        manifest=(
            ManifestEntry(
                path="bin/train", size=1234, digests={"sha1": b"\x01" * 20, "sha256": b"\x02" * 32}
            ),
            ManifestEntry(path="model.py", size=99, digests={"sha256": b"\x03" * 32}),
        ),
        expected_pcrs={"sha1": b"\x09" * 20, "sha256": pcr},
        key_ids=key_ids,
        output_recipients=recipients,
        golden_set=golden,
        created_at=created_at,
    )


# --- EKs and AKs ---------------------------------------------------------------------------


def test_ek_round_trip_duplicate_and_unknown(store: Store) -> None:
    record = ek("ek1")
    store.add_ek(record)
    store.add_ek(ek("ek0", certificate=None))
    assert store.get_ek("ek1") == record
    assert store.get_ek("ek0").certificate is None
    assert [e.ek_id for e in store.list_eks()] == ["ek0", "ek1"]
    with pytest.raises(DuplicateError, match="ek1"):
        store.add_ek(ek("ek1"))
    with pytest.raises(UnknownKeyError):
        store.get_ek("nope")


def test_ak_round_trip_duplicate_unknown_and_ek_checks(store: Store) -> None:
    store.add_ek(ek("ek1"))
    record = ak("000baa", "ek1")
    store.add_ak(record)
    operator = ak("000bbb", None)
    store.add_ak(operator)
    assert store.get_ak("000baa") == record
    assert store.get_ak("000bbb") == operator
    assert store.list_aks() == [record, operator]
    with pytest.raises(DuplicateError):
        store.add_ak(ak("000baa", "ek1"))
    with pytest.raises(UnknownKeyError):
        store.get_ak("000bzz")
    with pytest.raises(UnknownKeyError, match="ek-missing"):
        store.add_ak(ak("000bcc", "ek-missing"))
    store.revoke_ek("ek1", "compromised")
    with pytest.raises(RevokedKeyError):
        store.add_ak(ak("000bdd", "ek1"))
    assert [a.ak_name for a in store.list_aks()] == ["000baa", "000bbb"]


def test_revoking_an_ek_revokes_its_aks_only(store: Store) -> None:
    store.add_ek(ek("ek1"))
    store.add_ek(ek("ek2"))
    store.add_ak(ak("a1", "ek1"))
    store.add_ak(ak("b1", "ek2"))
    store.add_ak(ak("op", None))
    store.revoke_ek("ek1", "vendor recall")
    ek1 = store.get_ek("ek1")
    assert ek1.revoked and ek1.revoked_reason == "vendor recall"
    assert store.get_ak("a1").revoked
    assert store.get_ak("a1").revoked_reason == "EK revoked: vendor recall"
    assert not store.get_ak("b1").revoked
    assert not store.get_ak("op").revoked
    assert not store.get_ek("ek2").revoked
    # Revoking again keeps the first reason.
    store.revoke_ek("ek1", "again")
    assert store.get_ek("ek1").revoked_reason == "vendor recall"
    with pytest.raises(UnknownKeyError):
        store.revoke_ek("nope", "x")
    with pytest.raises(UnknownKeyError):
        store.revoke_ak("nope", "x")
    assert store.revoke_ak("op", "retired") is None
    assert store.get_ak("op").revoked_reason == "retired"


def test_revoking_an_ak_keeps_its_ek_out_until_readmitted(store: Store) -> None:
    store.add_ek(ek("ek1"))
    store.add_ak(ak("a1", "ek1"))
    store.add_ak(ak("a2", "ek1"))
    assert store.revoke_ak("a2", "lost") == "ek1"
    ek1 = store.get_ek("ek1")
    assert ek1.revoked and ek1.revoked_reason == "AK a2 revoked: lost"
    # The EK is out: no new AK under it, and the attester read shows both states.
    with pytest.raises(RevokedKeyError, match="EK ek1 is revoked"):
        store.add_ak(ak("a3", "ek1"))
    a1, ek_of_a1 = store.get_attester("a1")
    assert not a1.revoked and ek_of_a1 is not None and ek_of_a1.revoked
    # An EK revocation after it keeps the first reason; revoking another AK blocks nothing new.
    store.revoke_ek("ek1", "vendor recall")
    assert store.get_ek("ek1").revoked_reason == "AK a2 revoked: lost"
    assert store.revoke_ak("a1", "x") is None
    # Re-admission lifts the EK's revocation, not the AKs'.
    assert store.readmit_ek("ek1") == "AK a2 revoked: lost"
    assert not store.get_ek("ek1").revoked
    assert store.get_ak("a2").revoked and store.get_ak("a1").revoked
    assert store.readmit_ek("ek1") is None
    store.add_ak(ak("a3", "ek1"))
    with pytest.raises(UnknownKeyError):
        store.readmit_ek("nope")


def test_attester_read_joins_the_ek(store: Store) -> None:
    store.add_ek(ek("ek1"))
    store.add_ak(ak("a1", "ek1"))
    store.add_ak(ak("op", None))
    a1, ek1 = store.get_attester("a1")
    assert a1 == store.get_ak("a1") and ek1 == store.get_ek("ek1")
    assert store.get_attester("op") == (store.get_ak("op"), None)
    with pytest.raises(UnknownKeyError, match="not enrolled"):
        store.get_attester("nope")


def test_an_activated_ak_enrolls_its_ek_with_it(store: Store) -> None:
    assert store.add_activated_ak(ek("ek1"), ak("a1", "ek1")) is True
    assert store.get_ak("a1").ek_id == "ek1" and store.get_ek("ek1").public == ek("ek1").public
    assert store.add_activated_ak(ek("ek1"), ak("a2", "ek1")) is False
    with pytest.raises(DuplicateError):
        store.add_activated_ak(ek("ek1"), ak("a2", "ek1"))
    store.revoke_ek("ek1", "stolen")
    with pytest.raises(RevokedKeyError, match="EK ek1 is revoked"):
        store.add_activated_ak(ek("ek1"), ak("a3", "ek1"))
    assert [a.ak_name for a in store.list_aks()] == ["a1", "a2"]


# --- credential challenges -----------------------------------------------------------------

SIDECAR = "spiffe://cleanroom.test/sidecar/one"


def challenge(enrollment_id: str, ak_name: str, expires_at: datetime) -> CredentialChallenge:
    return CredentialChallenge(
        enrollment_id=enrollment_id,
        ak_name=ak_name,
        ak_public=b"akpub",
        ek_id="ek1",
        secret_digest=b"\x05" * 32,
        expires_at=expires_at,
        ek_public=b"ekpub",
        ek_certificate=b"cert",
        requester=SIDECAR,
    )


def test_credential_challenge_is_taken_once(store: Store) -> None:
    c = challenge("enr-1", "ak-a", T0 + timedelta(minutes=5))
    store.put_credential_challenge(c)
    assert store.take_credential_challenge("enr-1", T0, SIDECAR) == c
    with pytest.raises(CredentialError, match="unknown"):
        store.take_credential_challenge("enr-1", T0, SIDECAR)
    with pytest.raises(CredentialError, match="unknown"):
        store.take_credential_challenge("never", T0, SIDECAR)


def test_a_credential_challenge_is_taken_only_by_its_requester(store: Store) -> None:
    c = challenge("enr-1", "ak-a", T0 + timedelta(minutes=5))
    store.put_credential_challenge(c)
    other = "spiffe://cleanroom.test/sidecar/other"
    with pytest.raises(CredentialError, match=f"issued to {SIDECAR}, not to {other}"):
        store.take_credential_challenge("enr-1", T0, other)
    # The other identity's attempt left it in place for its requester.
    assert store.take_credential_challenge("enr-1", T0, SIDECAR) == c


def test_one_outstanding_credential_challenge_per_ak(store: Store) -> None:
    store.put_credential_challenge(challenge("enr-1", "ak-a", T0 + timedelta(minutes=5)))
    store.put_credential_challenge(challenge("enr-x", "ak-b", T0 + timedelta(minutes=5)))
    newer = challenge("enr-2", "ak-a", T0 + timedelta(minutes=6))
    store.put_credential_challenge(newer)
    with pytest.raises(CredentialError, match="unknown"):
        store.take_credential_challenge("enr-1", T0, SIDECAR)
    assert store.take_credential_challenge("enr-2", T0, SIDECAR) == newer
    # Another AK's challenge was untouched, and its id cannot be reused by a third AK.
    with pytest.raises(DuplicateError):
        store.put_credential_challenge(challenge("enr-x", "ak-c", T0 + timedelta(minutes=5)))
    assert store.take_credential_challenge("enr-x", T0, SIDECAR).ak_name == "ak-b"


def test_expired_credential_challenge_is_refused_and_removed(store: Store) -> None:
    store.put_credential_challenge(challenge("enr-1", "ak-a", T0 + timedelta(seconds=10)))
    with pytest.raises(CredentialError, match="expired"):
        store.take_credential_challenge("enr-1", T0 + timedelta(seconds=10), SIDECAR)
    with pytest.raises(CredentialError, match="unknown"):
        store.take_credential_challenge("enr-1", T0, SIDECAR)
    store.put_credential_challenge(challenge("enr-2", "ak-a", T0 + timedelta(seconds=10)))
    store.put_credential_challenge(challenge("enr-3", "ak-b", T0 + timedelta(seconds=30)))
    assert store.purge_credential_challenges(T0 + timedelta(seconds=20)) == 1
    assert store.take_credential_challenge("enr-3", T0, SIDECAR).ak_name == "ak-b"


# --- golden sets ---------------------------------------------------------------------------


def test_golden_set_upsert_list_delete(store: Store) -> None:
    golden = GoldenPcrSet(
        name="image-v1",
        accepted={
            PcrKey(23, "sha256"): frozenset({b"\x01" * 32, b"\x02" * 32}),
            PcrKey(23, "sha1"): frozenset({b"\x03" * 20}),
            PcrKey(7, "sha256"): frozenset({b"\x04" * 32}),
        },
        updated_at=T0,
    )
    store.put_golden_set(golden)
    assert store.get_golden_set("image-v1") == golden
    replaced = GoldenPcrSet(
        name="image-v1",
        accepted={PcrKey(23, "sha256"): frozenset({b"\x05" * 32})},
        updated_at=T0 + timedelta(days=1),
    )
    store.put_golden_set(replaced)
    assert store.get_golden_set("image-v1") == replaced
    store.put_golden_set(GoldenPcrSet(name="empty", accepted={}, updated_at=T0))
    assert [g.name for g in store.list_golden_sets()] == ["empty", "image-v1"]
    store.delete_golden_set("empty")
    with pytest.raises(UnknownPolicyObjectError):
        store.get_golden_set("empty")
    with pytest.raises(UnknownPolicyObjectError):
        store.delete_golden_set("empty")


# --- parties and data keys -----------------------------------------------------------------


def test_party_round_trip(store: Store) -> None:
    store.add_party(party("publisher"))
    store.add_party(party("advertiser"))
    assert store.get_party("publisher") == party("publisher")
    assert [p.name for p in store.list_parties()] == ["advertiser", "publisher"]
    with pytest.raises(DuplicateError):
        store.add_party(party("publisher"))
    with pytest.raises(UnknownPolicyObjectError):
        store.get_party("nobody")


def test_data_keys_round_trip_owner_and_rewrap(store: Store) -> None:
    store.add_party(party("adv"))
    store.add_party(party("pub"))
    k1, k2, k3 = data_key("k1", "adv"), data_key("k2", "pub"), data_key("k3", "adv")
    for k in (k1, k2, k3):
        store.add_data_key(k)
    assert store.get_data_key("k2") == k2
    assert store.list_data_keys() == [k1, k2, k3]
    assert store.list_data_keys(owner="adv") == [k1, k3]
    assert store.get_data_keys(["k3", "k1"]) == [k3, k1]
    with pytest.raises(UnknownPolicyObjectError, match="k9"):
        store.get_data_keys(["k1", "k9"])
    with pytest.raises(DuplicateError):
        store.add_data_key(data_key("k1", "adv"))
    with pytest.raises(UnknownPolicyObjectError, match="nobody"):
        store.add_data_key(data_key("k4", "nobody"))
    with pytest.raises(UnknownPolicyObjectError):
        store.get_data_key("k4")
    store.rewrap_data_key("k1", b"rewrapped", "https://vault.example/keys/kek/2")
    after = store.get_data_key("k1")
    assert (after.wrapped_key, after.kek_ref) == (b"rewrapped", "https://vault.example/keys/kek/2")
    assert after.created_at == k1.created_at and after.owner == "adv"
    with pytest.raises(UnknownPolicyObjectError):
        store.rewrap_data_key("k9", b"x", "local")


# --- approvals -----------------------------------------------------------------------------


@pytest.fixture
def policy_store(store: Store) -> Store:
    for name in ("adv", "pub", "viewer"):
        store.add_party(party(name))
    store.add_data_key(data_key("adv-k1", "adv"))
    store.add_data_key(data_key("adv-k2", "adv"))
    store.add_data_key(data_key("pub-k1", "pub"))
    store.put_golden_set(GoldenPcrSet(name="boot", accepted={}, updated_at=T0))
    return store


def test_approval_round_trip_and_find_active(policy_store: Store) -> None:
    store = policy_store
    a1 = approval("a1", "adv", ("adv-k2", "adv-k1"), recipients=("adv", "viewer"), golden="boot")
    a2 = approval("a2", "pub", ("pub-k1",), created_at=T0 + timedelta(seconds=1))
    a3 = approval("a3", "adv", ("adv-k1",), pcr=PCR_B)
    for a in (a1, a2, a3):
        store.add_approval(a)
    assert store.get_approval("a1") == a1
    assert store.find_active_approvals(PCR_A) == [a1, a2]
    assert store.find_active_approvals(PCR_B) == [a3]
    assert store.find_active_approvals(b"\xff" * 32) == []
    store.revoke_approval("a1")
    assert store.find_active_approvals(PCR_A) == [a2]
    assert store.get_approval("a1").revoked
    assert [a.approval_id for a in store.list_approvals()] == ["a1", "a3", "a2"]
    assert [a.approval_id for a in store.list_approvals(party="adv")] == ["a1", "a3"]
    assert [a.approval_id for a in store.list_approvals(include_revoked=False)] == ["a3", "a2"]
    store.revoke_approval("a1")  # idempotent
    with pytest.raises(UnknownPolicyObjectError):
        store.revoke_approval("zz")
    with pytest.raises(UnknownPolicyObjectError):
        store.get_approval("zz")
    with pytest.raises(DuplicateError):
        store.add_approval(approval("a2", "pub", ("pub-k1",)))


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (approval("x", "nobody", ()), UnknownPolicyObjectError, "party 'nobody'"),
        (approval("x", "adv", ("adv-k9",)), UnknownPolicyObjectError, "adv-k9"),
        (approval("x", "adv", ("pub-k1",)), PolicyError, "another party"),
        (approval("x", "adv", ("adv-k1", "adv-k1")), PolicyError, "twice"),
        (
            approval("x", "adv", ("adv-k1",), recipients=("ghost",)),
            UnknownPolicyObjectError,
            "ghost",
        ),
        (approval("x", "adv", ("adv-k1",), golden="nope"), UnknownPolicyObjectError, "nope"),
        (approval("x", "adv", ("adv-k1",), pcr=b"\x01" * 20), PolicyError, "sha256"),
    ],
)
def test_approval_refused_when_it_names_something_wrong(
    policy_store: Store, bad: Approval, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message) as info:
        policy_store.add_approval(bad)
    assert type(info.value) is error
    with pytest.raises(UnknownPolicyObjectError):
        policy_store.get_approval("x")


def test_approval_without_sha256_is_refused(policy_store: Store) -> None:
    a = approval("x", "adv", ("adv-k1",))
    only_sha1 = Approval(**{**a.__dict__, "expected_pcrs": {"sha1": b"\x00" * 20}})
    with pytest.raises(PolicyError, match="sha256"):
        policy_store.add_approval(only_sha1)


# --- sessions ------------------------------------------------------------------------------


def test_session_round_trip_and_end(store: Store) -> None:
    store.add_ak(ak("op", None))
    s = Session(
        session_id="s1",
        ak_name="op",
        peer="spiffe://cleanroom.local/sidecar/one",
        started_at=T0,
        expires_at=T0 + timedelta(hours=1),
        released_key_ids=("k1", "k2"),
    )
    store.add_session(s)
    assert store.get_session("s1") == s
    ended = store.end_session("s1", T0 + timedelta(minutes=3), 0)
    assert ended.ended_at == T0 + timedelta(minutes=3) and ended.exit_code == 0
    assert store.get_session("s1") == ended
    # A retried end changes nothing.
    assert store.end_session("s1", T0 + timedelta(minutes=9), 1) == ended
    with pytest.raises(UnknownSessionError):
        store.end_session("s9", T0, 0)
    with pytest.raises(UnknownSessionError):
        store.get_session("s9")
    with pytest.raises(DuplicateError):
        store.add_session(s)
    with pytest.raises(UnknownKeyError):
        store.add_session(Session(**{**s.__dict__, "session_id": "s2", "ak_name": "ghost"}))


# --- times, errors, life cycle -------------------------------------------------------------


def test_times_keep_microseconds_and_come_back_in_utc(store: Store) -> None:
    cet = timezone(timedelta(hours=1))
    local = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=cet)
    store.add_ek(ek("ek1", enrolled_at=local))
    got = store.get_ek("ek1").enrolled_at
    assert got == local
    assert got.tzinfo is UTC and got.microsecond == 678901 and got.hour == 2


def test_naive_times_are_refused(store: Store) -> None:
    with pytest.raises(StorageError, match="naive"):
        store.add_ek(ek("ek1", enrolled_at=datetime(2025, 1, 1)))


def test_key_material_stays_out_of_error_messages(store: Store) -> None:
    store.add_party(party("adv"))
    secret = b"wrapped-secret-bytes-0123456789"
    store.add_data_key(DataKeyRecord("k1", "adv", secret, "local", T0))
    # Bypass the duplicate mapping: a raw constraint failure through transaction().
    with pytest.raises(StorageError) as info, store.transaction("raw insert", write=True) as c:
        c.execute(
            sa.text(
                "INSERT INTO data_keys (key_id, owner, wrapped_key, kek_ref, created_at, "
                "description) VALUES ('k1', 'adv', :w, 'local', :t, '')"
            ),
            {"w": secret, "t": T0.replace(tzinfo=None)},
        )
    text = str(info.value)
    assert "raw insert" in text
    assert secret.hex() not in text and "wrapped-secret" not in text


def test_closed_store_refuses_work(db_url: str) -> None:
    s = Store.open(db_url)
    s.close()
    with pytest.raises(StorageError, match="closed"):
        s.list_eks()


def test_sqlite_runs_in_wal_with_foreign_keys(tmp_path: Path) -> None:
    with Store.open(f"sqlite:///{tmp_path / 'b.db'}") as s, s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://", "in-memory"),
        ("sqlite:///:memory:", "in-memory"),
        ("mysql://u:p@h/db", "unsupported database backend"),
        ("not a url", "invalid database URL"),
    ],
)
def test_bad_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(StorageError, match=message):
        Store.open(url)


def test_unreachable_postgres_names_the_host_not_the_password() -> None:
    from tests.harness.net import free_port

    port = free_port()  # nothing listens there
    url = f"postgresql+psycopg://broker:Sup3rS3cret@127.0.0.1:{port}/cleanroom"
    with pytest.raises(StorageError) as info:
        Store.open(url, connect_timeout_seconds=2)
    text = str(info.value)
    assert "127.0.0.1" in text and str(port) in text
    assert "Sup3rS3cret" not in text


def test_missing_sqlite_directory_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot open database"):
        Store.open(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'b.db'}")


def test_hot_path_and_core_store_sqlite_times_alike(tmp_path: Path) -> None:
    """The hot path writes times itself on SQLite; they must match SQLAlchemy's text format."""
    with Store.open(f"sqlite:///{tmp_path / 'b.db'}") as s:
        s.add_ek(ek("ek1", enrolled_at=T0))  # through SQLAlchemy Core
        s.add_ak(ak("op", None))
        s.add_session(  # through the hot path
            Session("s1", "op", "peer", T0, T0 + timedelta(hours=1), ())
        )
        with s.engine.connect() as conn:
            core = conn.exec_driver_sql("SELECT enrolled_at FROM eks").scalar()
            fast = conn.exec_driver_sql("SELECT started_at FROM sessions").scalar()
        assert core == fast == sqlite_time_text(T0) == "2025-03-04 05:06:07.123456"
        assert s.get_session("s1").started_at == T0  # hot-path write, Core read
        assert s.get_ek("ek1").enrolled_at == T0  # Core write, hot-path read


def test_naive_times_are_refused_on_the_hot_path(store: Store) -> None:
    store.add_ak(ak("op", None))
    naive = datetime(2025, 1, 1)
    with pytest.raises(StorageError, match="naive"):
        store.add_session(Session("s1", "op", "peer", naive, naive, ()))


@pytest.mark.postgres
def test_store_recovers_when_the_server_drops_its_connections(postgres_url: str) -> None:
    with Store.open(postgres_url) as s:
        s.add_ak(ak("op", None))
        assert s.get_ak("op").ak_name == "op"  # the hot-path pool has a connection now
        assert len(s.list_aks()) == 1  # and so has Core's
        admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                killed = conn.execute(
                    sa.text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).scalar()
        finally:
            admin.dispose()
        assert killed and killed >= 2
        failures: list[str] = []
        for _ in range(3):
            for call in (lambda: s.get_ak("op"), s.list_aks):
                try:
                    call()
                except StorageError as e:
                    failures.append(str(e))
        # At most one failure per pool, naming the database, then the pools reconnect.
        assert len(failures) <= 2, failures
        assert all("127.0.0.1" in f for f in failures)
        assert s.get_ak("op").ak_name == "op" and len(s.list_aks()) == 1


@pytest.mark.postgres
def test_a_bare_postgresql_url_means_psycopg(postgres_url: str) -> None:
    bare = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    assert bare != postgres_url
    with Store.open(bare) as s:
        assert s.dialect == "postgresql"
        s.add_party(party("adv"))
        assert s.get_party("adv") == party("adv")


def test_an_approvals_launch_round_trips_and_its_files_find_it(policy_store: Store) -> None:
    from evidence.launch import Launch
    from evidence.pcr import MeasurementEvent, replay

    store = policy_store
    launch = Launch.create(
        argv=("/usr/bin/python3", "bin/train", "--x", "a b"),
        executable_sha256=b"\x07" * 32,
        env={"LANG": "C.UTF-8", "Z": ""},
        cwd="/srv/w",
    )
    a = replace(approval("a-launch", "adv", ("adv-k1",), pcr=PCR_B), launch=launch)
    store.add_approval(a)
    assert store.get_approval("a-launch") == a
    files = [MeasurementEvent(e.path, e.size, e.digests) for e in a.manifest]
    files_pcr = replay(files, ["sha256"])["sha256"]
    # Found by its full PCR 23, and by the PCR 23 of its files alone (another launch measured).
    assert store.find_active_approvals(PCR_B) == [a]
    assert store.find_active_approvals(b"\xee" * 32, files_pcr_sha256=files_pcr) == [a]
    assert store.find_active_approvals(b"\xee" * 32, files_pcr_sha256=b"\xdd" * 32) == []

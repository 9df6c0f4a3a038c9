"""Per-party KEKs: ``[broker.party_keks]``, the operator's imported KEK (storage and its
migration, on SQLite and PostgreSQL), which KEK a party's new keys get, the KEK check, and the
request validation and status mapping of the key-custody RPCs.

Real components throughout: SQLite/PostgreSQL, the local KEK, and for the provider a second
real AES-GCM KEK under another ref (:class:`RefKek`). The Key Vault double is in the
integration tests (tests/integration/broker/test_kek_admin*.py).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from broker import rotation
from broker.app import open_broker
from broker.config import BrokerConfig, load_broker_config
from broker.core import Broker
from broker.custody import LOCAL_KEK_REF, KekRegistry, LocalKek, check_kek
from broker.errors import KekError, KekUnavailableError, UnknownPolicyObjectError
from broker.kek_azure import KEYVAULT_REF_PREFIX, KeyVaultConfig, KeyVaultKek
from broker.keyseal import seal_for_registration
from broker.model import Party
from broker.server import validate
from broker.server.errors import InvalidRequestError
from broker.server.status import KEK_UNAVAILABLE_MESSAGE, KEK_UNUSABLE_MESSAGE, status_for
from broker.storage import Store
from broker.storage import migrate as storage_migrate
from broker.storage.engine import install_sqlite_hooks
from broker.storage.schema import parties
from cleanroom.config import ConfigError
from cleanroom.v1 import admin_pb2
from pki.identity import SpiffeId
from sealing.keys import generate_recipient_key
from tests.support.kek import RefKek

TD = "cleanroom.local"
OPERATOR = SpiffeId.operator(TD)
ADMIN = "/cleanroom.v1.AdminService"
KV_REF = "azurekv:https://cleanroom-kv.vault.azure.net/keys/advertiser-kek"


def _party(name: str) -> Party:
    public = generate_recipient_key().public_key()
    return Party(name=name, kem=public.kem, public_key=public.raw)


# --- configuration ---------------------------------------------------------------------------


def test_party_keks_load_from_their_own_table(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(
        '[broker]\ndefault_kek = "local"\n'
        f'[broker.party_keks]\nadvertiser = "{KV_REF}"\n'
        '[keyvault]\ncredential = "managed-identity"\n'
    )
    config = load_broker_config(path)
    assert config.party_keks == {"advertiser": KV_REF}
    assert config.kek_for_party("advertiser") == KV_REF
    assert config.kek_for_party("publisher") == "local"
    assert BrokerConfig().party_keks == {}


@pytest.mark.parametrize(
    ("party_keks", "message"),
    [
        ({"not a name": "local"}, "party_keks: party name"),
        ({"..": "local"}, "party_keks: party name"),
        ({"advertiser": " "}, "party_keks.advertiser must name a KEK"),
    ],
)
def test_malformed_party_keks_are_refused(party_keks: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BrokerConfig(party_keks=party_keks)


def test_the_config_keeps_its_own_copy_of_party_keks() -> None:
    mine = {"advertiser": "local"}
    config = BrokerConfig(party_keks=mine)
    mine["advertiser"] = KV_REF
    assert config.kek_for_party("advertiser") == "local"


# --- opening the broker ----------------------------------------------------------------------


def _config(tmp_path: Path, **kwargs: object) -> BrokerConfig:
    return BrokerConfig(
        database_url=f"sqlite:///{tmp_path / 'broker.db'}",
        state_dir=str(tmp_path / "state"),
        **kwargs,  # type: ignore[arg-type]
    )


def test_the_key_vault_ref_prefix_is_the_providers() -> None:
    assert validate.KEYVAULT_REF_PREFIX == KEYVAULT_REF_PREFIX
    assert validate.LOCAL_KEK_REF == LOCAL_KEK_REF


def test_with_key_vault_settings_azurekv_refs_resolve(tmp_path: Path) -> None:
    settings = KeyVaultConfig(credential="static-token", access_token="t", unwrap_cache_seconds=0)
    config = _config(tmp_path, party_keks={"advertiser": KV_REF})
    with open_broker(config, key_vault=settings) as broker:
        kek = broker.keks.get(KV_REF)
        assert isinstance(kek, KeyVaultKek)
        assert kek.config is settings
    # Closing the broker closed the KEK (and the provider's credential).
    with pytest.raises(KekError, match="closed"):
        kek.current_key()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"default_kek": "hsm:1"}, "configured KEK 'hsm:1' is unusable: no KEK is configured"),
        ({"party_keks": {"advertiser": "azurekv:http://x/keys/k"}}, "not an https Key Vault"),
    ],
)
def test_an_unusable_configured_kek_stops_the_start(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(KekError, match=message):
        open_broker(_config(tmp_path, **kwargs), key_vault=KeyVaultConfig())


def test_without_key_vault_settings_azurekv_refs_are_left_to_the_caller(tmp_path: Path) -> None:
    with open_broker(_config(tmp_path, default_kek=KV_REF)) as broker:
        with pytest.raises(KekError, match="no KEK is configured"):
            broker.keks.get(KV_REF)


# --- the registry and the check --------------------------------------------------------------


class ClosableProvider:
    """A provider that builds :class:`RefKek` and knows whether it was closed."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.closed = 0

    def __call__(self, ref: str) -> RefKek:
        return RefKek(ref, self.directory / "provider.key")

    def close(self) -> None:
        self.closed += 1


def test_the_registry_closes_its_providers(tmp_path: Path) -> None:
    provider = ClosableProvider(tmp_path)
    registry = KekRegistry.open_local(tmp_path / "state")
    registry.add_provider("test:", provider)
    registry.get("test:a")
    registry.close()
    registry.close()
    assert provider.closed == 2  # idempotent on the provider's side, as Key Vault's is


def test_check_kek_round_trips_a_key(tmp_path: Path) -> None:
    with LocalKek.open(tmp_path / "kek.key") as kek:
        assert check_kek(kek) == "local"
    with pytest.raises(KekError, match="closed"):
        check_kek(kek)


# --- storage and its migration -----------------------------------------------------------------


def test_party_keks_are_stored_replaced_and_listed(db_url: str) -> None:
    now = dt.datetime(2025, 2, 1, 12, 0, tzinfo=dt.UTC)
    with Store.open(db_url) as store:
        store.add_party(_party("advertiser"))
        store.add_party(_party("publisher"))
        assert store.get_party_kek("advertiser") is None
        store.set_party_kek("advertiser", KV_REF, checked_key=KV_REF + "/v1", updated_at=now)
        later = now + dt.timedelta(hours=1)
        store.set_party_kek("advertiser", "local", checked_key="local", updated_at=later)
        store.set_party_kek("publisher", KV_REF, checked_key=KV_REF + "/v2", updated_at=now)
        record = store.get_party_kek("advertiser")
        assert record is not None
        assert (record.kek_ref, record.checked_key, record.updated_at) == ("local", "local", later)
        assert [(k.party, k.kek_ref) for k in store.list_party_keks()] == [
            ("advertiser", "local"),
            ("publisher", KV_REF),
        ]
        with pytest.raises(UnknownPolicyObjectError, match="party 'nobody' does not exist"):
            store.set_party_kek("nobody", "local", checked_key="local", updated_at=now)


def test_a_database_at_the_first_revision_upgrades_and_keeps_its_parties(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    if engine.dialect.name == "sqlite":
        install_sqlite_hooks(engine, busy_timeout_ms=5000, synchronous="NORMAL")
    try:
        with engine.connect() as conn:
            storage_migrate.upgrade(conn, "0001")
        with engine.connect() as conn:
            assert storage_migrate.current_revision(conn) == "0001"
            assert "party_keks" not in sa.inspect(conn).get_table_names()
        party = _party("advertiser")
        with engine.begin() as conn:
            conn.execute(
                sa.insert(parties).values(
                    name=party.name, kem=party.kem, public_key=party.public_key
                )
            )
    finally:
        engine.dispose()
    with Store.open(db_url, migrate=True) as store:
        assert store.get_party("advertiser") == party
        store.set_party_kek(
            "advertiser", KV_REF, checked_key=KV_REF, updated_at=dt.datetime.now(dt.UTC)
        )
        assert [k.party for k in store.list_party_keks()] == ["advertiser"]


# --- which KEK a party's keys get ----------------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    config = _config(tmp_path, party_keks={"advertiser": "test:advertiser"})
    with open_broker(config) as b:
        b.keks.add_provider("test:", ClosableProvider(tmp_path))
        for name in ("advertiser", "publisher"):
            b.add_party(OPERATOR, _party(name))
        yield b


def _register(broker: Broker, party: str, key_id: str) -> str:
    sealed = seal_for_registration(
        broker.registration_key.public_key(), b"\x22" * 32, key_id=key_id, owner=party
    )
    return broker.register_data_key(
        SpiffeId.party(TD, party), key_id=key_id, sealed_data_key=sealed, description=""
    ).kek_ref


def test_imported_then_configured_then_default(broker: Broker) -> None:
    assert _register(broker, "advertiser", "a1") == "test:advertiser"
    assert _register(broker, "publisher", "p1") == "local"
    record = rotation.set_party_kek(broker, "publisher", "test:publisher", actor=OPERATOR)
    assert (record.kek_ref, record.checked_key) == ("test:publisher", "test:publisher")
    rotation.set_party_kek(broker, "advertiser", "local", actor=OPERATOR)
    assert _register(broker, "publisher", "p2") == "test:publisher"
    assert _register(broker, "advertiser", "a2") == "local"
    # Keys registered before keep their wrapping.
    assert broker.store.get_data_key("a1").kek_ref == "test:advertiser"
    choices = {c.party: (c.kek_ref, c.source) for c in rotation.party_keks(broker)}
    assert choices == {
        "advertiser": ("local", "imported"),
        "publisher": ("test:publisher", "imported"),
    }


def test_an_unusable_kek_is_not_recorded_and_the_refusal_is_audited(broker: Broker) -> None:
    with pytest.raises(KekError, match="no KEK is configured for ref 'hsm:x'"):
        rotation.set_party_kek(broker, "publisher", "hsm:x", actor=OPERATOR)
    with pytest.raises(UnknownPolicyObjectError):
        rotation.set_party_kek(broker, "nobody", "local", actor=OPERATOR)
    with pytest.raises(KekError, match="no KEK is configured"):
        rotation.check_kek(broker, "hsm:x", actor=OPERATOR)
    assert broker.store.list_party_keks() == []
    records = broker.audit.list_records(after_sequence=0, limit=100)
    refusals = [(r.action, r.subject, r.decision) for r in records if r.decision == "deny"]
    assert refusals == [
        ("party.kek", "publisher", "deny"),
        ("party.kek", "nobody", "deny"),
        ("kek.check", "hsm:x", "deny"),
    ]
    assert rotation.check_kek(broker, "local", actor=OPERATOR) == "local"


# --- validation and status codes -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (admin_pb2.SetPartyKekRequest(party="", kek_ref="local"), "party"),
        (admin_pb2.SetPartyKekRequest(party="a b", kek_ref="local"), "party"),
        (admin_pb2.SetPartyKekRequest(party="advertiser", kek_ref=""), "kek_ref"),
        (admin_pb2.SetPartyKekRequest(party="advertiser", kek_ref="Local"), "kek_ref"),
        (admin_pb2.SetPartyKekRequest(party="advertiser", kek_ref="azurekv:x"), "kek_ref"),
        (
            admin_pb2.SetPartyKekRequest(party="advertiser", kek_ref=KV_REF + "/a/b"),
            "kek_ref",
        ),
        (
            admin_pb2.SetPartyKekRequest(
                party="advertiser", kek_ref="azurekv:https://" + "v" * 1100
            ),
            "kek_ref",
        ),
        (admin_pb2.RewrapDataKeyRequest(key_id="", new_kek_ref="local"), "key_id"),
        (admin_pb2.RewrapDataKeyRequest(key_id="k", new_kek_ref="hsm:1"), "new_kek_ref"),
        (admin_pb2.CheckKekRequest(kek_ref=""), "kek_ref"),
    ],
)
def test_malformed_kek_requests_name_the_field(request_: object, field: str) -> None:
    check = {
        admin_pb2.SetPartyKekRequest: validate.check_set_party_kek,
        admin_pb2.RewrapDataKeyRequest: validate.check_rewrap_data_key,
        admin_pb2.CheckKekRequest: validate.check_check_kek,
    }[type(request_)]
    with pytest.raises(InvalidRequestError) as e:
        check(request_)  # type: ignore[operator]
    assert e.value.field == field


def test_well_formed_kek_refs_pass() -> None:
    for ref in ("local", KV_REF, KV_REF + "/0123abcd"):
        validate.check_check_kek(admin_pb2.CheckKekRequest(kek_ref=ref))


def test_a_kek_the_operator_named_is_a_precondition_with_its_reason() -> None:
    e = KekError("key not found: https://v/keys/k (KeyNotFound)")
    for method in ("SetPartyKek", "RewrapDataKey", "CheckKek"):
        s = status_for(e, full_method=f"{ADMIN}/{method}")
        assert (s.code, s.message) == (grpc.StatusCode.FAILED_PRECONDITION, str(e))
    # A party registering a key learns that its KEK is unusable and who can check it, nothing
    # about the vault.
    s = status_for(e, full_method=f"{ADMIN}/RegisterDataKey")
    assert (s.code, s.message) == (grpc.StatusCode.FAILED_PRECONDITION, KEK_UNUSABLE_MESSAGE)
    assert "https://" not in s.message and not s.unexpected
    # A transient fault is UNAVAILABLE for everyone, the operator included: retry later. The
    # operator's own KEK calls also say why (the cause class); a party learns nothing more.
    transient = KekUnavailableError("throttled: Key Vault kept answering 429 to unwrap with k")
    for method in ("SetPartyKek", "RewrapDataKey", "CheckKek"):
        s = status_for(transient, full_method=f"{ADMIN}/{method}")
        assert (s.code, s.message) == (
            grpc.StatusCode.UNAVAILABLE,
            f"key custody is temporarily unavailable ({transient}); retry later",
        )
    s = status_for(transient, full_method=f"{ADMIN}/RegisterDataKey")
    assert (s.code, s.message) == (grpc.StatusCode.UNAVAILABLE, KEK_UNAVAILABLE_MESSAGE)
    s = status_for(
        UnknownPolicyObjectError("data key 'x' does not exist"),
        full_method=f"{ADMIN}/RewrapDataKey",
    )
    assert s.code == grpc.StatusCode.NOT_FOUND

"""Opening what a :class:`~broker.core.compose.Broker` needs, from its configuration.

:func:`open_broker` opens (and migrates) the database, the local KEK and the registration key
under the state directory, registers the Azure Key Vault KEK provider when given ``[keyvault]``
settings, and reads the trusted EK CA certificates. The broker it returns owns all of them:
close it (or use it as a context manager) to drop the keys, close the Key Vault clients and
credential, and close the database. The wiring itself is the composition root's
(:func:`broker.core.compose.build_broker`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from broker.config import BrokerConfig, read_config_file
from broker.core.compose import Broker, build_broker, build_kek_fingerprint_recorder
from broker.custody import (
    LOCAL_KEK_FILE,
    LOCAL_KEK_REF,
    REGISTRATION_KEY_FILE,
    KekRegistry,
    kek_fingerprint,
    load_or_create_registration_key,
)
from broker.errors import BrokerConfigError, KekError
from broker.storage import Store
from broker.storage.migrate import head_revision

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential

    from broker.kek_azure import KeyVaultConfig

log = logging.getLogger("cleanroom.broker")

#: An EK CA bundle is a few certificates; anything larger is the wrong file.
MAX_EK_CA_FILE_BYTES = 1 << 20


def load_trusted_ek_cas(files: tuple[str, ...]) -> list[bytes]:
    """Reads the PEM bundles of the CAs that sign EK certificates.

    Raises:
        BrokerConfigError: a file is missing, unreadable, too large or holds no PEM certificate.
    """
    bundles: list[bytes] = []
    for name in files:
        path = Path(name)
        data = read_config_file(path, max_bytes=MAX_EK_CA_FILE_BYTES, what="trusted EK CA file")
        if b"-----BEGIN CERTIFICATE-----" not in data:
            raise BrokerConfigError(f"trusted EK CA file {path} holds no PEM certificate")
        bundles.append(data)
    return bundles


@dataclass(frozen=True)
class BrokerState:
    """Where a broker's state is, as :func:`init_broker` made or found it."""

    database: str
    schema_revision: str
    state_dir: Path
    #: KEK ref -> its fingerprint (as the database records it).
    kek_fingerprints: Mapping[str, str]
    kek_file: Path
    registration_key_file: Path
    #: What this call created (paths and the database), empty when everything existed.
    created: tuple[str, ...]


#: The actor of the audit records that ``broker init`` writes.
INIT_ACTOR = "cleanroom broker init"


def _state_kek_refs(config: BrokerConfig, key_vault: KeyVaultConfig | None) -> list[str]:
    """The KEKs whose fingerprints the database records: the local KEK (every broker holds
    it, and it serves ``local`` refs) and the default KEK of new data keys (a Key Vault one
    when the ``[keyvault]`` settings are given: a library caller without them registers its
    providers after opening, so its KEKs cannot be resolved here)."""
    if key_vault is None:
        return [LOCAL_KEK_REF]
    return sorted({LOCAL_KEK_REF, config.default_kek})


def init_broker(
    config: BrokerConfig,
    *,
    key_vault: KeyVaultConfig | None = None,
    key_vault_credential: TokenCredential | None = None,
) -> BrokerState:
    """Creates what :func:`open_broker` (with ``create=False``, as ``broker serve`` runs it)
    needs and returns where it is: the database (migrated to head), the state directory
    (0700), the local KEK, the registration key and the KEKs' fingerprints in the database.
    What exists is kept (running it again changes nothing) and checked.

    A database that already records a local KEK refuses a new one: on a replica, copy the
    existing KEK file instead (a new KEK could not unwrap the keys the others wrapped).

    Raises:
        StorageError: the database cannot be created, opened or migrated.
        KekError: the KEK is unusable, or does not match the one the database records (the
            message says which and where).
        CustodyError, BrokerConfigError: the registration key or the state directory.
    """
    created: list[str] = []
    database_file = _sqlite_file(config.database_url)
    if database_file is not None and not database_file.exists():
        created.append(str(database_file))
    store = Store.open(config.database_url, migrate=True)
    try:
        recorded = store.kek_fingerprints()
        state = config.state_path
        kek_file = state / LOCAL_KEK_FILE
        if LOCAL_KEK_REF in recorded and not kek_file.exists():
            raise KekError(
                f"the database {store.display_url} records local KEK "
                f"{recorded[LOCAL_KEK_REF]} but {kek_file} does not exist: copy that KEK file "
                "there (a new KEK could not unwrap the data keys it wrapped)"
            )
        if not state.exists():
            created.append(str(state))
        try:
            state.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise BrokerConfigError(
                f"cannot create the state directory {state}: {e.strerror or e}"
            ) from e
        registration_file = state / REGISTRATION_KEY_FILE
        for path in (kek_file, registration_file):
            if not path.exists():
                created.append(str(path))
        load_or_create_registration_key(registration_file).close()
        with _registry(config, state, key_vault, key_vault_credential, create=True) as keks:
            fingerprints = {
                ref: kek_fingerprint(keks.get(ref)) for ref in _state_kek_refs(config, key_vault)
            }
            kept = build_kek_fingerprint_recorder(store).record(
                fingerprints, known=recorded, actor=INIT_ACTOR
            )
            _check_fingerprints(store.display_url, kept, fingerprints, state)
        return BrokerState(
            database=store.display_url,
            schema_revision=head_revision(),
            state_dir=state,
            kek_fingerprints=kept,
            kek_file=kek_file,
            registration_key_file=registration_file,
            created=tuple(created),
        )
    finally:
        store.close()


def _fingerprints(
    config: BrokerConfig, keks: KekRegistry, key_vault: KeyVaultConfig | None
) -> dict[str, str]:
    """Raises: KekError: a KEK cannot be resolved."""
    return {ref: kek_fingerprint(keks.get(ref)) for ref in _state_kek_refs(config, key_vault)}


def _sqlite_file(url: str) -> Path | None:
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if not parsed.drivername.startswith("sqlite") or not parsed.database:
        return None
    return Path(parsed.database)


def _check_fingerprints(
    database: str, recorded: Mapping[str, str], actual: Mapping[str, str], state: Path
) -> None:
    """Raises:
    KekError: a KEK's fingerprint is not recorded, or another one is.
    """
    for ref, fingerprint in sorted(actual.items()):
        expected = recorded.get(ref)
        if expected is None:
            raise KekError(
                f"the database {database} records no fingerprint for KEK {ref!r}: run "
                "`cleanroom broker init --config FILE` to record it"
            )
        if expected != fingerprint:
            where = f" ({state / LOCAL_KEK_FILE})" if ref == LOCAL_KEK_REF else ""
            raise KekError(
                f"KEK {ref!r}{where} has fingerprint {fingerprint}, but the database {database} "
                f"records {expected}: this is not the KEK that wrapped its data keys"
            )


@contextmanager
def _registry(
    config: BrokerConfig,
    state: Path,
    key_vault: KeyVaultConfig | None,
    key_vault_credential: TokenCredential | None,
    *,
    create: bool,
) -> Iterator[KekRegistry]:
    keks = KekRegistry.open_local(state, default_ref=config.default_kek, create=create)
    try:
        if key_vault is not None:
            from broker.kek_azure import register_key_vault_provider

            register_key_vault_provider(keks, config=key_vault, credential=key_vault_credential)
            # Every provider the broker knows is in place now, so a ref that does not resolve
            # is a mistake in the configuration. (Without [keyvault] settings the caller is a
            # library user who may still add providers of its own.)
            _resolve_configured_keks(config, keks)
        yield keks
    except BaseException:
        keks.close()
        raise


def open_broker(
    config: BrokerConfig,
    *,
    migrate: bool = True,
    create: bool = True,
    key_vault: KeyVaultConfig | None = None,
    key_vault_credential: TokenCredential | None = None,
) -> Broker:
    """Opens everything the broker needs and returns it; close it when done.

    With ``create`` (for library users and tests), creates the state directory (0700), the
    local KEK, the registration key and the database on first use, as :func:`init_broker`
    does. Without it (``broker serve``), nothing is created: a missing database, state
    directory, KEK or registration key stops the start with its path, and nothing is left
    behind. Either way a KEK whose fingerprint the database does not record as the broker's
    is refused.
    With ``key_vault`` (the ``[keyvault]`` settings), ``azurekv:`` KEK refs resolve to Azure
    Key Vault keys, authenticated with ``key_vault_credential`` or else the credential the
    settings name (made on first use); closing the broker closes that credential. With
    ``key_vault`` the KEK refs of the configuration (``default_kek``, ``party_keks``) are also
    resolved here, so a malformed or unserved ref stops the start; Key Vault itself is not
    contacted until a key is wrapped or unwrapped. Without it, providers the caller registers
    on ``broker.keks`` afterwards serve the refs.

    Raises:
        StorageError: the database cannot be opened or migrated (or, without ``create``, does
            not exist).
        KekError, CustodyError: the KEK or registration key file is unusable or (without
            ``create``) missing, the KEK is not the one the database records, or (with
            ``key_vault``) a configured KEK ref is malformed or has no provider.
        BrokerConfigError: a trusted EK CA file is unusable, or (without ``create``) the state
            directory does not exist.
    """
    trusted = load_trusted_ek_cas(config.trusted_ek_ca_files)
    state = config.state_path
    if create:
        init_broker(config, key_vault=key_vault, key_vault_credential=key_vault_credential)
    store = Store.open(config.database_url, migrate=migrate, require_existing=not create)
    keks: KekRegistry | None = None
    try:
        if not state.is_dir():
            raise BrokerConfigError(
                f"the state directory {state.absolute()} does not exist "
                "(create it with `cleanroom broker init --config FILE`)"
            )
        with _registry(config, state, key_vault, key_vault_credential, create=False) as keks:
            fingerprints = {
                ref: kek_fingerprint(keks.get(ref)) for ref in _state_kek_refs(config, key_vault)
            }
            _check_fingerprints(store.display_url, store.kek_fingerprints(), fingerprints, state)
            registration_key = load_or_create_registration_key(
                state / REGISTRATION_KEY_FILE, create=False
            )
    except BaseException:
        if keks is not None:
            keks.close()
        store.close()
        raise
    log.info(
        "broker state: database %s, KEK fingerprints %s",
        store.display_url,
        ", ".join(f"{ref} {fp}" for ref, fp in sorted(fingerprints.items())),
    )
    return build_broker(
        config,
        store=store,
        keks=keks,
        registration_key=registration_key,
        trusted_ek_cas=trusted,
    )


def _resolve_configured_keks(config: BrokerConfig, keks: KekRegistry) -> None:
    """Resolves every KEK ref the configuration names, so a typo fails at start, not at the
    first registration. Resolving a Key Vault ref parses it; it does not contact Key Vault.

    Raises:
        KekError: a ref is malformed or no KEK or provider serves it.
    """
    for ref in sorted({config.default_kek, *config.party_keks.values()}):
        try:
            keks.get(ref)
        except KekError as e:
            raise KekError(f"the configured KEK {ref!r} is unusable: {e}") from e


__all__ = ["BrokerState", "init_broker", "load_trusted_ek_cas", "open_broker"]

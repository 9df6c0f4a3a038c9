"""Assembling a :class:`~broker.service.Broker` from its configuration.

:func:`open_broker` opens (and migrates) the database, the local KEK and the registration key
under the state directory, registers the Azure Key Vault KEK provider when given ``[keyvault]``
settings, and reads the trusted EK CA certificates. The broker it returns owns all of them:
close it (or use it as a context manager) to drop the keys, close the Key Vault clients and
credential, and close the database.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from broker.config import BrokerConfig
from broker.custody import REGISTRATION_KEY_FILE, KekRegistry, load_or_create_registration_key
from broker.errors import BrokerConfigError, KekError
from broker.service import Broker
from broker.storage import Store

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential

    from broker.kek_azure import KeyVaultConfig

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
        try:
            if path.stat().st_size > MAX_EK_CA_FILE_BYTES:
                raise BrokerConfigError(f"trusted EK CA file {path} is too large")
            data = path.read_bytes()
        except OSError as e:
            raise BrokerConfigError(
                f"cannot read trusted EK CA file {path}: {e.strerror or e}"
            ) from e
        if b"-----BEGIN CERTIFICATE-----" not in data:
            raise BrokerConfigError(f"trusted EK CA file {path} holds no PEM certificate")
        bundles.append(data)
    return bundles


def open_broker(
    config: BrokerConfig,
    *,
    migrate: bool = True,
    key_vault: KeyVaultConfig | None = None,
    key_vault_credential: TokenCredential | None = None,
) -> Broker:
    """Opens everything the broker needs and returns it; close it when done.

    Creates the state directory (0700), the local KEK and the registration key on first use.
    With ``key_vault`` (the ``[keyvault]`` settings), ``azurekv:`` KEK refs resolve to Azure
    Key Vault keys, authenticated with ``key_vault_credential`` or else the credential the
    settings name (made on first use); closing the broker closes that credential. With
    ``key_vault`` the KEK refs of the configuration (``default_kek``, ``party_keks``) are also
    resolved here, so a malformed or unserved ref stops the start; Key Vault itself is not
    contacted until a key is wrapped or unwrapped. Without it, providers the caller registers
    on ``broker.keks`` afterwards serve the refs.

    Raises:
        StorageError: the database cannot be opened or migrated.
        KekError, CustodyError: the KEK or registration key file is unusable, or (with
            ``key_vault``) a configured KEK ref is malformed or has no provider.
        BrokerConfigError: a trusted EK CA file is unusable.
    """
    trusted = load_trusted_ek_cas(config.trusted_ek_ca_files)
    state = config.state_path
    try:
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise BrokerConfigError(
            f"cannot create the state directory {state}: {e.strerror or e}"
        ) from e
    store = Store.open(config.database_url, migrate=migrate)
    keks: KekRegistry | None = None
    try:
        keks = KekRegistry.open_local(state, default_ref=config.default_kek)
        if key_vault is not None:
            from broker.kek_azure import register_key_vault_provider

            register_key_vault_provider(keks, config=key_vault, credential=key_vault_credential)
            # Every provider the broker knows is in place now, so a ref that does not resolve
            # is a mistake in the configuration. (Without [keyvault] settings the caller is a
            # library user who may still add providers of its own.)
            _resolve_configured_keks(config, keks)
        registration_key = load_or_create_registration_key(state / REGISTRATION_KEY_FILE)
    except BaseException:
        if keks is not None:
            keks.close()
        store.close()
        raise
    return Broker(
        config=config,
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


__all__ = ["load_trusted_ek_cas", "open_broker"]

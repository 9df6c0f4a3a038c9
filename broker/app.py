"""Assembling a :class:`~broker.service.Broker` from its configuration.

:func:`open_broker` opens (and migrates) the database, the local KEK and the registration key
under the state directory, and reads the trusted EK CA certificates. The broker it returns owns
all of them: close it (or use it as a context manager) to drop the keys and close the database.
"""

from __future__ import annotations

from pathlib import Path

from broker.config import BrokerConfig
from broker.custody import REGISTRATION_KEY_FILE, KekRegistry, load_or_create_registration_key
from broker.errors import BrokerConfigError
from broker.service import Broker
from broker.storage import Store

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


def open_broker(config: BrokerConfig, *, migrate: bool = True) -> Broker:
    """Opens everything the broker needs and returns it; close it when done.

    Creates the state directory (0700), the local KEK and the registration key on first use.

    Raises:
        StorageError: the database cannot be opened or migrated.
        KekError, CustodyError: the KEK or registration key file is unusable.
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


__all__ = ["load_trusted_ek_cas", "open_broker"]

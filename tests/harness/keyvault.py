"""The local Key Vault double for tests: a re-export of :mod:`cleanroom.app.emulators.keyvault`.

The double lives in the product (the demo's ``--azure-emulators`` uses it too), so its code
exists once; see that module for what it implements. Real Key Vault is not reachable from the
tests.
"""

from __future__ import annotations

from cleanroom.app.emulators.keyvault import (
    ALGORITHM,
    TEST_TENANT,
    VAULT_RESOURCE,
    VAULT_SCOPE,
    FakeKeyVault,
    KeyVersion,
    RecordedRequest,
    StaticTokenCredential,
    TlsFiles,
    VaultKey,
    make_tls_files,
    running_vault,
    start_fake_key_vault,
)

__all__ = [
    "ALGORITHM",
    "TEST_TENANT",
    "VAULT_RESOURCE",
    "VAULT_SCOPE",
    "FakeKeyVault",
    "KeyVersion",
    "RecordedRequest",
    "StaticTokenCredential",
    "TlsFiles",
    "VaultKey",
    "make_tls_files",
    "running_vault",
    "start_fake_key_vault",
]

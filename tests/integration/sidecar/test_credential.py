"""Credential activation: the sidecar proves its AK lives in the TPM that owns the EK."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from tpm2_pytss import TPM2B_NAME, TPM2B_PUBLIC
from tpm2_pytss.utils import make_credential, tools_to_credential

from sidecar.config import TpmConfig
from sidecar.errors import CredentialActivationError
from sidecar.tpm import Tpm
from tests.harness.swtpm import Swtpm
from tests.support.sidecar import assert_nothing_loaded

pytestmark = [pytest.mark.swtpm]


@pytest.mark.parametrize("ek_algorithm", ["rsa", "ecc"])
def test_credential_made_in_software_for_the_ak_is_activated(
    swtpm: Swtpm, make_config: Callable[..., TpmConfig], ek_algorithm: str
) -> None:
    with Tpm(make_config(ek_algorithm=ek_algorithm)) as tpm:
        ek = tpm.create_ek()
        ak = tpm.create_or_load_ak()
        ek_public, _ = TPM2B_PUBLIC.unmarshal(ek.public)
        secret = os.urandom(32)
        blob, encrypted = make_credential(ek_public, secret, TPM2B_NAME(ak.name))
        assert tpm.activate_credential(blob.marshal(), encrypted.marshal()) == secret
    assert_nothing_loaded(swtpm)


def test_credential_for_another_name_fails_clearly(
    swtpm: Swtpm, make_config: Callable[..., TpmConfig]
) -> None:
    with Tpm(make_config()) as tpm:
        ek = tpm.create_ek()
        tpm.create_or_load_ak()
        ek_public, _ = TPM2B_PUBLIC.unmarshal(ek.public)
        other_name = bytes.fromhex("000b") + hashlib.sha256(b"another key").digest()
        blob, encrypted = make_credential(ek_public, b"s" * 32, TPM2B_NAME(other_name))
        with pytest.raises(CredentialActivationError, match="not made for this AK name"):
            tpm.activate_credential(blob.marshal(), encrypted.marshal())
        with pytest.raises(CredentialActivationError, match="not a marshalled"):
            tpm.activate_credential(b"\x00", encrypted.marshal())
        with pytest.raises(CredentialActivationError, match="trailing bytes"):
            tpm.activate_credential(blob.marshal() + b"\x00", encrypted.marshal())
    assert_nothing_loaded(swtpm)


def test_credential_for_another_ek_fails_clearly(
    swtpm: Swtpm, make_config: Callable[..., TpmConfig]
) -> None:
    # Made for the ECC EK of the same TPM while the sidecar activates with its RSA EK.
    with Tpm(make_config(ek_algorithm="ecc")) as tpm:
        ecc_ek, _ = TPM2B_PUBLIC.unmarshal(tpm.create_ek().public)
    with Tpm(make_config(ek_algorithm="rsa")) as tpm:
        ak = tpm.create_or_load_ak()
        blob, encrypted = make_credential(ecc_ek, b"s" * 32, TPM2B_NAME(ak.name))
        with pytest.raises(CredentialActivationError, match="credential activation failed"):
            tpm.activate_credential(blob.marshal(), encrypted.marshal())
    assert_nothing_loaded(swtpm)


@pytest.mark.tpm2tools
def test_credential_made_by_tpm2_makecredential_is_activated(
    swtpm: Swtpm, make_config: Callable[..., TpmConfig], tmp_path: Path
) -> None:
    with Tpm(make_config()) as tpm:
        ek = tpm.create_ek()
        ak = tpm.create_or_load_ak()
        (tmp_path / "ek.pub").write_bytes(ek.public)
        secret = os.urandom(24)
        (tmp_path / "secret").write_bytes(secret)
        swtpm.tools(
            "tpm2_makecredential",
            "--tcti",
            "none",
            "--encryption-key",
            str(tmp_path / "ek.pub"),
            "--secret",
            str(tmp_path / "secret"),
            "--name",
            ak.name_hex,
            "--credential-blob",
            str(tmp_path / "cred"),
        )
        blob, encrypted = tools_to_credential((tmp_path / "cred").read_bytes())
        assert tpm.activate_credential(blob.marshal(), encrypted.marshal()) == secret
    assert_nothing_loaded(swtpm)

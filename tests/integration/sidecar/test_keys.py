"""EK and AK: the same keys and files as tpm2_createek/tpm2_createak, kept across restarts."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tpm2_pytss import TPM2B_PUBLIC

from sidecar.config import TpmConfig
from sidecar.errors import AkMismatchError
from sidecar.tpm import Tpm, write_tools_quote_files
from tests.harness.swtpm import Swtpm
from tests.support.sidecar import (
    OTHER_AK_HANDLE,
    assert_nothing_loaded,
    checkquote,
)

pytestmark = [pytest.mark.swtpm]

#: Where swtpm_setup persists the RSA EK it certifies (found on the test TPM).
SWTPM_PERSISTENT_EK = 0x81010001


def _spki(pem_or_public: bytes) -> bytes:
    key = serialization.load_pem_public_key(pem_or_public)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.tpm2tools
@pytest.mark.parametrize("algorithm", ["rsa", "ecc"])
def test_ek_is_the_one_tpm2_createek_makes(
    swtpm: Swtpm, make_config: Callable[..., TpmConfig], tmp_path: Path, algorithm: str
) -> None:
    with Tpm(make_config(ek_algorithm=algorithm)) as tpm:
        ek = tpm.create_ek()
    assert_nothing_loaded(swtpm)
    swtpm.tools(
        "tpm2_createek",
        "--ek-context",
        str(tmp_path / "ek.ctx"),
        "--key-algorithm",
        algorithm,
        "--public",
        str(tmp_path / "ek.pub"),
    )
    swtpm.tools("tpm2_flushcontext", "--transient-object")
    assert ek.public == (tmp_path / "ek.pub").read_bytes()
    public, _ = TPM2B_PUBLIC.unmarshal(ek.public)
    assert ek.name == bytes(public.get_name())
    if algorithm == "rsa":
        # swtpm_setup --create-ek-cert writes the RSA EK certificate at 0x01C00002; it must
        # certify exactly this EK.
        assert ek.certificate_index == 0x01C00002
        assert ek.certificate is not None
        cert = x509.load_der_x509_certificate(ek.certificate)
        assert _spki(public.to_pem()) == cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        # swtpm certifies an ECC P-384 EK at the high-range index 0x01C00016, not a P-256 EK
        # at 0x01C0000A, so the TCG P-256 EK has no certificate here.
        assert ek.certificate_index == 0x01C0000A
        assert ek.certificate is None


@pytest.mark.tpm2tools
def test_ak_export_matches_tpm2_readpublic(
    swtpm: Swtpm, make_config: Callable[..., TpmConfig], tmp_path: Path
) -> None:
    config = make_config()
    with Tpm(config) as tpm:
        ak = tpm.create_or_load_ak()
    assert ak.created and ak.handle == config.ak_handle
    swtpm.tools(
        "tpm2_readpublic",
        "--object-context",
        f"0x{config.ak_handle:08x}",
        "--output",
        str(tmp_path / "ak.pub"),
        "--name",
        str(tmp_path / "ak.name"),
    )
    assert ak.public == (tmp_path / "ak.pub").read_bytes()
    assert ak.name == (tmp_path / "ak.name").read_bytes()
    assert ak.name_hex == ak.name.hex() and ak.name[:2] == b"\x00\x0b"
    public, _ = TPM2B_PUBLIC.unmarshal(ak.public)
    assert _spki(ak.pem) == _spki(public.to_pem())
    assert_nothing_loaded(swtpm)


@pytest.mark.tpm2tools
@pytest.mark.parametrize("algorithm", ["rsa", "ecc"])
def test_ak_made_by_tpm2_createak_is_loaded_and_quotes(
    swtpm: Swtpm, make_config: Callable[..., TpmConfig], tmp_path: Path, algorithm: str
) -> None:
    # The manual recipe's steps, then tpm2_evictcontrol to the sidecar's handle.
    signing = "rsassa" if algorithm == "rsa" else "ecdsa"
    t = str(tmp_path)
    swtpm.tools("tpm2_createek", "-c", f"{t}/ek.ctx", "-G", "rsa", "-u", f"{t}/ek.pub")
    swtpm.tools(
        "tpm2_createak",
        *("--ek-context", f"{t}/ek.ctx", "--ak-context", f"{t}/ak.ctx"),
        *("--key-algorithm", algorithm, "--hash-algorithm", "sha256"),
        *("--signing-algorithm", signing, "--public", f"{t}/ak.pub"),
        *("--private", f"{t}/ak.priv", "--ak-name", f"{t}/ak.name"),
    )
    swtpm.tools("tpm2_flushcontext", "--transient-object")
    swtpm.tools("tpm2_flushcontext", "--loaded-session")
    config = make_config(ak_algorithm=algorithm)
    swtpm.tools("tpm2_evictcontrol", "-C", "o", "-c", f"{t}/ak.ctx", f"0x{config.ak_handle:08x}")
    swtpm.tools("tpm2_flushcontext", "--transient-object")
    with Tpm(config) as tpm:
        ak = tpm.create_or_load_ak()
        result = tpm.quote(b"\xab" * 32)
    assert not ak.created
    assert ak.name == (tmp_path / "ak.name").read_bytes()
    assert ak.public == (tmp_path / "ak.pub").read_bytes()
    write_tools_quote_files(result, tmp_path / "q")
    proc = checkquote(swtpm, tmp_path / "ak.pub", tmp_path / "q", "ab" * 32)
    assert proc.returncode == 0, proc.stderr
    assert_nothing_loaded(swtpm)


@pytest.mark.parametrize("algorithm", ["rsa", "ecc"])
def test_persistent_ak_survives_a_restart(
    swtpm: Swtpm, make_config: Callable[..., TpmConfig], algorithm: str
) -> None:
    with Tpm(make_config(ak_algorithm=algorithm)) as tpm:
        first = tpm.create_or_load_ak()
        assert tpm.create_or_load_ak() == first  # cached for the connection
    swtpm.restart()
    with Tpm(make_config(ak_algorithm=algorithm)) as tpm:
        again = tpm.create_or_load_ak()
    assert first.created and not again.created
    assert again.name == first.name and again.public == first.public
    assert_nothing_loaded(swtpm)


def test_ak_blob_survives_a_restart(
    swtpm: Swtpm, make_config: Callable[..., TpmConfig], tmp_path: Path
) -> None:
    blob = tmp_path / "state" / "ak.blob"
    config = make_config(ak_handle=0, ak_context_file=str(blob))
    with Tpm(config) as tpm:
        first = tpm.create_or_load_ak()
        tpm.quote(b"n")
    assert first.created and first.handle is None
    assert stat.S_IMODE(os.stat(blob).st_mode) == 0o600
    assert_nothing_loaded(swtpm)
    swtpm.restart()
    with Tpm(make_config(ak_handle=0, ak_context_file=str(blob))) as tpm:
        again = tpm.create_or_load_ak()
        tpm.quote(b"n")
    assert not again.created and again.name == first.name
    # The blob mode never made anything persistent at the default handle.
    assert "0x81010002" not in swtpm.tools("tpm2_getcap", "handles-persistent").stdout
    assert_nothing_loaded(swtpm)


def test_a_foreign_key_at_the_ak_handle_or_file_is_refused(
    swtpm: Swtpm, make_config: Callable[..., TpmConfig], tmp_path: Path
) -> None:
    # swtpm_setup's persistent EK is a decryption key, not an AK.
    with Tpm(make_config(ak_handle=SWTPM_PERSISTENT_EK)) as tpm:
        with pytest.raises(AkMismatchError, match="0x81010001 holds a key that is not"):
            tpm.create_or_load_ak()
    with Tpm(make_config(ak_algorithm="ecc", ak_handle=OTHER_AK_HANDLE)) as tpm:
        tpm.create_or_load_ak()
    with Tpm(make_config(ak_algorithm="rsa", ak_handle=OTHER_AK_HANDLE)) as tpm:
        with pytest.raises(AkMismatchError, match="not the sidecar's RSA AK"):
            tpm.quote(b"n")
    garbage = tmp_path / "ak.blob"
    garbage.write_bytes(b"\x00\x04abcd")
    with Tpm(make_config(ak_handle=0, ak_context_file=str(garbage))) as tpm:
        with pytest.raises(AkMismatchError, match="is not an AK key blob"):
            tpm.create_or_load_ak()
    assert_nothing_loaded(swtpm)

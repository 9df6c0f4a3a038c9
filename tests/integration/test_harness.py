"""The harness's own services are real: swtpm answers tpm2-tools, PostgreSQL answers SQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.harness.swtpm import Swtpm


@pytest.mark.swtpm
@pytest.mark.tpm2tools
def test_swtpm_has_both_banks_and_an_ek_certificate(swtpm: Swtpm) -> None:
    pcrs = swtpm.tools("tpm2_pcrread", "sha1:23+sha256:23").stdout
    assert "sha1" in pcrs and "sha256" in pcrs
    assert "0x" + "00" * 20 in pcrs.replace("0000000000000000000000000000000000000000", "00" * 20)
    nv = swtpm.tools("tpm2_nvreadpublic").stdout
    assert "0x1c00002" in nv  # RSA EK certificate index


@pytest.mark.swtpm
@pytest.mark.tpm2tools
def test_each_swtpm_is_fresh(swtpm: Swtpm) -> None:
    swtpm.tools("tpm2_pcrextend", "23:sha256=" + "11" * 32)
    after = swtpm.tools("tpm2_pcrread", "sha256:23").stdout
    assert "0x" + "00" * 32 not in after.upper().replace("0X", "0x")


@pytest.mark.postgres
def test_postgres_answers(postgres_url: str) -> None:
    engine = sa.create_engine(postgres_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("select 1 + 1")).scalar_one() == 2
    engine.dispose()

"""Fixtures for the sidecar's TPM tests: configs pointing at the test's own swtpm."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from sidecar.config import TpmConfig
from tests.harness.swtpm import Swtpm


@pytest.fixture
def make_config(swtpm: Swtpm) -> Callable[..., TpmConfig]:
    """Builds a TpmConfig for the test's swtpm (its TCTI read at call time: restart changes it)."""

    def make(**fields: Any) -> TpmConfig:
        return TpmConfig(tcti=swtpm.tcti, **fields)

    return make

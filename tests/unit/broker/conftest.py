"""Fixtures of the broker's unit tests that talk to the scripted fake broker over mTLS."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pki.ca import PkiLayout
from tests.support.fake_broker import RunningFake, running_fake
from tests.support.pki import make_pki


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    """The usual identities (see :func:`tests.support.pki.make_pki`), made once per module."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def module_fake(layout: PkiLayout) -> Iterator[RunningFake]:
    """The fake broker, serving for the whole module (tests reset it before use)."""
    with running_fake(layout) as running:
        yield running

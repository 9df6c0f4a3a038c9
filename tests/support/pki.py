"""The one PKI builder of the tests: a CA and the clean room's usual certificates."""

from __future__ import annotations

from pathlib import Path

from pki.ca import (
    PkiLayout,
    init_pki,
)


def make_pki(directory: Path) -> PkiLayout:
    """CA, broker, operator, parties advertiser and publisher, sidecar-1."""
    return init_pki(directory, parties=("advertiser", "publisher"), sidecars=("sidecar-1",))

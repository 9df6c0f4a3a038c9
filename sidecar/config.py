"""Configuration of the sidecar's TPM use, loaded from TOML (``[tpm]``) and the environment.

``load_tpm_config(path)`` reads the ``[tpm]`` table of a sidecar configuration file and then
``CLEANROOM_SIDECAR_TPM_<FIELD>`` variables (``CLEANROOM_SIDECAR_TPM_TCTI=swtpm:port=2321``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from evidence.pcr import BANK_SIZES, DEFAULT_BANKS, WORKLOAD_PCR

#: Prefix of the environment variables that override :class:`TpmConfig` fields.
TPM_ENV_PREFIX = "CLEANROOM_SIDECAR_TPM"

#: The TCTI used when neither the configuration nor the environment names one: the kernel's
#: resource manager, which also flushes whatever a crashed process left loaded.
DEFAULT_TCTI = "device:/dev/tpmrm0"

#: Where the sidecar persists its AK by default (the owner hierarchy's persistent range; the
#: TCG registry puts EKs at 0x81010001 and 0x81010016, so the next index is a natural home).
DEFAULT_AK_HANDLE = 0x81010002

_PERSISTENT_FIRST = 0x81000000
_PERSISTENT_LAST = 0x81FFFFFF


@dataclass(frozen=True)
class TpmConfig:
    """How the sidecar reaches the TPM and which keys and PCR banks it uses.

    ``ak_handle`` is the persistent handle of the AK; ``0`` keeps the AK instead as a key blob
    in ``ak_context_file`` (see ``docs/sidecar-tpm.md``). ``banks`` are the PCR banks measured
    and quoted; ``extra_pcrs`` are PCRs quoted besides PCR 23 (boot PCRs that policy names).

    Raises:
        ValueError: a field is out of range (unknown algorithm or bank, handle outside the
            persistent range, ``ak_handle`` 0 without ``ak_context_file``, a PCR outside 0..23).
    """

    tcti: str = DEFAULT_TCTI
    ek_algorithm: Literal["rsa", "ecc"] = "rsa"
    ak_algorithm: Literal["rsa", "ecc"] = "rsa"
    ak_handle: int = DEFAULT_AK_HANDLE
    ak_context_file: str | None = None
    banks: tuple[str, ...] = DEFAULT_BANKS
    extra_pcrs: tuple[int, ...] = ()
    #: On an Azure SEV-SNP confidential VM: send the vTPM's HCL report, bound to each quote's
    #: qualifying data, and the chip's VCEK with every quote (docs/azure.md).
    azure_snp: bool = False
    #: The VCEK from this file (DER, PEM or the metadata service's JSON) instead of ``vcek_url``.
    vcek_file: str | None = None
    #: Where the VCEK is fetched from (Azure's instance metadata service).
    vcek_url: str = "http://169.254.169.254/metadata/THIM/amd/certification"
    #: How long fetching the VCEK may take.
    vcek_timeout_seconds: float = 5.0

    def __post_init__(self) -> None:
        # The config loader passes strings through for Literal fields, so check them here.
        for field_name in ("ek_algorithm", "ak_algorithm"):
            value = getattr(self, field_name)
            if value not in ("rsa", "ecc"):
                raise ValueError(f"{field_name} must be 'rsa' or 'ecc', got {value!r}")
        if not self.tcti:
            raise ValueError("tcti must not be empty")
        if self.ak_handle == 0:
            if not self.ak_context_file:
                raise ValueError("ak_handle 0 needs ak_context_file (where the AK blob is kept)")
        elif not _PERSISTENT_FIRST <= self.ak_handle <= _PERSISTENT_LAST:
            raise ValueError(
                f"ak_handle 0x{self.ak_handle:08x} is not a persistent handle "
                f"(0x{_PERSISTENT_FIRST:08x}..0x{_PERSISTENT_LAST:08x}) or 0"
            )
        if not self.banks:
            raise ValueError("banks must name at least one PCR bank")
        for bank in self.banks:
            if bank not in BANK_SIZES:
                raise ValueError(
                    f"unsupported PCR bank {bank!r} (supported: {', '.join(BANK_SIZES)})"
                )
        if len(set(self.banks)) != len(self.banks):
            raise ValueError("banks must not repeat a bank")
        for pcr in self.extra_pcrs:
            if not 0 <= pcr <= WORKLOAD_PCR:
                raise ValueError(f"extra_pcrs: PCR {pcr} is outside 0..{WORKLOAD_PCR}")
        if not self.vcek_url.startswith(("http://", "https://")):
            raise ValueError(f"vcek_url must be http:// or https://, got {self.vcek_url!r}")
        if self.vcek_timeout_seconds <= 0:
            raise ValueError("vcek_timeout_seconds must be positive")

    @property
    def quoted_pcrs(self) -> tuple[int, ...]:
        """PCR 23 and the extra PCRs, sorted, without repeats."""
        return tuple(sorted({WORKLOAD_PCR, *self.extra_pcrs}))


def load_tpm_config(
    path: str | os.PathLike[str] | None = None,
    *,
    tcti: str | None = None,
    env: Mapping[str, str] | None = None,
) -> TpmConfig:
    """Loads :class:`TpmConfig` from the ``[tpm]`` table of ``path`` and the environment.

    The TCTI is chosen in this order: the ``tcti`` argument (the CLI's ``--tcti``), the
    ``CLEANROOM_SIDECAR_TPM_TCTI`` variable, the file's ``tcti``, ``TPM2TOOLS_TCTI`` (so a shell
    set up for tpm2-tools works unchanged), then :data:`DEFAULT_TCTI`.

    Raises:
        cleanroom.config.ConfigError: the file cannot be read or a setting is malformed or out
            of range.
    """
    from cleanroom.config import ConfigError, load_config

    environ = os.environ if env is None else env
    try:
        config = load_config(
            TpmConfig,
            Path(path) if path is not None else None,
            env_prefix=TPM_ENV_PREFIX,
            section="tpm",
            env=environ,
        )
    except ValueError as e:
        raise ConfigError(f"[tpm] {e}") from e
    if tcti:
        return replace(config, tcti=tcti)
    # The loader does not say where a value came from; a TCTI still equal to the default was
    # not set by the file or CLEANROOM_SIDECAR_TPM_TCTI, so TPM2TOOLS_TCTI may fill it.
    tools_tcti = environ.get("TPM2TOOLS_TCTI")
    if config.tcti == DEFAULT_TCTI and tools_tcti:
        return replace(config, tcti=tools_tcti)
    return config

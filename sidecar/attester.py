"""The sidecar's attester: enrollment material, workload measurement and quotes, from a config.

These are thin functions over :class:`sidecar.tpm.interface.TpmDevice`. Each takes an open TPM
(``tpm=``) so that a long-running sidecar keeps one connection, or opens and closes one from the
config when none is given. They import tpm2-pytss only when they have to open the TPM.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from evidence.binding import NONCE_SIZE
from evidence.binding import qualifying_data as bound_qualifying_data
from evidence.errors import BindingError
from evidence.launch import Launch
from evidence.pcr import Measurement
from sidecar.config import TpmConfig
from sidecar.errors import InvalidNonceError
from sidecar.tpm.interface import AkInfo, EkInfo, QuoteResult, TpmDevice


@dataclass(frozen=True)
class EnrollmentMaterial:
    """What the broker needs to enroll this sidecar: the EK (public, certificate) and the AK."""

    ek: EkInfo
    ak: AkInfo


@dataclass(frozen=True)
class QuoteBinding:
    """What a quote's qualifying data binds besides the broker's nonce (see evidence.binding)."""

    kem: int
    ephemeral_public_key: bytes
    tls_certificate_der: bytes


@contextmanager
def _device(config: TpmConfig, tpm: TpmDevice | None) -> Iterator[TpmDevice]:
    if tpm is not None:
        yield tpm
        return
    from sidecar.tpm.device import Tpm

    with Tpm(config) as opened:
        yield opened


def enroll_material(config: TpmConfig, *, tpm: TpmDevice | None = None) -> EnrollmentMaterial:
    """Creates the EK and creates or loads the AK; returns their public material.

    Raises:
        TpmUnavailableError: the TPM cannot be reached.
        AkMismatchError: the configured AK handle or blob holds another kind of key.
        TpmCommandError: the TPM refuses a command.
    """
    with _device(config, tpm) as device:
        ek = device.create_ek()
        ak = device.create_or_load_ak()
    return EnrollmentMaterial(ek=ek, ak=ak)


def measure_manifest(
    config: TpmConfig,
    files: Sequence[str | os.PathLike[str]],
    *,
    names: Sequence[str] | None = None,
    tpm: TpmDevice | None = None,
    launch: Launch | None = None,
) -> Measurement:
    """Resets PCR 23 and measures ``files`` into it, in order, then ``launch`` when given;
    returns the event log and values.

    Raises:
        WorkloadMeasurementError: a file cannot be measured (the message names it).
        PcrMismatchError: PCR 23 does not equal the event log's replay afterwards.
        TpmUnavailableError: the TPM cannot be reached.
        TpmCommandError: the TPM refuses a command.
    """
    with _device(config, tpm) as device:
        return device.measure(files, names, launch=launch)


def make_quote(
    config: TpmConfig,
    *,
    nonce: bytes,
    binding: QuoteBinding | None = None,
    tpm: TpmDevice | None = None,
) -> QuoteResult:
    """Quotes PCR 23 and ``config.extra_pcrs`` in every configured bank.

    Without ``binding`` the nonce is the qualifying data itself, as in the manual recipe
    (``tpm2_quote --qualification``), so ``tpm2_checkquote --qualification`` verifies it. With
    ``binding`` the nonce must be the broker's 32-byte nonce and the qualifying data is
    :func:`evidence.binding.qualifying_data` over it, the ephemeral key and the TLS certificate.

    Raises:
        InvalidNonceError: the nonce has a length the quote does not accept (1 to 64 bytes
            without binding, exactly 32 with it), or the binding inputs are malformed.
        QuoteError: the quoted PCRs kept changing.
        TpmUnavailableError: the TPM cannot be reached.
        PcrNotAvailableError: the TPM left a requested bank or PCR out of the quote (the bank
            is not allocated); the message names it.
        TpmCommandError: the TPM refuses a command.
    """
    if binding is None:
        qualifying = nonce
    else:
        if len(nonce) != NONCE_SIZE:
            raise InvalidNonceError(
                f"the broker's nonce must be {NONCE_SIZE} bytes, got {len(nonce)}"
            )
        try:
            qualifying = bound_qualifying_data(
                nonce=nonce,
                kem=binding.kem,
                ephemeral_public_key=binding.ephemeral_public_key,
                tls_certificate_der=binding.tls_certificate_der,
            )
        except BindingError as e:
            raise InvalidNonceError(f"cannot bind the quote: {e}") from e
    with _device(config, tpm) as device:
        return device.quote(qualifying, config.quoted_pcrs)

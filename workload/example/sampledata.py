"""Deterministic synthetic input data for the two-party clean-room demo.

Two parties hold data about partly the same people, keyed by a hashed identifier:

- the **advertiser** (``advertiser.csv``): ``user_id, impressions, clicks, conversions``;
- the **publisher** (``publisher.csv``): ``user_id, page_views, segment, age_band, device``.

Every person is drawn from one population model, so the advertiser's conversions depend on the
publisher's audience features through a known logistic model (:data:`PLANTED_MODEL`) plus
noise. Neither party alone can learn that relation: the advertiser lacks the features, the
publisher lacks the outcomes. That is the signal the example workload finds inside the clean
room.

Relations that always hold in a row:

- ``impressions >= 1`` and ``clicks <= impressions``;
- ``conversions <= clicks``: a person converts only after a click, so a person the model
  makes convert gets at least one click, and every further conversion needs a further click;
- ``page_views >= 1``.

Identifiers are hex SHA-256 digests of a salt and a made-up e-mail address
(``user<n>@example.invalid``), the way two parties that agreed on a salt would hash their
customers' e-mail addresses; no real identifier is involved. The salt comes from the seed, so
the same seed gives the same bytes.

Rows are generated and written in fixed-size chunks, so memory does not grow with ``rows``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "ADVERTISER_COLUMNS",
    "ADVERTISER_FILE",
    "AGE_BANDS",
    "DEFAULT_OVERLAP",
    "DEVICES",
    "PLANTED_MODEL",
    "PUBLISHER_COLUMNS",
    "PUBLISHER_FILE",
    "SEGMENTS",
    "PlantedModel",
    "SampleCounts",
    "SampleData",
    "SampleFiles",
    "generate",
    "main",
    "write_sample_data",
    "write_sample_streams",
]

ADVERTISER_COLUMNS: Final = ("user_id", "impressions", "clicks", "conversions")
PUBLISHER_COLUMNS: Final = ("user_id", "page_views", "segment", "age_band", "device")
ADVERTISER_FILE: Final = "advertiser.csv"
PUBLISHER_FILE: Final = "publisher.csv"

#: Share of each party's rows whose person the other party also has.
DEFAULT_OVERLAP: Final = 0.7

SEGMENTS: Final = ("sports", "news", "tech", "lifestyle", "finance")
AGE_BANDS: Final = ("18-24", "25-34", "35-44", "45-54", "55+")
DEVICES: Final = ("mobile", "desktop", "tablet")

_SEGMENT_P: Final = (0.22, 0.28, 0.18, 0.20, 0.12)
_AGE_P: Final = (0.15, 0.27, 0.24, 0.19, 0.15)
_DEVICE_P: Final = (0.58, 0.32, 0.10)
# log(page_views) ~ Normal(mu[segment], _LOG_PV_SIGMA): news and tech readers browse more, which
# gives the data a segment-to-page-views correlation for the synthetic data to preserve.
_LOG_PV_MU: Final = (2.3, 2.9, 2.7, 2.2, 2.5)
_LOG_PV_SIGMA: Final = 0.8
# Click-through rate per impression, by device.
_CTR: Final = (0.05, 0.08, 0.06)
# Each conversion after the first needs another click, taken with this probability.
_REPEAT_CONVERSION_P: Final = 0.2
# Standard deviation of the Gaussian noise added to the logit: the outcome is not a pure
# function of the features.
_LOGIT_NOISE: Final = 0.5

# Rows generated per step; part of the output's definition (changing it changes the bytes).
_CHUNK: Final = 8192
_SALT_BYTES: Final = 16


@dataclass(frozen=True)
class PlantedModel:
    """The logistic model behind the sample data's conversions.

    ``P(converted) = sigmoid(intercept + segment[s] + age_band[a] + device[d]
    + log_page_views * (log1p(page_views) - log_page_views_center) / log_page_views_scale
    + noise)``, with ``noise ~ Normal(0, logit_noise)``. The first level of each category has
    coefficient 0 (the reference).
    """

    intercept: float
    segment: dict[str, float]
    age_band: dict[str, float]
    device: dict[str, float]
    log_page_views: float
    log_page_views_center: float
    log_page_views_scale: float
    logit_noise: float


PLANTED_MODEL: Final = PlantedModel(
    intercept=-2.1,
    segment={"sports": 0.0, "news": -0.6, "tech": 0.9, "lifestyle": 0.3, "finance": 1.2},
    age_band={"18-24": 0.0, "25-34": 0.5, "35-44": 0.8, "45-54": 0.6, "55+": 0.1},
    device={"mobile": 0.0, "desktop": 0.5, "tablet": -0.4},
    log_page_views=0.8,
    log_page_views_center=2.6,
    log_page_views_scale=0.85,
    logit_noise=_LOGIT_NOISE,
)


@dataclass(frozen=True)
class SampleCounts:
    """How many rows each file got and how many people both have."""

    advertiser_rows: int
    publisher_rows: int
    overlap: int


@dataclass(frozen=True)
class SampleData:
    """Both parties' CSV files, in memory."""

    advertiser: bytes
    publisher: bytes
    counts: SampleCounts


@dataclass(frozen=True)
class SampleFiles:
    """Where :func:`write_sample_data` wrote the two files."""

    advertiser: Path
    publisher: Path
    counts: SampleCounts


def _check_args(rows: int, overlap: float) -> int:
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError("rows must be a positive integer")
    if not 0.0 <= overlap <= 1.0 or math.isnan(overlap):
        raise ValueError("overlap must be between 0 and 1")
    return round(rows * overlap)


def _ids(salt: bytes, start: int, count: int) -> list[str]:
    return [
        hashlib.sha256(salt + f"user{n}@example.invalid".encode()).hexdigest()
        for n in range(start, start + count)
    ]


def _conversion_logit(
    rng: np.random.Generator,
    segment: npt.NDArray[np.intp],
    age: npt.NDArray[np.intp],
    device: npt.NDArray[np.intp],
    page_views: npt.NDArray[np.int64],
) -> npt.NDArray[np.float64]:
    m = PLANTED_MODEL
    seg_coef = np.array([m.segment[s] for s in SEGMENTS])
    age_coef = np.array([m.age_band[a] for a in AGE_BANDS])
    dev_coef = np.array([m.device[d] for d in DEVICES])
    z_pv = (np.log1p(page_views) - m.log_page_views_center) / m.log_page_views_scale
    logit: npt.NDArray[np.float64] = (
        m.intercept
        + seg_coef[segment]
        + age_coef[age]
        + dev_coef[device]
        + m.log_page_views * z_pv
        + rng.normal(0.0, m.logit_noise, size=segment.shape[0])
    )
    return logit


def write_sample_streams(
    advertiser_out: IO[str],
    publisher_out: IO[str],
    *,
    rows: int,
    seed: int,
    overlap: float = DEFAULT_OVERLAP,
) -> SampleCounts:
    """Writes both parties' CSV files to text streams (open them with ``newline=""``).

    Each file gets ``rows`` rows; ``round(rows * overlap)`` people appear in both. The same
    arguments always produce the same text.

    Raises:
        ValueError: ``rows`` is not positive or ``overlap`` is outside [0, 1].
        OSError: a stream cannot be written.
    """
    shared = _check_args(rows, overlap)
    rng = np.random.default_rng(seed)
    salt = rng.bytes(_SALT_BYTES)
    # Membership of each person, in population order: 0 both parties, 1 advertiser only,
    # 2 publisher only. Drawing each chunk's counts from a multivariate hypergeometric keeps
    # the totals exact while interleaving the three kinds at random.
    remaining = np.array([shared, rows - shared, rows - shared], dtype=np.int64)
    total = int(remaining.sum())
    adv_writer = csv.writer(advertiser_out, lineterminator="\n")
    pub_writer = csv.writer(publisher_out, lineterminator="\n")
    adv_writer.writerow(ADVERTISER_COLUMNS)
    pub_writer.writerow(PUBLISHER_COLUMNS)
    seg_names = np.array(SEGMENTS)
    age_names = np.array(AGE_BANDS)
    dev_names = np.array(DEVICES)
    start = 0
    while start < total:
        n = min(_CHUNK, total - start)
        take = rng.multivariate_hypergeometric(remaining, n)
        remaining -= take
        kind = rng.permutation(np.repeat(np.arange(3), take))
        segment = rng.choice(len(SEGMENTS), size=n, p=_SEGMENT_P)
        age = rng.choice(len(AGE_BANDS), size=n, p=_AGE_P)
        device = rng.choice(len(DEVICES), size=n, p=_DEVICE_P)
        log_pv = rng.normal(np.array(_LOG_PV_MU)[segment], _LOG_PV_SIGMA)
        page_views = np.maximum(1, np.floor(np.exp(log_pv))).astype(np.int64)
        # More browsing, more ad impressions.
        impressions = 1 + rng.poisson(0.6 * page_views**0.8)
        clicks = rng.binomial(impressions, np.array(_CTR)[device])
        logit = _conversion_logit(rng, segment, age, device, page_views)
        converted = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
        clicks = np.where(converted, np.maximum(clicks, 1), clicks)
        extra = rng.binomial(np.maximum(clicks - 1, 0), _REPEAT_CONVERSION_P)
        conversions = np.where(converted, 1 + extra, 0)
        ids = _ids(salt, start, n)
        in_adv = kind != 2
        in_pub = kind != 1
        adv_writer.writerows(
            zip(
                (ids[i] for i in np.flatnonzero(in_adv)),
                impressions[in_adv].tolist(),
                clicks[in_adv].tolist(),
                conversions[in_adv].tolist(),
                strict=True,
            )
        )
        pub_writer.writerows(
            zip(
                (ids[i] for i in np.flatnonzero(in_pub)),
                page_views[in_pub].tolist(),
                seg_names[segment[in_pub]].tolist(),
                age_names[age[in_pub]].tolist(),
                dev_names[device[in_pub]].tolist(),
                strict=True,
            )
        )
        start += n
    return SampleCounts(advertiser_rows=rows, publisher_rows=rows, overlap=shared)


def generate(rows: int, seed: int, *, overlap: float = DEFAULT_OVERLAP) -> SampleData:
    """Both parties' CSV files as bytes (UTF-8); for sizes that fit in memory.

    Raises:
        ValueError: ``rows`` is not positive or ``overlap`` is outside [0, 1].
    """
    adv = io.StringIO(newline="")
    pub = io.StringIO(newline="")
    counts = write_sample_streams(adv, pub, rows=rows, seed=seed, overlap=overlap)
    return SampleData(
        advertiser=adv.getvalue().encode(), publisher=pub.getvalue().encode(), counts=counts
    )


def write_sample_data(
    out_dir: str | Path, *, rows: int, seed: int, overlap: float = DEFAULT_OVERLAP
) -> SampleFiles:
    """Writes ``advertiser.csv`` and ``publisher.csv`` into ``out_dir`` (created if missing).

    Raises:
        ValueError: ``rows`` is not positive or ``overlap`` is outside [0, 1].
        OSError: the directory or the files cannot be written.
    """
    _check_args(rows, overlap)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adv_path = out / ADVERTISER_FILE
    pub_path = out / PUBLISHER_FILE
    with (
        adv_path.open("w", encoding="utf-8", newline="") as adv,
        pub_path.open("w", encoding="utf-8", newline="") as pub,
    ):
        counts = write_sample_streams(adv, pub, rows=rows, seed=seed, overlap=overlap)
    return SampleFiles(advertiser=adv_path, publisher=pub_path, counts=counts)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m workload.example.sampledata --out DIR --rows N --seed S``."""
    parser = argparse.ArgumentParser(
        prog="python -m workload.example.sampledata",
        description="Write the demo's advertiser.csv and publisher.csv (synthetic people).",
    )
    parser.add_argument("--out", required=True, type=Path, help="directory to write into")
    parser.add_argument("--rows", type=int, default=10_000, help="rows per party (10000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument(
        "--overlap",
        type=float,
        default=DEFAULT_OVERLAP,
        help=f"share of each party's people the other also has ({DEFAULT_OVERLAP})",
    )
    args = parser.parse_args(argv)
    try:
        files = write_sample_data(args.out, rows=args.rows, seed=args.seed, overlap=args.overlap)
    except (ValueError, OSError) as e:
        parser.exit(2, f"error: {e}\n")
    c = files.counts
    print(
        f"wrote {files.advertiser} ({c.advertiser_rows} rows) and {files.publisher} "
        f"({c.publisher_rows} rows); {c.overlap} people in both"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

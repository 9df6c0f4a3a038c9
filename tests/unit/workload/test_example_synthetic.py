"""The synthetic data: no real row or id, no small combination, close marginals."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import pytest

from workload.example import analysis as A
from workload.example.errors import SynthesisError
from workload.example.sampledata import generate
from workload.example.synthetic import synthesize

NUMERIC = [*A.ADVERTISER_NUMERIC, *A.PUBLISHER_NUMERIC]
HEX64 = re.compile(r"[0-9a-f]{64}")


@pytest.fixture(scope="module")
def inputs() -> tuple[pd.DataFrame, pd.DataFrame]:
    data = generate(6000, 77)

    def read(raw: bytes) -> pd.DataFrame:
        return pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)

    adv = A.validate(read(data.advertiser), source="advertiser", numeric=A.ADVERTISER_NUMERIC)
    pub = A.validate(
        read(data.publisher),
        source="publisher",
        numeric=A.PUBLISHER_NUMERIC,
        categorical=A.PUBLISHER_CATEGORICAL,
    )
    return adv, pub


@pytest.fixture(scope="module")
def real(inputs: tuple[pd.DataFrame, pd.DataFrame]) -> pd.DataFrame:
    return A.analyze(*inputs, seed=0).joined.drop(columns=A.ID_COLUMN)


def _synthesize(
    real: pd.DataFrame,
    rows: int,
    seed: int,
    *,
    k: int = 10,
    categorical: Sequence[str] = A.PUBLISHER_CATEGORICAL,
    numeric: Sequence[str] = NUMERIC,
    exclude_ids: pd.Series[str] | None = None,
    exclude: Literal["all", "rare"] = "all",
    max_rounds: int = 200,
) -> tuple[pd.DataFrame, float]:
    return synthesize(
        real,
        rows=rows,
        k=k,
        categorical=categorical,
        numeric=numeric,
        by="segment",
        rng=np.random.default_rng(seed),
        exclude_ids=pd.Series([], dtype=str) if exclude_ids is None else exclude_ids,
        exclude=exclude,
        max_rounds=max_rounds,
    )


@pytest.fixture(scope="module")
def result(
    inputs: tuple[pd.DataFrame, pd.DataFrame], real: pd.DataFrame
) -> tuple[pd.DataFrame, float]:
    adv, pub = inputs
    ids = pd.concat([adv.user_id, pub.user_id])
    return _synthesize(real, len(real), 123, exclude_ids=ids)


def test_same_columns_rows_and_new_ids(
    result: tuple[pd.DataFrame, float],
    real: pd.DataFrame,
    inputs: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    synthetic, redrawn = result
    assert list(synthetic.columns) == [A.ID_COLUMN, *NUMERIC, *A.PUBLISHER_CATEGORICAL]
    assert len(synthetic) == len(real)
    assert synthetic.user_id.str.fullmatch(HEX64).all() and synthetic.user_id.is_unique
    adv, pub = inputs
    assert not set(synthetic.user_id) & (set(adv.user_id) | set(pub.user_id))
    # On this data a share of the draws equal a real row and are drawn again.
    assert 0 < redrawn < 0.35


def test_no_real_row_appears(result: tuple[pd.DataFrame, float], real: pd.DataFrame) -> None:
    columns = [*NUMERIC, *A.PUBLISHER_CATEGORICAL]
    real_rows = set(real[columns].itertuples(index=False, name=None))
    assert not real_rows & set(result[0][columns].itertuples(index=False, name=None))


def test_marginals_are_close(result: tuple[pd.DataFrame, float], real: pd.DataFrame) -> None:
    synthetic = result[0]
    for column in A.PUBLISHER_CATEGORICAL:
        diff = real[column].value_counts(normalize=True) - synthetic[column].value_counts(
            normalize=True
        )
        assert diff.abs().max() < 0.03, column
    for column in NUMERIC:
        sd = real[column].std()
        assert abs(real[column].mean() - synthetic[column].mean()) < 0.15 * sd, column
        assert abs(synthetic[column].std() / sd - 1) < 0.15, column
    # The dependence that matters most, impressions growing with page views, survives.
    assert synthetic[["impressions", "page_views"]].corr().iloc[0, 1] > 0.6


def test_conversion_rates_by_segment_keep_their_order(
    result: tuple[pd.DataFrame, float], real: pd.DataFrame
) -> None:
    def order(frame: pd.DataFrame) -> list[str]:
        rates = (frame.conversions > 0).groupby(frame.segment).mean()
        return [str(s) for s in rates.sort_values().index[-2:]]

    assert set(order(result[0])) == set(order(real)) == {"finance", "tech"}


def test_same_seed_same_sample(real: pd.DataFrame) -> None:
    a, _ = _synthesize(real, 500, 9)
    b, _ = _synthesize(real, 500, 9)
    pd.testing.assert_frame_equal(a, b)


def test_extremes_are_clipped_at_the_kth_value(real: pd.DataFrame) -> None:
    sample, _ = _synthesize(real, 20_000, 2, k=25)
    for column in NUMERIC:
        ordered = np.sort(real[column].to_numpy())
        # Within each segment the clip is at that segment's k-th values, which lie inside
        # the whole column's.
        assert sample[column].max() <= ordered[-25], column
        assert sample[column].min() >= ordered[24], column


def _small(segments: list[str], values: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"n": values, "segment": segments})


def test_small_combinations_never_appear() -> None:
    segments = ["big"] * 60 + ["mid"] * 30 + ["tiny"] * 3
    values = np.random.default_rng(0).integers(0, 1000, size=(2, 93))
    frame = _small(segments, values[0].tolist()).assign(m=values[1])
    out, _ = _synthesize(frame, 2000, 4, categorical=["segment"], numeric=["n", "m"])
    assert set(out.segment) == {"big", "mid"}


def test_a_value_space_covered_by_real_rows_cannot_be_synthesised() -> None:
    # Every combination of the two columns exists in the real data: any drawn row copies one.
    frame = _small(["a", "b"] * 20, [0, 0, 1, 1] * 10)
    with pytest.raises(SynthesisError, match="redraws"):
        _synthesize(frame, 10, 0, k=1, categorical=["segment"], numeric=["n"], max_rounds=5)


def test_rare_mode_only_excludes_rows_fewer_than_k_share() -> None:
    # "a,0" is common (30 people), "b,1" is one person's row.
    segments = ["a"] * 30 + ["b"] * 12 + ["a"] * 12
    values = [0] * 30 + [1] + [5] * 11 + [9] * 12
    frame = _small(segments, values)
    out, _ = _synthesize(
        frame, 3000, 3, k=10, categorical=["segment"], numeric=["n"], exclude="rare"
    )
    rows = set(out[["n", "segment"]].itertuples(index=False, name=None))
    assert (1, "b") not in rows and (0, "a") in rows

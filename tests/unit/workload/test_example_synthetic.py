"""The synthetic data: no real row or id, close marginals and pairwise correlations."""

from __future__ import annotations

import csv
import io
import itertools
import re

import numpy as np
import pytest

from workload.example import analysis as A
from workload.example.errors import SynthesisError
from workload.example.sampledata import generate
from workload.example.synthetic import Synthetic, fit_copula, synthesize

HEX64 = re.compile(rb"[0-9a-f]{64}")


def _rows(t: A.Table) -> list[tuple[object, ...]]:
    """Each row's data columns (the id excluded), as Python values."""
    cols = [c.tolist() for c in (*t.numeric.values(), *t.categorical.values())]
    return list(zip(*cols, strict=True))


def _encoded(t: A.Table, levels: dict[str, list[str]]) -> tuple[list[str], np.ndarray]:
    """Numeric columns as they are, categorical ones as one indicator per level."""
    names = list(t.numeric)
    cols = [v.astype(float) for v in t.numeric.values()]
    for name, lvs in levels.items():
        for lv in lvs:
            names.append(f"{name}={lv}")
            cols.append((t.categorical[name] == lv).astype(float))
    return names, np.column_stack(cols)


@pytest.fixture(scope="module")
def inputs() -> tuple[A.Table, A.Table]:
    data = generate(6000, 77)
    adv = A.read_advertiser(csv.DictReader(io.StringIO(data.advertiser.decode())))
    pub = A.read_publisher(csv.DictReader(io.StringIO(data.publisher.decode())))
    return adv, pub


@pytest.fixture(scope="module")
def real(inputs: tuple[A.Table, A.Table]) -> A.Table:
    return A.join(*inputs)


@pytest.fixture(scope="module")
def result(inputs: tuple[A.Table, A.Table], real: A.Table) -> Synthetic:
    adv, pub = inputs
    return synthesize(
        real,
        rows=len(real),
        k=10,
        rng=np.random.default_rng(123),
        exclude_ids=np.concatenate([adv.ids, pub.ids]),
    )


@pytest.fixture(scope="module")
def synthetic(result: Synthetic) -> A.Table:
    return result.table


def test_redrawn_rows_are_counted(result: Synthetic, real: A.Table) -> None:
    # On this data a share of the draws equal a real row and are drawn again.
    assert 0 < result.redrawn < len(real) // 3


def test_same_columns_and_rows(real: A.Table, synthetic: A.Table) -> None:
    assert synthetic.columns == real.columns
    assert len(synthetic) == len(real) == 4200


def test_no_real_row_appears(real: A.Table, synthetic: A.Table) -> None:
    assert not set(_rows(real)) & set(_rows(synthetic))


def test_no_real_id_appears(
    inputs: tuple[A.Table, A.Table], real: A.Table, synthetic: A.Table
) -> None:
    adv, pub = inputs
    ids = synthetic.ids.tolist()
    assert len(set(ids)) == len(ids)
    assert all(HEX64.fullmatch(i) for i in ids)
    assert not set(ids) & set(adv.ids.tolist() + pub.ids.tolist())


def test_category_frequencies_are_close(real: A.Table, synthetic: A.Table) -> None:
    for name, values in real.categorical.items():
        levels, counts = np.unique(values, return_counts=True)
        got = synthetic.categorical[name]
        assert set(np.unique(got).tolist()) == set(levels.tolist())
        for lv, c in zip(levels.tolist(), counts.tolist(), strict=True):
            assert float(np.mean(got == lv)) == pytest.approx(c / len(values), abs=0.02), (name, lv)


def test_numeric_means_and_spreads_are_close(real: A.Table, synthetic: A.Table) -> None:
    for name, values in real.numeric.items():
        r, s = values.astype(float), synthetic.numeric[name].astype(float)
        assert abs(s.mean() - r.mean()) < 0.1 * r.std(), name
        assert s.std() == pytest.approx(r.std(), rel=0.1), name
        assert s.min() >= r.min() and s.max() <= r.max(), name


def test_pairwise_correlations_are_close(real: A.Table, synthetic: A.Table) -> None:
    levels = {n: sorted(set(v.tolist())) for n, v in real.categorical.items()}
    names, r = _encoded(real, levels)
    _, s = _encoded(synthetic, levels)
    rc, sc = np.corrcoef(r, rowvar=False), np.corrcoef(s, rowvar=False)
    diff = np.abs(rc - sc)
    i, j = np.unravel_index(int(np.argmax(diff)), diff.shape)
    assert diff.max() < 0.1, (names[i], names[j], rc[i, j], sc[i, j])
    # The strong dependences are really there, not just small everywhere.
    big = [(names[a], names[b]) for a, b in itertools.combinations(range(len(names)), 2)]
    strong = [
        p for p, v in zip(big, rc[np.triu_indices(len(names), 1)], strict=True) if abs(v) > 0.3
    ]
    assert ("impressions", "page_views") in strong and ("clicks", "conversions") in strong


def test_conversion_rates_by_segment_keep_their_order(real: A.Table, synthetic: A.Table) -> None:
    def rates(t: A.Table) -> dict[str, float]:
        conv = A.converted(t)
        return {
            str(s): float(conv[t.categorical["segment"] == s].mean())
            for s in np.unique(t.categorical["segment"])
        }

    r, s = rates(real), rates(synthetic)
    assert sorted(r, key=r.__getitem__) == sorted(s, key=s.__getitem__)
    for seg in r:
        assert s[seg] == pytest.approx(r[seg], abs=0.05)


def test_same_seed_same_sample(real: A.Table) -> None:
    a = synthesize(real, rows=500, k=10, rng=np.random.default_rng(9)).table
    b = synthesize(real, rows=500, k=10, rng=np.random.default_rng(9)).table
    assert a.ids.tolist() == b.ids.tolist()
    assert _rows(a) == _rows(b)


def test_extremes_are_clipped_at_the_kth_value(real: A.Table) -> None:
    sample = fit_copula(real, k=25, rng=np.random.default_rng(1)).sample(
        50_000, np.random.default_rng(2)
    )
    for name, values in real.numeric.items():
        ordered = np.sort(values)
        assert sample.numeric[name].max() <= ordered[-25], name
        assert sample.numeric[name].min() >= ordered[24], name
    assert sample.numeric["page_views"].max() < ordered.max()


def _small_table(segments: list[str], values: list[int]) -> A.Table:
    return A.Table(
        ids=np.array([f"{i:064x}".encode() for i in range(len(values))]),
        numeric={"n": np.array(values, dtype=np.int64)},
        categorical={"segment": np.array(segments)},
    )


def test_rare_categories_never_appear_by_name() -> None:
    segments = ["big"] * 60 + ["mid"] * 30 + ["tiny"] * 3
    values = np.random.default_rng(0).integers(0, 1000, size=93).tolist()
    t = _small_table(segments, values)
    out = synthesize(t, rows=2000, k=10, rng=np.random.default_rng(4)).table
    got = set(out.categorical["segment"].tolist())
    assert "tiny" not in got
    assert got == {"big", "mid", A.OTHER_LEVEL}


def test_a_value_space_covered_by_real_rows_cannot_be_synthesised() -> None:
    # Every combination of the two columns exists in the real data: any drawn row copies one.
    segments = ["a", "b"] * 20
    values = [0, 0, 1, 1] * 10
    t = _small_table(segments, values)
    with pytest.raises(SynthesisError, match="redraws"):
        synthesize(t, rows=10, k=1, rng=np.random.default_rng(0), max_rounds=5)


def test_rare_mode_only_excludes_rows_fewer_than_k_share() -> None:
    # "a,0" is common (30 people), "b,1" is one person's row.
    segments = ["a"] * 30 + ["b"] * 12 + ["a"] * 12
    values = [0] * 30 + [1] + [5] * 11 + [9] * 12
    t = _small_table(segments, values)
    out = synthesize(t, rows=3000, k=10, rng=np.random.default_rng(3), exclude="rare").table
    rows = set(_rows(out))
    assert (1, "b") not in rows
    assert (0, "a") in rows

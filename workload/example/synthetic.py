"""Synthetic data: a Gaussian copula per segment, on pandas, numpy and scipy.

Why not a library: the maintained tabular-synthesis packages are SDV and its ``copulas`` (both
under the Business Source License, not an open-source licence, and SDV pulls PyTorch into the
TEE through CTGAN and DeepEcho), or deep-learning generators (synthcity, ydata-synthetic). A
copula over a few columns is a page of numpy, and the privacy rules below need code of our own
whatever generates the rows.

How it works:

- The audience categories (``segment, age_band, device``) are drawn together from their joint
  distribution over the combinations that at least ``k`` real people share, so no small
  combination appears.
- Within each segment, the numeric columns come from a Gaussian copula: each column's values
  become normal scores through their ranks, the scores' correlation matrix is estimated, and
  drawn normal vectors map back through each column's empirical quantiles. Numeric columns are
  first clipped at their k-th smallest and k-th largest values, so no value held by fewer than
  k people is reproduced.
- Any drawn row equal to a real row (all columns but the id) is drawn again (with ``"rare"``:
  only rows equal to a real row that fewer than k people share), and every row gets a new id.

It keeps each segment's numeric distributions and their correlations (weakened somewhat for
columns with few distinct values), and the joint distribution of the categories. It does not
keep how age band or device shift the numbers within a segment. This is not differential
privacy: every value is one that real people hold, and the sample is a function of the data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final, Literal

import numpy as np
import pandas as pd
from scipy import stats

from workload.example.errors import SynthesisError

#: Rounds of redrawing rows that equal real rows before giving up.
DEFAULT_MAX_ROUNDS: Final = 200
_ID_LABEL: Final = b"cleanroom example synthetic id\x00"


def _copula_sample(real: pd.DataFrame, n: int, k: int, rng: np.random.Generator) -> pd.DataFrame:
    """``n`` rows from a Gaussian copula fitted to ``real``'s (numeric) columns."""
    clipped = real.copy()
    if len(real) >= 2 * k:
        # Beyond the k-th smallest and largest values lie values held by fewer than k people.
        for column in real.columns:
            ordered = np.sort(real[column].to_numpy())
            clipped[column] = real[column].clip(ordered[k - 1], ordered[-k])
    scores = stats.norm.ppf((clipped.rank().to_numpy() - 0.5) / len(clipped))
    # A constant column has no defined correlation: it is independent of the others.
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = (
            np.corrcoef(scores, rowvar=False) if len(clipped) > 2 else np.eye(len(real.columns))
        )
    correlation = np.nan_to_num(np.atleast_2d(correlation))
    np.fill_diagonal(correlation, 1.0)
    drawn = rng.multivariate_normal(np.zeros(real.shape[1]), correlation, n, method="eigh")
    quantiles = stats.norm.cdf(drawn)
    return pd.DataFrame(
        {
            c: np.quantile(clipped[c].to_numpy(), quantiles[:, j], method="inverted_cdf")
            for j, c in enumerate(real.columns)
        }
    )


def _draw(
    real: pd.DataFrame,
    n: int,
    *,
    categorical: Sequence[str],
    numeric: Sequence[str],
    by: str,
    k: int,
    rng: np.random.Generator,
) -> pd.DataFrame:
    combos = real.value_counts(list(categorical))
    combos = combos[combos >= k]
    if combos.empty:
        raise SynthesisError(f"no combination of {', '.join(categorical)} holds {k} people")
    picked = rng.choice(len(combos), size=n, p=(combos / combos.sum()).to_numpy())
    out = pd.DataFrame(combos.index[picked].tolist(), columns=list(categorical))
    parts = []
    for level, rows in out.groupby(by).groups.items():
        sample = _copula_sample(real.loc[real[by] == level, list(numeric)], len(rows), k, rng)
        parts.append(sample.set_index(rows))
    numbers = pd.concat(parts).sort_index().astype(np.int64)
    return pd.concat([numbers, out], axis=1)[[*numeric, *categorical]]


def synthetic_ids(n: int, rng: np.random.Generator, *, exclude: pd.Series[str]) -> list[str]:
    """``n`` new distinct ids shaped like the real ones (hex SHA-256 of a label and 16 random
    bytes, so no e-mail address is hashed), none of them in ``exclude``."""
    known = set(exclude)
    ids: list[str] = []
    while len(ids) < n:
        new = hashlib.sha256(_ID_LABEL + rng.bytes(16)).hexdigest()
        # A clash is astronomically unlikely; skipping it keeps the guarantee free of luck.
        if new not in known:
            known.add(new)
            ids.append(new)
    return ids


def synthesize(
    real: pd.DataFrame,
    *,
    rows: int,
    k: int,
    categorical: Sequence[str],
    numeric: Sequence[str],
    by: str,
    rng: np.random.Generator,
    exclude_ids: pd.Series[str],
    exclude: Literal["all", "rare"] = "all",
    max_rounds: int = DEFAULT_MAX_ROUNDS,
) -> tuple[pd.DataFrame, float]:
    """``rows`` synthetic rows with ``real``'s columns (see the module docstring) and a new
    ``user_id`` each, not in ``exclude_ids``; also the share of rows drawn more than once
    because they equalled a real row.

    Raises:
        ValueError: ``rows`` < 1 or ``exclude`` unknown.
        SynthesisError: no combination holds k people, or rows equal to real rows were still
            drawn after ``max_rounds`` redraws.
    """
    if rows < 1 or exclude not in ("all", "rare"):
        raise ValueError("rows must be positive and exclude 'all' or 'rare'")
    columns = [*numeric, *categorical]
    shared = real.value_counts(columns)
    forbidden = (shared if exclude == "all" else shared[shared < k]).index
    out = _draw(real, rows, categorical=categorical, numeric=numeric, by=by, k=k, rng=rng)
    redrawn = np.zeros(rows, dtype=bool)
    # Only the rows drawn in the last round need checking.
    pending = np.arange(rows)
    for attempt in range(max_rounds + 1):
        pending = pending[pd.MultiIndex.from_frame(out.iloc[pending][columns]).isin(forbidden)]
        if not len(pending):
            break
        if attempt == max_rounds:
            raise SynthesisError(
                f"rows equal to real rows were still drawn after {max_rounds} redraws; the data "
                "has too few distinct values for a synthetic copy"
            )
        redrawn[pending] = True
        fresh = _draw(
            real, len(pending), categorical=categorical, numeric=numeric, by=by, k=k, rng=rng
        )
        for column in columns:
            out.loc[out.index[pending], column] = fresh[column].to_numpy()
    out.insert(0, "user_id", synthetic_ids(rows, rng, exclude=exclude_ids))
    return out.astype({c: np.int64 for c in numeric}), float(redrawn.mean())

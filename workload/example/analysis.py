"""The example workload's analytics: pure functions over in-memory data, no I/O.

The pipeline (see :func:`analyze`):

1. :func:`read_advertiser` / :func:`read_publisher` turn CSV rows (dicts, as ``csv.DictReader``
   and ``workload.read_csv`` yield them) into :class:`Table` objects, checking the columns.
2. :func:`join` keeps the people both parties have (inner join on the hashed ``user_id``).
3. :func:`collapse_rare_levels` folds every category held by fewer than ``k`` joined people
   into :data:`OTHER_LEVEL`, so no output names a category that small.
4. :func:`fit_logistic` trains ``converted = conversions > 0`` on the publisher's audience
   features (:func:`fit_features`, :func:`design_matrix`) on a training split;
   :func:`roc_auc` and :func:`accuracy` score it on the held-out rows.
5. :func:`conversion_rates` and :func:`conversion_rates_2way` aggregate conversion rates with
   small-cell suppression (:func:`suppress_cells`).
6. :func:`workload.example.synthetic.synthesize` draws a synthetic copy of the joined table.

Nothing here logs, and error messages name columns and row numbers, never values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from workload.example.errors import (
    InputDataError,
    InsufficientDataError,
    ModelFitError,
)

__all__ = [
    "ADVERTISER_CATEGORICAL",
    "ADVERTISER_NUMERIC",
    "DEFAULT_K",
    "DEFAULT_L2",
    "DEFAULT_TEST_FRACTION",
    "ID_COLUMN",
    "INSIGHTS_SCHEMA",
    "OTHER_LEVEL",
    "PUBLISHER_CATEGORICAL",
    "PUBLISHER_NUMERIC",
    "Analysis",
    "FeatureSpec",
    "LogisticModel",
    "RateCell",
    "Table",
    "accuracy",
    "analyze",
    "collapse_rare_levels",
    "conversion_rates",
    "conversion_rates_2way",
    "converted",
    "design_matrix",
    "fit_features",
    "fit_logistic",
    "join",
    "predict_proba",
    "read_advertiser",
    "read_publisher",
    "read_table",
    "roc_auc",
    "split_indices",
    "suppress_cells",
]

ID_COLUMN: Final = "user_id"
ADVERTISER_NUMERIC: Final = ("impressions", "clicks", "conversions")
ADVERTISER_CATEGORICAL: Final[tuple[str, ...]] = ()
PUBLISHER_NUMERIC: Final = ("page_views",)
PUBLISHER_CATEGORICAL: Final = ("segment", "age_band", "device")

#: The label that replaces every category held by fewer than k joined people.
OTHER_LEVEL: Final = "(other)"
#: Smallest number of people any published figure may describe.
DEFAULT_K: Final = 10
DEFAULT_TEST_FRACTION: Final = 0.25
DEFAULT_L2: Final = 1.0
INSIGHTS_SCHEMA: Final = "cleanroom.example.insights/v1"

_OUTCOME_COLUMN: Final = "conversions"
_PAGE_VIEWS: Final = "page_views"
_PAGE_VIEWS_FEATURE: Final = "log_page_views_std"

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
StrArray = npt.NDArray[np.str_]
IdArray = npt.NDArray[np.bytes_]


# --- tables ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """Columns of equal length: ``ids`` (hashed user ids as bytes), integer columns and
    categorical (string) columns. Column order is ``numeric`` then ``categorical``, each in its
    mapping's order."""

    ids: IdArray
    numeric: Mapping[str, IntArray] = field(default_factory=dict)
    categorical: Mapping[str, StrArray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.ids.shape[0]
        for name, col in [*self.numeric.items(), *self.categorical.items()]:
            if col.shape != (n,):
                raise ValueError(f"column {name!r} has {col.shape[0]} rows, ids have {n}")
        overlap = set(self.numeric) & set(self.categorical)
        if overlap or ID_COLUMN in self.numeric or ID_COLUMN in self.categorical:
            raise ValueError("column names must be unique")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def columns(self) -> tuple[str, ...]:
        """The data columns' names in order (the id column excluded)."""
        return (*self.numeric, *self.categorical)

    def take(self, index: npt.NDArray[np.intp] | BoolArray) -> Table:
        """The rows at ``index`` (integer positions or a boolean mask)."""
        return Table(
            ids=self.ids[index],
            numeric={k: v[index] for k, v in self.numeric.items()},
            categorical={k: v[index] for k, v in self.categorical.items()},
        )


def _is_count(value: str) -> bool:
    # ASCII digits only: str.isdigit() also accepts characters such as "²" that int() rejects.
    return bool(value) and value.isascii() and value.isdigit()


def read_table(
    rows: Iterable[Mapping[str, str | None]],
    *,
    source: str,
    numeric: Sequence[str],
    categorical: Sequence[str],
) -> Table:
    """Builds a :class:`Table` from CSV rows keyed by column name.

    Numeric columns must hold non-negative integers; categorical columns and ``user_id`` must
    be non-empty. Extra columns are ignored. Row numbers in errors count data rows from 1.

    Raises:
        InputDataError: no rows, a required column is missing, a row is short, a value is
            malformed or empty, or a ``user_id`` appears more than once.
    """
    required = (ID_COLUMN, *numeric, *categorical)
    ids: list[bytes] = []
    nums: dict[str, list[int]] = {c: [] for c in numeric}
    cats: dict[str, list[str]] = {c: [] for c in categorical}
    checked_header = False
    for line, row in enumerate(rows, start=1):
        if not checked_header:
            missing = [c for c in required if c not in row]
            if missing:
                raise InputDataError(
                    f"{source} input is missing column(s) {', '.join(missing)} "
                    f"(expected {', '.join(required)})"
                )
            checked_header = True
        uid = row.get(ID_COLUMN)
        if not uid:
            raise _short_or_empty(source, line, ID_COLUMN, uid)
        ids.append(uid.encode())
        for c in numeric:
            value = row.get(c)
            if value is None:
                raise _short_or_empty(source, line, c, value)
            if not _is_count(value.strip()):
                raise InputDataError(
                    f"{source} input, row {line}: column {c} is not a non-negative integer"
                )
            nums[c].append(int(value))
        for c in categorical:
            value = row.get(c)
            if not value:
                raise _short_or_empty(source, line, c, value)
            cats[c].append(value)
    if not checked_header:
        raise InputDataError(f"{source} input has no rows")
    id_array = np.array(ids, dtype=np.bytes_)
    repeated = len(ids) - np.unique(id_array).shape[0]
    if repeated:
        raise InputDataError(
            f"{source} input: {repeated} {ID_COLUMN} value(s) appear more than once"
        )
    return Table(
        ids=id_array,
        numeric={c: np.array(v, dtype=np.int64) for c, v in nums.items()},
        categorical={c: np.array(v, dtype=np.str_) for c, v in cats.items()},
    )


def _short_or_empty(source: str, line: int, column: str, value: str | None) -> InputDataError:
    what = "is missing (short row)" if value is None else "is empty"
    return InputDataError(f"{source} input, row {line}: column {column} {what}")


def read_advertiser(rows: Iterable[Mapping[str, str | None]]) -> Table:
    """The advertiser's table: ``user_id, impressions, clicks, conversions``.

    Raises:
        InputDataError: see :func:`read_table`.
    """
    return read_table(
        rows, source="advertiser", numeric=ADVERTISER_NUMERIC, categorical=ADVERTISER_CATEGORICAL
    )


def read_publisher(rows: Iterable[Mapping[str, str | None]]) -> Table:
    """The publisher's table: ``user_id, page_views, segment, age_band, device``.

    Raises:
        InputDataError: see :func:`read_table`.
    """
    return read_table(
        rows, source="publisher", numeric=PUBLISHER_NUMERIC, categorical=PUBLISHER_CATEGORICAL
    )


def join(left: Table, right: Table) -> Table:
    """The inner join on ``user_id``: one row per id both tables hold, ordered by id, with
    ``left``'s columns then ``right``'s.

    Both tables must have unique ids (:func:`read_table` guarantees it).

    Raises:
        ValueError: the tables share a column name.
    """
    if set(left.columns) & set(right.columns):
        raise ValueError("the tables to join share a column name")
    ids, li, ri = np.intersect1d(left.ids, right.ids, assume_unique=True, return_indices=True)
    return Table(
        ids=ids,
        numeric={
            **{k: v[li] for k, v in left.numeric.items()},
            **{k: v[ri] for k, v in right.numeric.items()},
        },
        categorical={
            **{k: v[li] for k, v in left.categorical.items()},
            **{k: v[ri] for k, v in right.categorical.items()},
        },
    )


def _level_counts(values: StrArray) -> dict[str, int]:
    levels, counts = np.unique(values, return_counts=True)
    return {str(lv): int(c) for lv, c in zip(levels, counts, strict=True)}


def collapse_rare_levels(table: Table, *, k: int) -> tuple[Table, dict[str, int]]:
    """Replaces every categorical level held by fewer than ``k`` rows with :data:`OTHER_LEVEL`.

    Returns the new table and, per column, how many levels were folded (counts, not names).
    The folded group may itself hold fewer than ``k`` rows; later steps treat it like any
    other small group.
    """
    out: dict[str, StrArray] = {}
    folded: dict[str, int] = {}
    for name, col in table.categorical.items():
        rare = [lv for lv, c in _level_counts(col).items() if c < k]
        folded[name] = len(rare)
        out[name] = np.where(np.isin(col, rare), OTHER_LEVEL, col) if rare else col
    return Table(ids=table.ids, numeric=dict(table.numeric), categorical=out), folded


def converted(table: Table) -> BoolArray:
    """The outcome: whether each person converted at least once."""
    result: BoolArray = table.numeric[_OUTCOME_COLUMN] > 0
    return result


# --- the model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSpec:
    """How audience columns become model features, learned from the training rows.

    Each categorical column gets one indicator per level except its reference level (the most
    frequent one, so the coefficients compare each level with the largest group) and except
    levels with fewer than ``min_level_rows`` training rows, which share the reference's zero
    so that no coefficient describes a handful of people. Page views enter as
    ``(log1p(page_views) - mean) / std``.
    """

    levels: Mapping[str, tuple[str, ...]]
    reference: Mapping[str, str]
    log_page_views_mean: float
    log_page_views_std: float

    @property
    def names(self) -> tuple[str, ...]:
        """Feature names, in design-matrix column order."""
        cats = [f"{col}={lv}" for col, lvs in self.levels.items() for lv in lvs]
        return (*cats, _PAGE_VIEWS_FEATURE)


def fit_features(
    table: Table, *, columns: Sequence[str] = PUBLISHER_CATEGORICAL, min_level_rows: int = 1
) -> FeatureSpec:
    """Learns the feature encoding from ``table`` (the training rows)."""
    levels: dict[str, tuple[str, ...]] = {}
    reference: dict[str, str] = {}
    for col in columns:
        counts = _level_counts(table.categorical[col])
        # Most frequent first; ties broken by name so the choice is deterministic.
        ordered = sorted(counts, key=lambda lv: (-counts[lv], lv))
        reference[col] = ordered[0]
        levels[col] = tuple(sorted(lv for lv in ordered[1:] if counts[lv] >= min_level_rows))
    log_pv = np.log1p(table.numeric[_PAGE_VIEWS].astype(np.float64))
    std = float(log_pv.std())
    return FeatureSpec(
        levels=levels,
        reference=reference,
        log_page_views_mean=float(log_pv.mean()),
        # A constant column carries no signal; a unit scale keeps the feature finite (zero).
        log_page_views_std=std if std > 0 else 1.0,
    )


def design_matrix(table: Table, spec: FeatureSpec) -> FloatArray:
    """The feature matrix (rows x ``len(spec.names)``), without an intercept column.

    Levels the spec does not know (seen only outside the training rows) encode like the
    reference level.
    """
    parts: list[FloatArray] = []
    for col, lvs in spec.levels.items():
        values = table.categorical[col]
        parts.extend((values == lv).astype(np.float64) for lv in lvs)
    log_pv = np.log1p(table.numeric[_PAGE_VIEWS].astype(np.float64))
    parts.append((log_pv - spec.log_page_views_mean) / spec.log_page_views_std)
    return np.column_stack(parts) if parts else np.empty((len(table), 0))


@dataclass(frozen=True)
class LogisticModel:
    """A fitted logistic regression: ``P(y) = sigmoid(intercept + X @ coefficients)``."""

    feature_names: tuple[str, ...]
    intercept: float
    coefficients: FloatArray
    l2: float
    iterations: int

    def coefficient(self, name: str) -> float:
        """The coefficient of feature ``name``.

        Raises:
            KeyError: no feature of that name.
        """
        return float(self.coefficients[self.feature_names.index(name)])


def _penalized_loss(xa: FloatArray, y: FloatArray, beta: FloatArray, l2: float) -> float:
    eta = xa @ beta
    # log(1 + e^eta) - y * eta, summed: the negative log-likelihood, stable for large |eta|.
    nll = float(np.sum(np.logaddexp(0.0, eta) - y * eta))
    return nll + 0.5 * l2 * float(beta[1:] @ beta[1:])


def fit_logistic(
    x: FloatArray,
    y: BoolArray,
    *,
    feature_names: Sequence[str],
    l2: float = DEFAULT_L2,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> LogisticModel:
    """Fits an L2-penalised logistic regression by Newton's method (IRLS) with backtracking.

    Minimises ``sum(log(1 + e^eta) - y * eta) + l2/2 * |w|^2`` with ``eta = b + X w``; the
    intercept ``b`` is not penalised. Stops when half the Newton decrement falls below ``tol``.

    Raises:
        ValueError: shapes disagree or ``l2`` is negative.
        InsufficientDataError: ``y`` holds one outcome only.
        ModelFitError: no convergence within ``max_iter`` steps, or a singular system.
    """
    n, p = x.shape
    if y.shape != (n,) or len(feature_names) != p:
        raise ValueError("x, y and feature_names disagree in size")
    if l2 < 0 or not math.isfinite(l2):
        raise ValueError("l2 must be a non-negative number")
    positives = int(y.sum())
    if positives in (0, n):
        raise InsufficientDataError("the training rows hold only one outcome")
    xa = np.column_stack([np.ones(n), x])
    yf = y.astype(np.float64)
    beta = np.zeros(p + 1)
    # Starting from the base rate's log-odds saves a step or two.
    beta[0] = math.log(positives / (n - positives))
    penalty = np.full(p + 1, l2)
    penalty[0] = 0.0
    loss = _penalized_loss(xa, yf, beta, l2)
    for iteration in range(1, max_iter + 1):
        prob = 1.0 / (1.0 + np.exp(-(xa @ beta)))
        grad = xa.T @ (prob - yf) + penalty * beta
        weights = prob * (1.0 - prob)
        hessian = (xa.T * weights) @ xa + np.diag(penalty)
        try:
            step = np.linalg.solve(hessian, grad)
        except np.linalg.LinAlgError as e:
            raise ModelFitError(
                "the logistic regression's Newton system is singular (use l2 > 0)"
            ) from e
        decrement = float(grad @ step)
        if decrement / 2.0 < tol:
            # So close to the optimum the full Newton step is safe, and it squares the error.
            beta = beta - step
            return LogisticModel(tuple(feature_names), float(beta[0]), beta[1:], l2, iteration)
        # Backtracking (Armijo) keeps every step a descent step even far from the optimum.
        t = 1.0
        while True:
            candidate = beta - t * step
            new_loss = _penalized_loss(xa, yf, candidate, l2)
            if new_loss <= loss - 1e-4 * t * decrement or t < 1e-10:
                break
            t /= 2.0
        beta, loss = candidate, new_loss
    raise ModelFitError(f"the logistic regression did not converge in {max_iter} iterations")


def predict_proba(model: LogisticModel, x: FloatArray) -> FloatArray:
    """Predicted probabilities of the positive outcome."""
    eta = model.intercept + x @ model.coefficients
    result: FloatArray = 1.0 / (1.0 + np.exp(-eta))
    return result


def split_indices(
    n: int, *, test_fraction: float, rng: np.random.Generator
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """A random train/test split of ``range(n)``: (train, test), both sorted and non-empty.

    Raises:
        ValueError: ``test_fraction`` is not strictly between 0 and 1, or ``n < 2``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError("test_fraction must be strictly between 0 and 1")
    if n < 2:
        raise ValueError("need at least two rows to split")
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    perm = rng.permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def roc_auc(y: BoolArray, scores: FloatArray) -> float:
    """The area under the ROC curve, by the rank-sum (Mann-Whitney) formula.

    ``AUC = (R+ - n+ (n+ + 1) / 2) / (n+ n-)`` where ``R+`` is the sum of the positives'
    ranks among all scores; tied scores get their average rank, so a tie counts one half.

    Raises:
        ValueError: shapes disagree, or ``y`` holds one outcome only.
    """
    if y.shape != scores.shape or y.ndim != 1:
        raise ValueError("y and scores must be 1-D arrays of the same length")
    n_pos = int(y.sum())
    n_neg = int(y.shape[0]) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both outcomes")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # The 1-based ranks of a tie group span (start, start + count]; all get their mean.
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0
    rank_sum = float(average_rank[inverse][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def accuracy(y: BoolArray, scores: FloatArray, *, threshold: float = 0.5) -> float:
    """Share of rows where ``scores >= threshold`` equals ``y``.

    Raises:
        ValueError: shapes disagree or there are no rows.
    """
    if y.shape != scores.shape or y.shape[0] == 0:
        raise ValueError("y and scores must be non-empty and of the same length")
    return float(np.mean((scores >= threshold) == y))


# --- aggregates with small-cell suppression -------------------------------------------------


@dataclass(frozen=True)
class RateCell:
    """One cell of a conversion-rate table. ``users``, ``converters`` and ``conversion_rate``
    are None when the cell is suppressed."""

    key: Mapping[str, str]
    users: int | None
    converters: int | None
    conversion_rate: float | None
    suppressed: bool

    def to_json(self) -> dict[str, Any]:
        """The cell as a JSON object: its key columns, then the figures."""
        return {
            **self.key,
            "users": self.users,
            "converters": self.converters,
            "conversion_rate": self.conversion_rate,
            "suppressed": self.suppressed,
        }


def suppress_cells(counts: npt.ArrayLike, *, k: int) -> BoolArray:
    """Which cells of a group whose total is published must be suppressed.

    Primary suppression hides every cell with fewer than ``k`` people (including empty cells,
    so a suppressed cell does not reveal whether anyone is in it). Because the total is
    published, the suppressed cells' sum can be recovered by subtraction; complementary
    suppression therefore also hides the smallest remaining cells until that sum is zero or at
    least ``k``, so subtraction yields nothing smaller than ``k`` people.

    Raises:
        ValueError: ``k`` is less than 1.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    c = np.asarray(counts, dtype=np.int64)
    hidden: BoolArray = c < k
    while True:
        residual = int(c[hidden].sum())
        if residual == 0 or residual >= k or hidden.all():
            return hidden
        # Hide the smallest visible cell (the first one on ties, for determinism).
        visible = np.flatnonzero(~hidden)
        hidden[visible[np.argmin(c[visible])]] = True


def _cell(key: dict[str, str], users: int, converters: int, hidden: bool) -> RateCell:
    if hidden:
        return RateCell(key, None, None, None, True)
    return RateCell(key, users, converters, converters / users, False)


def _group_counts(
    values: StrArray, outcome: BoolArray, levels: Sequence[str]
) -> tuple[IntArray, IntArray]:
    index = np.searchsorted(np.array(levels, dtype=np.str_), values)
    users = np.bincount(index, minlength=len(levels)).astype(np.int64)
    conv = np.bincount(index, weights=outcome, minlength=len(levels)).astype(np.int64)
    return users, conv


def conversion_rates(table: Table, *, by: str, k: int = DEFAULT_K) -> list[RateCell]:
    """Conversion rate per level of ``by``, with cells suppressed by :func:`suppress_cells`
    (the table's total, the join size, is taken to be published).

    Raises:
        ValueError: ``k`` is less than 1.
        KeyError: no categorical column ``by``.
    """
    values = table.categorical[by]
    levels = sorted(str(v) for v in np.unique(values))
    users, conv = _group_counts(values, converted(table), levels)
    hidden = suppress_cells(users, k=k)
    return [
        _cell({by: lv}, int(u), int(c), bool(h))
        for lv, u, c, h in zip(levels, users, conv, hidden, strict=True)
    ]


def conversion_rates_2way(
    table: Table, *, rows: str, cols: str, k: int = DEFAULT_K
) -> list[RateCell]:
    """Conversion rate per (``rows`` level, ``cols`` level), every combination of the levels
    present listed, meant to be published next to ``conversion_rates(table, by=rows)``.

    Within a row whose one-way cell is published, cells are suppressed by
    :func:`suppress_cells` (the row total is published there). A row whose one-way cell is
    suppressed is suppressed whole, since a fully published row would reveal its total.

    Raises:
        ValueError: ``k`` is less than 1.
        KeyError: no categorical column ``rows`` or ``cols``.
    """
    one_way = {cell.key[rows]: cell.suppressed for cell in conversion_rates(table, by=rows, k=k)}
    outcome = converted(table)
    col_values = table.categorical[cols]
    col_levels = sorted(str(v) for v in np.unique(col_values))
    row_values = table.categorical[rows]
    cells: list[RateCell] = []
    for row_level, row_hidden in one_way.items():
        mask = row_values == row_level
        users, conv = _group_counts(col_values[mask], outcome[mask], col_levels)
        hidden = (
            np.ones(len(col_levels), dtype=np.bool_) if row_hidden else suppress_cells(users, k=k)
        )
        cells.extend(
            _cell({rows: row_level, cols: lv}, int(u), int(c), bool(h))
            for lv, u, c, h in zip(col_levels, users, conv, hidden, strict=True)
        )
    return cells


# --- the whole analysis ----------------------------------------------------------------------


@dataclass(frozen=True)
class Analysis:
    """What :func:`analyze` produces: the insights document (JSON-ready, aggregates only), the
    fitted model and the synthetic table."""

    insights: dict[str, Any]
    model: LogisticModel
    synthetic: Table


def analyze(
    advertiser: Table,
    publisher: Table,
    *,
    k: int = DEFAULT_K,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    l2: float = DEFAULT_L2,
    synthetic_rows: int | None = None,
    exclude_real_rows: Literal["all", "rare"] = "all",
    rng: np.random.Generator,
) -> Analysis:
    """Joins the parties' tables, trains and scores the model, aggregates conversion rates and
    draws the synthetic table.

    Raises:
        ValueError: ``k`` < 1, ``test_fraction`` outside (0, 1), ``l2`` < 0 or
            ``synthetic_rows`` < 1.
        InsufficientDataError: fewer than ``k`` people in the join, or a split holds one
            outcome only.
        ModelFitError: the model did not converge.
        SynthesisError: see :func:`workload.example.synthetic.synthesize`.
    """
    # Imported here because synthetic builds on this module's Table.
    from workload.example.synthetic import synthesize

    if k < 1:
        raise ValueError("k must be at least 1")
    if synthetic_rows is not None and synthetic_rows < 1:
        raise ValueError("synthetic_rows must be positive")
    joined = join(advertiser, publisher)
    if len(joined) < max(k, 2):
        raise InsufficientDataError(
            f"the parties have fewer than {max(k, 2)} people in common; nothing is reported"
        )
    table, folded = collapse_rare_levels(joined, k=k)

    train_idx, test_idx = split_indices(len(table), test_fraction=test_fraction, rng=rng)
    train, test = table.take(train_idx), table.take(test_idx)
    spec = fit_features(train, min_level_rows=k)
    y_train, y_test = converted(train), converted(test)
    model = fit_logistic(design_matrix(train, spec), y_train, feature_names=spec.names, l2=l2)
    scores = predict_proba(model, design_matrix(test, spec))
    try:
        auc: float = roc_auc(y_test, scores)
    except ValueError as e:
        raise InsufficientDataError("the held-out rows hold only one outcome") from e

    synthetic = synthesize(
        joined,
        rows=len(joined) if synthetic_rows is None else synthetic_rows,
        k=k,
        rng=rng,
        exclude_ids=np.concatenate([advertiser.ids, publisher.ids]),
        exclude=exclude_real_rows,
    )

    insights: dict[str, Any] = {
        "schema": INSIGHTS_SCHEMA,
        "k": k,
        "join": {"overlap": len(joined)},
        "model": {
            "type": "logistic_regression",
            "target": "converted (conversions > 0)",
            "fit": "Newton/IRLS, L2 penalty on coefficients (not the intercept)",
            "l2": l2,
            "iterations": model.iterations,
            "intercept": model.intercept,
            "coefficients": {
                name: float(c)
                for name, c in zip(model.feature_names, model.coefficients, strict=True)
            },
            "reference_levels": dict(spec.reference),
            "page_views_feature": {
                "name": _PAGE_VIEWS_FEATURE,
                "transform": "(log1p(page_views) - mean) / std over the training rows",
                "mean": spec.log_page_views_mean,
                "std": spec.log_page_views_std,
            },
        },
        "evaluation": {
            "n_train": len(train),
            "n_test": len(test),
            "test_accuracy": accuracy(y_test, scores),
            "test_auc": auc,
            "test_positive_rate": float(y_test.mean()),
        },
        "conversion_rates": {
            "suppression": (
                f"cells with fewer than {k} users are suppressed, and so are complementary "
                "cells needed to stop recovery by subtraction; suppressed cells are listed "
                "with null figures and suppressed: true"
            ),
            "by_segment": [c.to_json() for c in conversion_rates(table, by="segment", k=k)],
            "by_segment_and_age_band": [
                c.to_json()
                for c in conversion_rates_2way(table, rows="segment", cols="age_band", k=k)
            ],
        },
        "rare_levels_folded": {
            "label": OTHER_LEVEL,
            "levels_per_column": folded,
        },
        "synthetic": {
            "method": "gaussian_copula",
            "rows": len(synthetic.table),
            "columns": [ID_COLUMN, *synthetic.table.columns],
            "excluded_real_rows": exclude_real_rows,
            "redrawn_share": synthetic.redrawn / len(synthetic.table),
        },
    }
    return Analysis(insights=insights, model=model, synthetic=synthetic.table)

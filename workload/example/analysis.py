"""The example workload's analytics on pandas and scikit-learn: pure functions, no I/O.

:func:`analyze` joins the parties' tables on the hashed ``user_id``, folds rare categories,
trains a conversion model on a training split and scores it on the held-out rows, and
aggregates conversion rates with small-cell suppression. Error messages name columns and row
numbers, never values: the values are the parties' plaintext.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import pandas as pd
from sklearn.compose import make_column_transformer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score, roc_curve
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

from workload.example.errors import InputDataError, InsufficientDataError

ID_COLUMN: Final = "user_id"
ADVERTISER_NUMERIC: Final = ("impressions", "clicks", "conversions")
PUBLISHER_NUMERIC: Final = ("page_views",)
PUBLISHER_CATEGORICAL: Final = ("segment", "age_band", "device")
#: The label that replaces every category held by fewer than k joined people.
OTHER_LEVEL: Final = "(other)"
#: Smallest number of people any published figure may describe.
DEFAULT_K: Final = 10
DEFAULT_TEST_FRACTION: Final = 0.25
DEFAULT_L2: Final = 1.0
INSIGHTS_SCHEMA: Final = "cleanroom.example.insights/v2"
RATE_COLUMNS: Final = ("users", "converters", "conversion_rate")


def validate(
    frame: pd.DataFrame, *, source: str, numeric: Sequence[str], categorical: Sequence[str] = ()
) -> pd.DataFrame:
    """The input's required columns, typed: ids and categories as strings, counts as int64.

    ``frame`` holds the input as read with every column as a string (``dtype=str``,
    ``keep_default_na=False``); extra columns are dropped. Rows in errors count data rows
    from 1.

    Raises:
        InputDataError: no rows, a missing column, an empty id or category, a value that is not
            a non-negative integer in a numeric column, or an id that appears twice.
    """
    required = [ID_COLUMN, *numeric, *categorical]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise InputDataError(
            f"{source} input is missing column(s) {', '.join(missing)} "
            f"(expected {', '.join(required)})"
        )
    if frame.empty:
        raise InputDataError(f"{source} input has no rows")
    out = frame[required].copy()
    for column in required:
        text = out[column].astype("string").fillna("")
        if column in numeric:
            # ASCII digits only, as the parties' export promises: no signs, no decimals, and
            # at most 18 of them, so the value fits an int64.
            text = text.str.strip()
            bad = ~text.str.fullmatch(r"[0-9]{1,18}", na=False)
            what = "is not a non-negative integer"
        else:
            bad = text.eq("")
            what = "is empty"
        if bad.any():
            rows = _row_numbers(bad)
            raise InputDataError(f"{source} input, row {rows}: column {column} {what}")
        out[column] = text.astype(np.int64) if column in numeric else text.astype(str)
    repeated = int(out[ID_COLUMN].duplicated().sum())
    if repeated:
        raise InputDataError(
            f"{source} input: {repeated} {ID_COLUMN} value(s) appear more than once"
        )
    return out


def _row_numbers(mask: pd.Series[bool]) -> str:
    rows = [str(i + 1) for i in np.flatnonzero(mask.to_numpy())[:5]]
    return ", ".join(rows) + (" and more" if int(mask.sum()) > len(rows) else "")


def fold_rare(frame: pd.DataFrame, columns: Sequence[str], *, k: int) -> pd.DataFrame:
    """Replaces every category held by fewer than ``k`` rows with :data:`OTHER_LEVEL`."""
    out = frame.copy()
    for column in columns:
        counts = out[column].value_counts()
        out[column] = out[column].where(~out[column].isin(counts.index[counts < k]), OTHER_LEVEL)
    return out


def suppress_cells(users: pd.Series[int], *, k: int) -> pd.Series[bool]:
    """Which cells of a group whose total is published must be hidden.

    Primary suppression hides every cell under ``k`` people, empty ones too, so a hidden cell
    does not say whether anyone is in it. As the total is published, the hidden cells' sum
    could be recovered by subtraction: the smallest visible cells are hidden as well until that
    sum is zero or at least ``k`` (complementary suppression).
    """
    hidden = users < k
    while 0 < users[hidden].sum() < k and not hidden.all():
        hidden[users[~hidden].idxmin()] = True
    return hidden


def conversion_rates(frame: pd.DataFrame, by: Sequence[str], *, k: int) -> pd.DataFrame:
    """Users, converters and the conversion rate for every combination of the levels of ``by``
    (empty ones too), with a ``suppressed`` column; a suppressed cell's figures are NaN.

    With two columns, cells are suppressed within each level of the first; a level whose
    one-way cell is suppressed is suppressed whole, since a fully published row would reveal
    its total.
    """
    levels = [sorted(frame[c].unique()) for c in by]
    index = (
        pd.MultiIndex.from_product(levels, names=list(by))
        if len(by) > 1
        else pd.Index(levels[0], name=by[0])
    )
    table = (
        frame.groupby(list(by) if len(by) > 1 else by[0])["converted"]
        .agg(users="size", converters="sum")
        .reindex(index, fill_value=0)
    )
    if len(by) == 1:
        hidden = suppress_cells(table["users"], k=k)
    else:
        one_way = conversion_rates(frame, by[:1], k=k).set_index(by[0])["suppressed"]
        hidden = table.groupby(level=0, group_keys=False)["users"].apply(
            lambda users: suppress_cells(users, k=k) | bool(one_way[users.name])
        )
    table["conversion_rate"] = table["converters"] / table["users"]
    hidden = hidden.reindex(table.index).astype(bool)
    table = table.astype({"users": "Int64", "converters": "Int64"})
    table[list(RATE_COLUMNS)] = table[list(RATE_COLUMNS)].mask(hidden, axis=0)
    table["suppressed"] = hidden
    return table.reset_index()


def conversion_model(*, k: int, l2: float) -> Any:
    """The model: one-hot audience categories (levels under ``k`` training rows share one
    column), ``log1p(page_views)`` standardised, an L2-penalised logistic regression."""
    encode = make_column_transformer(
        (
            OneHotEncoder(
                min_frequency=k,
                handle_unknown="infrequent_if_exist",
                feature_name_combiner=lambda column, level: f"{column}={level}",
            ),
            list(PUBLISHER_CATEGORICAL),
        ),
        (
            make_pipeline(
                FunctionTransformer(np.log1p, feature_names_out="one-to-one"), StandardScaler()
            ),
            ["page_views"],
        ),
        verbose_feature_names_out=False,
    )
    return make_pipeline(encode, LogisticRegression(C=1.0 / l2 if l2 > 0 else np.inf))


@dataclass(frozen=True)
class Analysis:
    """What :func:`analyze` produces: the insights (aggregates only, JSON-ready), the joined
    table after folding (for the synthetic data), the rate tables and the held-out ROC curve
    (for the report)."""

    insights: dict[str, Any]
    joined: pd.DataFrame
    by_segment: pd.DataFrame
    by_segment_and_age_band: pd.DataFrame
    roc: pd.DataFrame


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    # NaN is not JSON: a suppressed cell's figures become null.
    clean = table.astype(object).where(table.notna(), None)
    return [{str(k): v for k, v in row.items()} for row in clean.to_dict("records")]


def analyze(
    advertiser: pd.DataFrame,
    publisher: pd.DataFrame,
    *,
    k: int = DEFAULT_K,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    l2: float = DEFAULT_L2,
    seed: int | None = None,
) -> Analysis:
    """Joins the validated tables, trains and scores the model, aggregates conversion rates.

    Raises:
        ValueError: ``k`` < 1, ``test_fraction`` outside (0, 1) or ``l2`` < 0.
        InsufficientDataError: fewer than ``k`` people in the join, or one outcome only.
    """
    if k < 1 or not 0 < test_fraction < 1 or l2 < 0:
        raise ValueError("need k >= 1, 0 < test_fraction < 1 and l2 >= 0")
    joined = advertiser.merge(publisher, on=ID_COLUMN, validate="one_to_one")
    if len(joined) < max(k, 2):
        raise InsufficientDataError(
            f"the parties have fewer than {max(k, 2)} people in common; nothing is reported"
        )
    joined = joined.sort_values(ID_COLUMN, ignore_index=True)
    joined["converted"] = joined["conversions"] > 0
    folded = fold_rare(joined, PUBLISHER_CATEGORICAL, k=k)
    if folded["converted"].nunique() < 2:
        raise InsufficientDataError("the joined rows hold only one outcome")
    features = folded[[*PUBLISHER_CATEGORICAL, "page_views"]]
    # The held-out rows are the first of a permutation drawn from numpy's default_rng(seed), as
    # earlier versions of this example drew them, so a seed's score stays comparable.
    n_test = min(len(folded) - 1, max(1, round(len(folded) * test_fraction)))
    held_out = np.zeros(len(folded), dtype=bool)
    held_out[np.random.default_rng(seed).permutation(len(folded))[:n_test]] = True
    x_train, x_test = features[~held_out], features[held_out]
    y_train, y_test = folded["converted"][~held_out], folded["converted"][held_out]
    if y_train.nunique() < 2 or y_test.nunique() < 2:
        raise InsufficientDataError("the training or the held-out rows hold only one outcome")
    model = conversion_model(k=k, l2=l2).fit(x_train, y_train)
    scores = model.predict_proba(x_test)[:, 1]
    fpr, tpr, _ = roc_curve(y_test, scores)
    encoder, logistic = model[0], model[-1]
    by_segment = conversion_rates(folded, ["segment"], k=k)
    two_way = conversion_rates(folded, ["segment", "age_band"], k=k)
    insights: dict[str, Any] = {
        "schema": INSIGHTS_SCHEMA,
        "k": k,
        "join": {"overlap": len(joined)},
        "model": {
            "type": "scikit-learn LogisticRegression (L2, lbfgs)",
            "target": "converted (conversions > 0)",
            "l2": l2,
            "intercept": float(logistic.intercept_[0]),
            "coefficients": dict(
                zip(encoder.get_feature_names_out(), map(float, logistic.coef_[0]), strict=True)
            ),
        },
        "evaluation": {
            "n_train": len(x_train),
            "n_test": len(x_test),
            "test_accuracy": float(accuracy_score(y_test, scores >= 0.5)),
            "test_auc": float(roc_auc_score(y_test, scores)),
            "test_positive_rate": float(y_test.mean()),
        },
        "conversion_rates": {
            "suppression": (
                f"cells with fewer than {k} users are suppressed, and so are complementary "
                "cells needed to stop recovery by subtraction; suppressed cells are listed "
                "with null figures and suppressed: true"
            ),
            "by_segment": _records(by_segment),
            "by_segment_and_age_band": _records(two_way),
        },
        "rare_levels_folded": {
            "label": OTHER_LEVEL,
            "levels_per_column": {
                c: int((joined[c].value_counts() < k).sum()) for c in PUBLISHER_CATEGORICAL
            },
        },
    }
    return Analysis(
        insights=insights,
        joined=folded.drop(columns="converted"),
        by_segment=by_segment,
        by_segment_and_age_band=two_way,
        roc=pd.DataFrame({"false_positive_rate": fpr, "true_positive_rate": tpr}),
    )

"""The example workload's analytics: parsing, join, model, metrics and suppressed aggregates."""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterator

import numpy as np
import pytest

from workload.example import analysis as A
from workload.example.errors import InputDataError, InsufficientDataError
from workload.example.sampledata import PLANTED_MODEL, generate


def _dict_rows(text: str) -> Iterator[dict[str, str]]:
    return csv.DictReader(io.StringIO(text))


@pytest.fixture(scope="module")
def sample() -> tuple[A.Table, A.Table]:
    data = generate(6000, 2024)
    adv = A.read_advertiser(_dict_rows(data.advertiser.decode()))
    pub = A.read_publisher(_dict_rows(data.publisher.decode()))
    return adv, pub


# --- reading ---------------------------------------------------------------------------------


def test_reads_typed_columns() -> None:
    t = A.read_publisher(
        _dict_rows("user_id,page_views,segment,age_band,device,extra\nu1,12,news,55+,mobile,x\n")
    )
    assert t.ids.tolist() == [b"u1"]
    assert t.numeric["page_views"].tolist() == [12]
    assert t.categorical["segment"].tolist() == ["news"]
    assert t.columns == ("page_views", "segment", "age_band", "device")


def test_missing_column_is_named() -> None:
    with pytest.raises(InputDataError, match=r"missing column.*conversions"):
        A.read_advertiser(_dict_rows("user_id,impressions,clicks\nu1,3,1\n"))


@pytest.mark.parametrize("bad", ["-1", "3.5", "many", "", "²"])
def test_malformed_count_names_row_and_column_not_value(bad: str) -> None:
    text = f"user_id,impressions,clicks,conversions\nu1,3,1,0\nu2,{bad},1,0\n"
    with pytest.raises(InputDataError) as info:
        A.read_advertiser(_dict_rows(text))
    message = str(info.value)
    assert "row 2" in message and "impressions" in message
    if bad:
        assert bad not in message


def test_short_row_empty_id_and_empty_category() -> None:
    with pytest.raises(InputDataError, match="row 1: column clicks is missing"):
        A.read_advertiser(_dict_rows("user_id,impressions,clicks,conversions\nu1,3\n"))
    with pytest.raises(InputDataError, match="column user_id is empty"):
        A.read_advertiser(_dict_rows("user_id,impressions,clicks,conversions\n,3,1,0\n"))
    with pytest.raises(InputDataError, match="column device is empty"):
        A.read_publisher(_dict_rows("user_id,page_views,segment,age_band,device\nu,1,a,b,\n"))


def test_no_rows_and_repeated_ids_are_refused() -> None:
    with pytest.raises(InputDataError, match="no rows"):
        A.read_advertiser(_dict_rows("user_id,impressions,clicks,conversions\n"))
    with pytest.raises(InputDataError, match="1 user_id value"):
        A.read_advertiser(
            _dict_rows("user_id,impressions,clicks,conversions\nu1,1,0,0\nu2,1,0,0\nu1,2,1,0\n")
        )


# --- join ------------------------------------------------------------------------------------


def test_join_keeps_common_ids_with_aligned_values() -> None:
    adv = A.read_advertiser(
        _dict_rows("user_id,impressions,clicks,conversions\nc,30,3,1\na,10,1,0\nb,20,2,0\n")
    )
    pub = A.read_publisher(
        _dict_rows(
            "user_id,page_views,segment,age_band,device\n"
            "d,4,news,55+,mobile\nb,2,tech,18-24,tablet\nc,3,finance,25-34,desktop\n"
        )
    )
    j = A.join(adv, pub)
    assert j.ids.tolist() == [b"b", b"c"]
    assert j.numeric["impressions"].tolist() == [20, 30]
    assert j.numeric["page_views"].tolist() == [2, 3]
    assert j.categorical["segment"].tolist() == ["tech", "finance"]
    assert j.columns == (
        "impressions",
        "clicks",
        "conversions",
        "page_views",
        "segment",
        "age_band",
        "device",
    )


def test_join_matches_a_dictionary_join(sample: tuple[A.Table, A.Table]) -> None:
    adv, pub = sample
    j = A.join(adv, pub)
    pub_index = {uid: i for i, uid in enumerate(pub.ids.tolist())}
    expected = sorted(
        (uid, int(adv.numeric["conversions"][i]), str(pub.categorical["segment"][pub_index[uid]]))
        for i, uid in enumerate(adv.ids.tolist())
        if uid in pub_index
    )
    got = list(
        zip(
            j.ids.tolist(),
            j.numeric["conversions"].tolist(),
            j.categorical["segment"].tolist(),
            strict=True,
        )
    )
    assert got == expected
    assert len(j) == 4200


def test_rare_levels_fold_into_other() -> None:
    t = A.Table(
        ids=np.array([b"a", b"b", b"c", b"d", b"e"]),
        categorical={"segment": np.array(["x", "x", "x", "y", "z"])},
    )
    folded, counts = A.collapse_rare_levels(t, k=2)
    assert folded.categorical["segment"].tolist() == ["x", "x", "x", A.OTHER_LEVEL, A.OTHER_LEVEL]
    assert counts == {"segment": 2}


# --- model and metrics -----------------------------------------------------------------------


def test_logistic_regression_recovers_known_coefficients() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 3))
    beta = np.array([1.0, -0.5, 0.0])
    y = rng.random(20_000) < 1 / (1 + np.exp(-(-0.3 + x @ beta)))
    model = A.fit_logistic(x, y, feature_names=["a", "b", "c"], l2=0.0)
    assert model.intercept == pytest.approx(-0.3, abs=0.05)
    np.testing.assert_allclose(model.coefficients, beta, atol=0.05)


def test_penalised_fit_is_at_its_optimum() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 4))
    y = rng.random(500) < 0.3
    l2 = 5.0
    model = A.fit_logistic(x, y, feature_names=list("abcd"), l2=l2)
    p = A.predict_proba(model, x)
    # The penalised log-likelihood's gradient vanishes at the optimum.
    assert abs(float(np.sum(p - y))) < 1e-6
    np.testing.assert_allclose(x.T @ (p - y) + l2 * model.coefficients, 0.0, atol=1e-6)


def test_one_outcome_cannot_be_fitted() -> None:
    with pytest.raises(InsufficientDataError):
        A.fit_logistic(np.zeros((5, 1)), np.zeros(5, dtype=bool), feature_names=["a"])


def _pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y], s[~y]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_auc_rank_formula_matches_pair_counting() -> None:
    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.4
    # Coarse scores, so that there are many ties between and within the classes.
    s = np.round(rng.random(300) + 0.3 * y, 1).astype(np.float64)
    assert A.roc_auc(y, s) == pytest.approx(_pairwise_auc(y, s), abs=1e-12)


def test_auc_edge_cases() -> None:
    y = np.array([False, False, True, True])
    assert A.roc_auc(y, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert A.roc_auc(y, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert A.roc_auc(y, np.full(4, 0.5)) == 0.5
    with pytest.raises(ValueError):
        A.roc_auc(np.ones(3, dtype=bool), np.zeros(3))


def test_accuracy() -> None:
    y = np.array([True, False, True, False])
    assert A.accuracy(y, np.array([0.9, 0.2, 0.4, 0.5])) == 0.5


def test_model_learns_the_planted_signal(sample: tuple[A.Table, A.Table]) -> None:
    adv, pub = sample
    result = A.analyze(adv, pub, rng=np.random.default_rng(5))
    evaluation = result.insights["evaluation"]
    assert evaluation["test_auc"] > 0.7
    assert evaluation["test_accuracy"] > evaluation["test_positive_rate"]
    assert evaluation["n_train"] + evaluation["n_test"] == 4200

    model = result.model
    reference = result.insights["model"]["reference_levels"]

    def effect(column: str, level: str) -> float:
        return 0.0 if reference[column] == level else model.coefficient(f"{column}={level}")

    planted = {
        "segment": PLANTED_MODEL.segment,
        "age_band": PLANTED_MODEL.age_band,
        "device": PLANTED_MODEL.device,
    }
    # Coefficients depend on the reference level, differences between levels do not: every
    # clearly planted difference is learned with its sign.
    checked = 0
    for column, coefs in planted.items():
        for a, b in itertools.combinations(coefs, 2):
            if abs(coefs[a] - coefs[b]) >= 0.4:
                assert np.sign(effect(column, a) - effect(column, b)) == np.sign(
                    coefs[a] - coefs[b]
                ), (column, a, b)
                checked += 1
    assert checked >= 10
    assert model.coefficient("log_page_views_std") > 0.3


def test_split_is_random_disjoint_and_complete() -> None:
    train, test = A.split_indices(100, test_fraction=0.25, rng=np.random.default_rng(0))
    assert len(test) == 25 and len(train) == 75
    assert sorted([*train, *test]) == list(range(100))
    assert test.tolist() != list(range(75, 100))


# --- suppression -----------------------------------------------------------------------------


def test_suppression_hides_small_cells_only_when_subtraction_is_safe() -> None:
    # No small cell: nothing hidden.
    assert A.suppress_cells([10, 25, 40], k=10).tolist() == [False, False, False]
    # One small cell: its count would follow from the total, so the smallest other cell goes.
    assert A.suppress_cells([3, 25, 12], k=10).tolist() == [True, False, True]
    # Two small cells whose sum is already >= k: no complementary suppression needed.
    assert A.suppress_cells([6, 5, 40], k=10).tolist() == [True, True, False]
    # Empty cells are hidden too, but reveal nothing by subtraction (their sum is 0).
    assert A.suppress_cells([0, 25, 40], k=10).tolist() == [True, False, False]
    # All small: all hidden.
    assert A.suppress_cells([1, 2], k=10).tolist() == [True, True]


def _table(rows: list[tuple[str, str, int]]) -> A.Table:
    return A.Table(
        ids=np.array([f"id{i}".encode() for i in range(len(rows))]),
        numeric={"conversions": np.array([r[2] for r in rows], dtype=np.int64)},
        categorical={
            "segment": np.array([r[0] for r in rows]),
            "age_band": np.array([r[1] for r in rows]),
        },
    )


def test_conversion_rates_suppress_small_cells() -> None:
    rows = (
        [("news", "18-24", 1)] * 6
        + [("news", "18-24", 0)] * 14  # news: 20 users, 6 converted
        + [("tech", "18-24", 1)] * 10  # tech: 10 users, all converted
        + [("sports", "55+", 0)] * 9  # sports: 9 users: below k
        + [("finance", "55+", 1)] * 30  # finance: 30 users
    )
    cells = {c.key["segment"]: c for c in A.conversion_rates(_table(rows), by="segment", k=10)}
    assert cells["news"].users == 20 and cells["news"].converters == 6
    assert cells["news"].conversion_rate == pytest.approx(0.3)
    assert cells["news"].suppressed is False
    assert cells["sports"].suppressed and cells["sports"].users is None
    assert cells["sports"].conversion_rate is None
    # sports (9) alone could be recovered from the join size: the smallest other cell (tech,
    # exactly k) is hidden with it.
    assert cells["tech"].suppressed
    assert not cells["finance"].suppressed and not cells["news"].suppressed
    assert cells["sports"].to_json() == {
        "segment": "sports",
        "users": None,
        "converters": None,
        "conversion_rate": None,
        "suppressed": True,
    }


def test_cells_of_exactly_k_are_published() -> None:
    rows = [("a", "x", 1)] * 10 + [("b", "x", 0)] * 10
    cells = A.conversion_rates(_table(rows), by="segment", k=10)
    assert [c.suppressed for c in cells] == [False, False]
    assert [c.users for c in cells] == [10, 10]


def test_two_way_rates_list_every_combination_and_suppress() -> None:
    rows = (
        [("news", "18-24", 1)] * 12
        + [("news", "25-34", 0)] * 15
        + [("news", "55+", 0)] * 2  # small: hidden, with 18-24 (the smallest other) for cover
        + [("tech", "18-24", 0)] * 40
        + [("tech", "25-34", 1)] * 40
        + [("tech", "55+", 1)] * 20
        + [("sports", "25-34", 1)] * 5  # a segment below k: its whole row is hidden
        + [("sports", "55+", 1)] * 4
        + [("finance", "18-24", 0)] * 10  # its one-way cell covers sports': row hidden too
    )
    one_way = A.conversion_rates(_table(rows), by="segment", k=10)
    assert [c.key["segment"] for c in one_way if c.suppressed] == ["finance", "sports"]
    cells = A.conversion_rates_2way(_table(rows), rows="segment", cols="age_band", k=10)
    assert len(cells) == 4 * 3
    got = {(c.key["segment"], c.key["age_band"]): c for c in cells}
    assert got[("news", "55+")].suppressed
    assert got[("news", "18-24")].suppressed
    assert got[("news", "25-34")].users == 15
    assert all(
        got[(s, a)].suppressed for s in ("sports", "finance") for a in ("18-24", "25-34", "55+")
    )
    assert got[("tech", "55+")].users == 20 and got[("tech", "55+")].conversion_rate == 1.0
    assert not any(got[("tech", a)].suppressed for a in ("18-24", "25-34", "55+"))


def test_insights_hold_aggregates_only(sample: tuple[A.Table, A.Table]) -> None:
    adv, pub = sample
    result = A.analyze(adv, pub, k=100, rng=np.random.default_rng(8))
    text = json.dumps(result.insights)
    assert not any(uid.decode() in text for uid in adv.ids[:500].tolist())
    ins = result.insights
    assert ins["join"] == {"overlap": 4200}
    assert ins["k"] == 100
    for cell in ins["conversion_rates"]["by_segment_and_age_band"]:
        if cell["suppressed"]:
            assert cell["users"] is None and cell["conversion_rate"] is None
        else:
            assert cell["users"] >= 100
    # With k = 100 some of the 25 segment x age band cells fall below it.
    assert any(c["suppressed"] for c in ins["conversion_rates"]["by_segment_and_age_band"])
    assert len(ins["conversion_rates"]["by_segment_and_age_band"]) == 25
    assert set(ins["model"]["coefficients"]) == {
        "segment=finance",
        "segment=lifestyle",
        "segment=sports",
        "segment=tech",
        "age_band=18-24",
        "age_band=35-44",
        "age_band=45-54",
        "age_band=55+",
        "device=desktop",
        "device=tablet",
        "log_page_views_std",
    }


def test_a_join_smaller_than_k_reports_nothing() -> None:
    data = generate(30, 1, overlap=0.2)
    adv = A.read_advertiser(_dict_rows(data.advertiser.decode()))
    pub = A.read_publisher(_dict_rows(data.publisher.decode()))
    with pytest.raises(InsufficientDataError, match="fewer than 10 people"):
        A.analyze(adv, pub, rng=np.random.default_rng(0))

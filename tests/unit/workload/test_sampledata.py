"""The demo's sample data: deterministic, well-formed, with the planted signal."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
import pytest

from workload.example import sampledata
from workload.example.sampledata import (
    ADVERTISER_COLUMNS,
    AGE_BANDS,
    DEVICES,
    PUBLISHER_COLUMNS,
    SEGMENTS,
    generate,
    write_sample_data,
)

HEX64 = re.compile(r"[0-9a-f]{64}")


def _rows(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode())))


def test_same_seed_gives_the_same_bytes() -> None:
    a = generate(3000, 42)
    b = generate(3000, 42)
    assert a.advertiser == b.advertiser
    assert a.publisher == b.publisher


def test_another_seed_gives_other_data() -> None:
    a = generate(500, 1)
    b = generate(500, 2)
    assert a.advertiser != b.advertiser
    assert a.publisher != b.publisher
    # Even the ids differ: the salt comes from the seed.
    assert not {r["user_id"] for r in _rows(a.advertiser)} & {
        r["user_id"] for r in _rows(b.advertiser)
    }


def test_shape_counts_and_overlap() -> None:
    # More people than one generation chunk, so several chunks are stitched together.
    rows = 10_000
    data = generate(rows, 7)
    adv = _rows(data.advertiser)
    pub = _rows(data.publisher)
    assert data.advertiser.decode().splitlines()[0] == ",".join(ADVERTISER_COLUMNS)
    assert data.publisher.decode().splitlines()[0] == ",".join(PUBLISHER_COLUMNS)
    assert len(adv) == len(pub) == rows
    adv_ids = [r["user_id"] for r in adv]
    pub_ids = [r["user_id"] for r in pub]
    assert len(set(adv_ids)) == rows and len(set(pub_ids)) == rows
    assert all(HEX64.fullmatch(i) for i in adv_ids + pub_ids)
    assert len(set(adv_ids) & set(pub_ids)) == round(rows * 0.7) == data.counts.overlap
    # The shared people are interleaved with the others, not a block at the start.
    shared = set(adv_ids) & set(pub_ids)
    first_hundred = sum(i in shared for i in adv_ids[:100])
    assert 40 < first_hundred < 95


def test_row_relations_hold() -> None:
    data = generate(4000, 3)
    for r in _rows(data.advertiser):
        impressions, clicks, conversions = (
            int(r["impressions"]),
            int(r["clicks"]),
            int(r["conversions"]),
        )
        assert impressions >= 1
        assert 0 <= clicks <= impressions
        assert 0 <= conversions <= clicks
    for r in _rows(data.publisher):
        assert int(r["page_views"]) >= 1
        assert r["segment"] in SEGMENTS
        assert r["age_band"] in AGE_BANDS
        assert r["device"] in DEVICES


def test_conversions_follow_the_planted_model() -> None:
    data = generate(20_000, 5)
    conv = {r["user_id"]: int(r["conversions"]) > 0 for r in _rows(data.advertiser)}
    by_segment: dict[str, list[bool]] = {s: [] for s in SEGMENTS}
    for r in _rows(data.publisher):
        if r["user_id"] in conv:
            by_segment[r["segment"]].append(conv[r["user_id"]])
    rate = {s: float(np.mean(v)) for s, v in by_segment.items()}
    coef = sampledata.PLANTED_MODEL.segment
    # The rates are ordered as the planted coefficients are (they are well separated).
    assert sorted(rate, key=rate.__getitem__) == sorted(coef, key=coef.__getitem__)


@pytest.mark.parametrize("overlap", [0.0, 1.0])
def test_overlap_extremes(overlap: float) -> None:
    data = generate(300, 9, overlap=overlap)
    adv = {r["user_id"] for r in _rows(data.advertiser)}
    pub = {r["user_id"] for r in _rows(data.publisher)}
    assert len(adv & pub) == round(300 * overlap) == data.counts.overlap


@pytest.mark.parametrize(
    ("rows", "overlap"), [(0, 0.7), (-5, 0.7), (10, 1.5), (10, -0.1), (10, float("nan"))]
)
def test_bad_arguments_are_refused(rows: int, overlap: float) -> None:
    with pytest.raises(ValueError):
        generate(rows, 1, overlap=overlap)


def test_files_hold_the_same_bytes_as_memory(tmp_path: Path) -> None:
    files = write_sample_data(tmp_path / "out", rows=2500, seed=11)
    data = generate(2500, 11)
    assert files.advertiser.read_bytes() == data.advertiser
    assert files.publisher.read_bytes() == data.publisher
    assert files.counts == data.counts


def test_command_line_writes_both_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert sampledata.main(["--out", str(tmp_path), "--rows", "200", "--seed", "4"]) == 0
    assert (tmp_path / "advertiser.csv").read_bytes() == generate(200, 4).advertiser
    assert "140 people in both" in capsys.readouterr().out

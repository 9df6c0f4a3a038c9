"""The visual report: one self-contained HTML page with inline SVG charts (matplotlib, Agg).

It shows only what the insights publish: conversion by segment and by segment and age band
(suppressed cells drawn as hatched placeholders with no figure), the held-out ROC curve, and
the synthetic data's marginals next to the real ones, where a real histogram bin with fewer
than k people is suppressed too.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display in the TEE; chosen before pyplot is imported

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

# Text stays text in the SVG (smaller, searchable, readable by screen readers); fixed ids and
# no date make the same analysis give the same bytes.
plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "cleanroom", "figure.dpi": 96})
_SUPPRESSED: dict[str, Any] = {"facecolor": "#eeeeee", "edgecolor": "#999999", "hatch": "///"}


def _svg(fig: Figure) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _segment_chart(by_segment: pd.DataFrame, two_way: pd.DataFrame) -> str:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    shown = by_segment["conversion_rate"].fillna(0).astype(float)
    bars = left.bar(by_segment["segment"], shown, color="#3a7dc9")
    for bar, hidden in zip(bars, by_segment["suppressed"], strict=True):
        if hidden:
            bar.set(height=0.02, **_SUPPRESSED)
            left.annotate("suppressed", (bar.get_x() + bar.get_width() / 2, 0.03), ha="center")
    left.set(title="Conversion rate by segment", ylabel="converted share")
    grid = two_way.pivot(index="segment", columns="age_band", values="conversion_rate")
    right.imshow(grid.astype(float).to_numpy(), cmap="Blues", vmin=0, aspect="auto")
    for (i, j), value in np.ndenumerate(grid.to_numpy()):
        if pd.isna(value):
            right.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, **_SUPPRESSED))
            right.text(j, i, "suppressed", ha="center", va="center", fontsize=8)
        else:
            dark = value > 0.6 * np.nanmax(grid.to_numpy(dtype=float))
            color = "white" if dark else "black"
            right.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=9, color=color)
    right.set(xticks=range(grid.shape[1]), yticks=range(grid.shape[0]))
    right.set_xticklabels(grid.columns)
    right.set_yticklabels(grid.index)
    right.set(title="Conversion rate by segment and age band", xlabel="age band")
    return _svg(fig)


def _roc_chart(roc: pd.DataFrame, auc: float) -> str:
    fig, ax = plt.subplots(figsize=(4.5, 4.5), layout="constrained")
    ax.plot(roc["false_positive_rate"], roc["true_positive_rate"], label=f"model (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.set(title="ROC curve on the held-out rows", xlabel="false positive rate")
    ax.set(ylabel="true positive rate")
    ax.legend(loc="lower right")
    return _svg(fig)


def _marginals_chart(
    real: pd.DataFrame, synthetic: pd.DataFrame, columns: Sequence[str], *, k: int
) -> str:
    fig, axes = plt.subplots(2, (len(columns) + 1) // 2, figsize=(12, 6), layout="constrained")
    for ax, column in zip(axes.flat, columns, strict=False):
        if pd.api.types.is_numeric_dtype(real[column]):
            # Bins between the k-th smallest and k-th largest values: beyond them lie values
            # that fewer than k people hold.
            ordered = np.sort(real[column].to_numpy())
            low, high = ordered[min(k, len(ordered)) - 1], ordered[-min(k, len(ordered))]
            edges = np.unique(np.linspace(low, high + 1, 13).round())
            real_counts, _ = np.histogram(real[column].clip(low, high), edges)
            synth_counts, _ = np.histogram(synthetic[column].clip(low, high), edges)
            labels = [f"{int(a)}" for a in edges[:-1]]
        else:
            levels = sorted(set(real[column]) | set(synthetic[column]))
            real_counts = real[column].value_counts().reindex(levels, fill_value=0).to_numpy()
            synth_counts = synthetic[column].value_counts().reindex(levels, fill_value=0)
            synth_counts = synth_counts.to_numpy()
            labels = levels
        x = np.arange(len(labels))
        real_share = np.where(real_counts >= k, real_counts / real_counts.sum(), 0.0)
        ax.bar(x - 0.2, real_share, 0.4, label="real", color="#3a7dc9")
        ax.bar(x + 0.2, synth_counts / synth_counts.sum(), 0.4, label="synthetic", color="#e08a2c")
        for i in np.flatnonzero(real_counts < k):
            ax.bar(x[i] - 0.2, 0.01, 0.4, **_SUPPRESSED)
        ax.set_xticks(x, labels, rotation=45, fontsize=7)
        ax.set_title(column)
    axes.flat[0].legend()
    for ax in list(axes.flat)[len(columns) :]:
        ax.axis("off")
    fig.suptitle(f"Synthetic vs real marginals (hatched: a real bin under {k} people)")
    return _svg(fig)


def _table(frame: pd.DataFrame) -> str:
    shown = frame.astype(object).where(frame.notna(), "suppressed")
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
        for row in shown.itertuples(index=False)
    )
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    return f"<table><tr>{head}</tr>{rows}</table>"


def _fmt(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, float) else str(value)


def render(
    insights: dict[str, Any],
    *,
    by_segment: pd.DataFrame,
    two_way: pd.DataFrame,
    roc: pd.DataFrame,
    real: pd.DataFrame,
    synthetic: pd.DataFrame,
    columns: Sequence[str],
) -> str:
    """The report as one HTML document (UTF-8 text, no external resources)."""
    k = int(insights["k"])
    ev = insights["evaluation"]
    published = by_segment.drop(columns="suppressed")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Clean-room report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px}}</style>
</head><body>
<h1>Clean-room report: advertiser x publisher</h1>
<p>{insights["join"]["overlap"]:,} people in common. Every figure describes at least {k}
people; cells below that (and cells that would let one recover them) are suppressed.
The held-out AUC of the conversion model is {ev["test_auc"]:.3f} on {ev["n_test"]:,} rows.</p>
<h2>Conversion by segment</h2>{_segment_chart(by_segment, two_way)}{_table(published)}
<h2>Conversion model</h2>{_roc_chart(roc, float(ev["test_auc"]))}
<h2>Synthetic data</h2>{_marginals_chart(real, synthetic, columns, k=k)}
</body></html>
"""

"""``curate plot``: pictures of the signals, as PNG files.

- ``plane.png``: the error-uncertainty plane (response PPL vs mean token entropy, one point per example)
  coloured by quadrant around the medians: Q1 high PPL / high H (noise), Q2 high PPL / low H
  (misconception), Q3 low / low (redundant), Q4 low PPL / high H (calibration).
- ``histograms.png``: mean NLL and mean entropy per example, and the entropy of every response token.
- ``probe_roc.png``: the answer-entropy probe's ROC curve, (1 - H/max H) against first-token correctness.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from curate.stages.probe import roc_auc
from curate.store.sql import connect
from curate.store.workspace import Workspace

QUADRANT_COLOURS = {"Q1 noise": "#d62728", "Q2 misconception": "#ff7f0e", "Q3 redundant": "#7f7f7f", "Q4 calibration": "#1f77b4"}


def _one_key(con: Any, table: str, column: str, given: str | None) -> str:
    keys = [r[0] for r in con.execute(f"select distinct {column} from {table} order by 1").fetchall()]
    if given is not None:
        if given not in keys:
            raise ValueError(f"{column} {given!r} is not in {table} (it holds: {', '.join(keys) or 'none'})")
        return given
    if len(keys) != 1:
        raise ValueError(f"{table} holds {len(keys)} runs ({', '.join(keys) or 'none'}): pick one with --{column.replace('_', '-')}")
    return keys[0]


def plot(workspace: Workspace, *, score_key: str | None = None, probe_key: str | None = None, out: str | Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")

    con = connect(workspace)
    folder = Path(out) if out else workspace.root / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    tables = workspace.tables()
    written: list[Path] = []
    if "sample_scores" in tables:
        key = _one_key(con, "sample_scores", "score_key", score_key)
        samples = con.execute("select ppl, mean_nll, mean_entropy from sample_scores where score_key = ? and ppl is not null", [key]).fetchnumpy()
        written.append(_plane(samples, folder / "plane.png", key))
        tokens = con.execute("select unnest(list_where(entropy, is_response)) from token_scores where score_key = ? and variant = 'chat'",
                             [key]).fetchnumpy() if "token_scores" in tables else {}
        written.append(_histograms(samples, next(iter(tokens.values()), np.empty(0)), folder / "histograms.png", key))
    if "probe_scores" in tables:
        key = _one_key(con, "probe_scores", "probe_key", probe_key)
        probe = con.execute("select entropy_norm, is_correct from probe_scores where probe_key = ? and is_valid", [key]).fetchnumpy()
        written.append(_roc(probe, folder / "probe_roc.png", key))
    if not written:
        raise FileNotFoundError(f"{workspace.root} has no sample_scores or probe_scores to plot; run curate score or curate probe first")
    return written


def _plane(samples: dict[str, np.ndarray], path: Path, key: str) -> Path:
    import matplotlib.pyplot as plt

    ppl, entropy = samples["ppl"], samples["mean_entropy"]
    high_ppl, high_h = ppl > np.median(ppl), entropy > np.median(entropy)
    quadrant = np.where(high_ppl, np.where(high_h, "Q1 noise", "Q2 misconception"), np.where(high_h, "Q4 calibration", "Q3 redundant"))
    figure, axes = plt.subplots(figsize=(6, 5))
    for name, colour in QUADRANT_COLOURS.items():
        chosen = quadrant == name
        axes.scatter(entropy[chosen], ppl[chosen], s=10, c=colour, label=f"{name} ({int(chosen.sum())})")
    axes.axvline(np.median(entropy), color="black", lw=0.5)
    axes.axhline(np.median(ppl), color="black", lw=0.5)
    axes.set_yscale("log")
    axes.set_xlabel("mean token entropy over the response (nats)")
    axes.set_ylabel("response perplexity")
    axes.set_title(f"error-uncertainty plane, score key {key}")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _histograms(samples: dict[str, np.ndarray], token_entropy: np.ndarray, path: Path, key: str) -> Path:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for axis, values, label in ((axes[0], samples["mean_nll"], "mean NLL per example"),
                                (axes[1], samples["mean_entropy"], "mean entropy per example"),
                                (axes[2], token_entropy, "entropy per response token")):
        axis.hist(values[~np.isnan(values.astype(float))] if len(values) else values, bins=40)
        axis.set_xlabel(f"{label} (nats)")
    axes[0].set_ylabel("count")
    figure.suptitle(f"score key {key}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every threshold, highest score first."""
    order = np.argsort(-scores, kind="mergesort")
    hits = labels[order].astype(float)
    tpr = np.concatenate([[0.0], np.cumsum(hits) / max(hits.sum(), 1)])
    fpr = np.concatenate([[0.0], np.cumsum(1 - hits) / max((1 - hits).sum(), 1)])
    return fpr, tpr


def _roc(probe: dict[str, np.ndarray], path: Path, key: str) -> Path:
    import matplotlib.pyplot as plt

    confidence = 1.0 - probe["entropy_norm"].astype(float)
    correct = probe["is_correct"].astype(bool)
    fpr, tpr = roc_points(confidence, correct)
    auc = roc_auc(confidence, correct)
    figure, axes = plt.subplots(figsize=(5, 5))
    axes.plot(fpr, tpr, label=f"1 - H/max H (AUC {auc:.3f})" if auc is not None else "AUC n/a")
    axes.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title(f"answer-entropy probe: {int(correct.sum())} of {len(correct)} correct", fontsize=10)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path

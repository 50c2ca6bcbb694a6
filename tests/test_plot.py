"""curate plot writes the three pictures from the workspace tables; the ROC points are right."""

from __future__ import annotations

import numpy as np
import pytest

from curate.looks.plot import plot, roc_points
from curate.store.workspace import Workspace
from test_recipes import examples, put, samples


def test_roc_points_walk_from_corner_to_corner() -> None:
    fpr, tpr = roc_points(np.array([0.9, 0.8, 0.3, 0.1]), np.array([True, False, True, False]))
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]


def test_plot_writes_the_pictures(workspace: Workspace) -> None:
    names = [f"e{i:02d}" for i in range(40)]
    examples(workspace, names)
    rng = np.random.default_rng(0)
    samples(workspace, [(n, float(rng.uniform(0.5, 2)), float(rng.uniform(0.5, 2)), 50) for n in names])
    put(workspace, "probe_scores", [{"example_id": n, "probe_key": "p", "entropy_norm": float(rng.uniform()), "is_valid": True,
                                     "is_correct": bool(rng.uniform() < 0.4)} for n in names])
    written = plot(workspace)
    assert [p.name for p in written] == ["plane.png", "histograms.png", "probe_roc.png"]
    assert all(p.stat().st_size > 5000 for p in written)
    samples(workspace, [(n, 1.0, 1.0, 50) for n in names], key="other")
    with pytest.raises(ValueError, match="holds 2 runs"):
        plot(workspace)

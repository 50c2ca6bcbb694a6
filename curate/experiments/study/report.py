"""A study's report: ``report.md`` (a table per arm with its spread) and ``study.png``.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from curate.experiments.study.spec import TOLERANCE, StudySpec


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def render_report(spec: StudySpec, results: list[dict], base: dict, budget: int, full_tokens: int) -> str:
    """report.md: per arm the mean ± std over seeds, the paired difference to random, and how it was fitted."""
    random_by_seed = {r["seed"]: r["heldout_nll"] for r in results if r["arm"] == "random" and r.get("heldout_nll") is not None}
    lines = [f"# Study {spec.name}", "",
             f"Model `{spec.model}`; pool `{spec.pool}` ({full_tokens:,} trained response tokens in full); held-out "
             f"`{spec.heldout}`{f' (first {spec.heldout_limit})' if spec.heldout_limit else ''}; budget {budget:,} tokens "
             f"({budget / full_tokens:.1%} of the pool), each arm within ±{TOLERANCE:.0%}; seeds {spec.seeds}. Lower held-out "
             "NLL is better.", "",
             "| arm | seeds | rows | trained tokens | held-out NLL (mean ± std) | accuracy | Δ NLL vs random (paired) | seeds better than random |",
             "|---|---|---|---|---|---|---|---|"]
    for arm in [*spec.arm_names]:
        rows = [r for r in results if r["arm"] == arm]
        done = [r for r in rows if r.get("heldout_nll") is not None]
        if not done:
            lines.append(f"| {arm} | {len(rows)} | {rows[0]['rows'] if rows else 0:,} | {rows[0]['trained_tokens'] if rows else 0:,} | "
                         f"not compared: {rows[0]['status'] if rows else 'no runs'} | | | |")
            continue
        nll = [r["heldout_nll"] for r in done]
        accuracy = [r["accuracy"] for r in done if r.get("accuracy") is not None]
        paired = [r["heldout_nll"] - random_by_seed[r["seed"]] for r in done if r["seed"] in random_by_seed and arm not in ("random", "full")]
        better = f"{sum(d < 0 for d in paired)} of {len(paired)}" if paired else ""
        tokens = "/".join(sorted({f"{r['trained_tokens']:,}" for r in done}))
        lines.append(f"| {arm} | {len(done)} | {'/'.join(sorted({str(r['rows']) for r in done}))} | {tokens} | {mean_std(nll)} | "
                     f"{mean_std(accuracy) if accuracy else ''} | {mean_std(paired) if paired else ''} | {better} |")
    base_accuracy = "" if base.get("accuracy") is None else f"{base['accuracy']:.4f}"
    lines.append(f"| base (no training) | | | | {base['heldout_nll']:.4f} | {base_accuracy} | | |")
    lines += ["", "How each arm was brought to the budget:", ""]
    for arm in spec.arm_names:
        hows = sorted({r["fit"] for r in results if r["arm"] == arm})
        lines += [f"- `{arm}`: {how}" for how in hows]
    return "\n".join(lines) + "\n"


def plot_study(spec: StudySpec, results: list[dict], base: dict, budget: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in spec.arm_names if any(r["arm"] == a and r.get("heldout_nll") is not None for r in results)]
    figure, axes = plt.subplots(figsize=(1.4 * max(len(arms), 3) + 2, 4))
    for x, arm in enumerate(arms):
        values = [r["heldout_nll"] for r in results if r["arm"] == arm and r.get("heldout_nll") is not None]
        axes.scatter([x] * len(values), values, color="#1f77b4", s=18, zorder=3)
        mean = statistics.mean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        axes.errorbar([x + 0.15], [mean], yerr=[spread], fmt="o", color="black", capsize=4, zorder=4)
    axes.axhline(base["heldout_nll"], color="grey", ls="--", lw=1, label="base model, no training")
    axes.set_xticks(range(len(arms)), arms, rotation=20)
    axes.set_ylabel("held-out mean answer NLL (lower is better)")
    axes.set_title(f"{Path(spec.model).name}: budget {budget:,} response tokens; seeds as dots, mean ± std in black", fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

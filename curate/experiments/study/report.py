"""A study's report: ``report.md`` (a table per arm with its spread, the paired statistics over held-out
examples, the planted canaries per arm), ``canaries.md`` (the canaries alone) and ``study.png``.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from curate.experiments.study.plant import KINDS, Canaries
from curate.experiments.study.spec import TOLERANCE, StudySpec
from curate.experiments.study.stats import POWER_FACTOR, RESAMPLES, Paired


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def render_report(spec: StudySpec, results: list[dict], base: dict, budget: int, full_tokens: int, *, paired: list[Paired],
                  canaries: list[Canaries]) -> str:
    """report.md: per arm the mean ± std over seeds, the paired difference to random per seed, the paired
    statistics over held-out examples, the canaries, and how each arm was fitted."""
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
        per_seed = [r["heldout_nll"] - random_by_seed[r["seed"]] for r in done if r["seed"] in random_by_seed and arm not in ("random", "full")]
        better = f"{sum(d < 0 for d in per_seed)} of {len(per_seed)}" if per_seed else ""
        tokens = "/".join(sorted({f"{r['trained_tokens']:,}" for r in done}))
        lines.append(f"| {arm} | {len(done)} | {'/'.join(sorted({str(r['rows']) for r in done}))} | {tokens} | {mean_std(nll)} | "
                     f"{mean_std(accuracy) if accuracy else ''} | {mean_std(per_seed) if per_seed else ''} | {better} |")
    base_accuracy = "" if base.get("accuracy") is None else f"{base['accuracy']:.4f}"
    lines.append(f"| base (no training) | | | | {base['heldout_nll']:.4f} | {base_accuracy} | | |")
    lines += ["", *render_paired(paired), "", *canary_lines(canaries), "", "How each arm was brought to the budget:", ""]
    for arm in spec.arm_names:
        hows = sorted({r["fit"] for r in results if r["arm"] == arm})
        lines += [f"- `{arm}`: {how}" for how in hows]
    return "\n".join(lines) + "\n"


def render_paired(paired: list[Paired]) -> list[str]:
    """The paired comparisons over held-out examples, one line per arm and reference (stats.py says how)."""
    if not paired:
        return ["No paired comparison: no arm and reference were both evaluated per example."]
    lines = [f"Paired over held-out examples (per example: the arm's NLL minus the reference's, each averaged over its seeds; "
             f"95% percentile bootstrap over examples and a two-sided sign-flip test, {RESAMPLES:,} draws each, seeded; "
             f"detectable = {POWER_FACTOR} x the paired standard error, 80% power at alpha 0.05; negative is better):", "",
             "| arm | vs | examples | Δ held-out NLL | 95% interval | p | detectable at this size | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for p in paired:
        lines.append(f"| {p.arm} | {p.reference} | {p.examples} | {p.difference:+.4f} | [{p.low:+.4f}, {p.high:+.4f}] | "
                     f"{p.p_value:.4f} | {p.detectable:.4f} | {p.verdict} |")
    return lines


def canary_lines(canaries: list[Canaries]) -> list[str]:
    """Per arm the planted share of its selected rows and of its trained tokens, by kind, beside the pool's."""
    if len(canaries) < 1 or not any(c.planted_rows for c in canaries):
        return ["Planted canaries: none (the spec has no [plant] section)."]
    pool = canaries[0]
    kinds = [k for k in KINDS if k in pool.planted_rows]
    lines = ["Planted canaries: the share of each selection's rows and of its trained tokens that are planted, per kind "
             "(rows / tokens); `x pool` is the planted token share against the pool's (below 1: the arm keeps them out "
             "more than a random draw would). An arm over several seeds is pooled over its selections.", "",
             "| selection | rows | planted rows | trained tokens | planted tokens | x pool | " + " | ".join(kinds) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(kinds)]
    for c in canaries:
        ratio = f"{c.token_share / pool.token_share:.2f}" if pool.token_share else ""
        cells = [f"{c.planted_rows.get(k, 0) / c.rows:.1%} / {c.planted_tokens.get(k, 0) / c.tokens:.1%}" if c.rows and c.tokens else ""
                 for k in kinds]
        name = c.name if c.selections == 1 else f"{c.name} ({c.selections} selections)"
        lines.append(f"| {name} | {c.rows:,} | {sum(c.planted_rows.values()):,} ({c.row_share:.1%}) | {c.tokens:,} | "
                     f"{sum(c.planted_tokens.values()):,} ({c.token_share:.1%}) | {ratio} | " + " | ".join(cells) + " |")
    return lines


def render_canaries(spec: StudySpec, canaries: list[Canaries], budget: int) -> str:
    """canaries.md: what ``--no-train`` ends on (and what report.md repeats)."""
    return "\n".join([f"# Study {spec.name}: planted canaries in the selections", "",
                      f"Model `{spec.model}`; pool `{spec.pool}`; budget {budget:,} trained tokens per arm; plant "
                      f"{spec.plant or 'none'}.", "", *canary_lines(canaries)]) + "\n"


def plot_study(spec: StudySpec, results: list[dict], base: dict, budget: int, path: Path, *, paired: list[Paired]) -> Path:
    """Held-out NLL per arm (seeds as dots, mean ± std), and beside it each arm's paired difference to random
    with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in spec.arm_names if any(r["arm"] == a and r.get("heldout_nll") is not None for r in results)]
    against = [p for p in paired if p.reference == "random"]
    figure, (axes, right) = plt.subplots(1, 2, figsize=(2.4 * max(len(arms), 3) + 3, 4))
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
    for y, p in enumerate(against):
        colour = {"better": "#2ca02c", "worse": "#d62728"}.get(p.verdict, "#7f7f7f")
        right.errorbar([p.difference], [y], xerr=[[p.difference - p.low], [p.high - p.difference]], fmt="o", color=colour, capsize=4)
    right.axvline(0.0, color="grey", ls="--", lw=1)
    right.set_yticks(range(len(against)), [p.arm for p in against])
    right.set_xlabel("Δ held-out NLL vs random, 95% interval (left of 0: better)")
    right.set_title("paired over held-out examples; green better, red worse, grey no detectable difference", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

"""Bringing an arm to the study's budget, counted as the trainer counts trained tokens (masks included), within
the tolerance: bisection on the recipe's size knob, then a seeded random trim of what is still over.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from curate.experiments.study.prepare import resolve_model
from curate.experiments.study.spec import TOLERANCE, Arm
from curate.stages.recipes import load_recipe
from curate.stages.select import choose
from curate.store.workspace import Workspace
from train.data import load_examples
from train.sft import load_tokenizer


@dataclass
class Fitted:
    arm: str
    seed: int | None  # the seed its rows depend on (random draws, trims), or None
    status: str  # "fitted" or "cannot_meet_budget"
    rows: int
    trained_tokens: int
    how: str  # how the arm was brought to the budget, in words
    params: dict[str, str] = field(default_factory=dict)
    keep: list[str] | None = None


class TokenCounter:
    """Trained tokens of a selection's rows, counted by the trainer's own loader (masks, max length)."""

    def __init__(self, model: str, max_len: int) -> None:
        self.tokenizer = load_tokenizer(resolve_model(model))
        self.max_len = max_len

    def per_row(self, table) -> dict[str, int]:
        if table.num_rows == 0:
            return {}
        examples, _ = load_examples(table, self.tokenizer, max_len=self.max_len, source="study")
        return {e.example_id: e.n_targets for e in examples}


def seeded_order(ids: list[str], seed: int) -> list[str]:
    return sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())


def trim(counts: dict[str, int], budget: int, seed: int) -> tuple[list[str], int]:
    """A seeded random subset of rows whose trained tokens come closest to the budget (a prefix of a random
    order, with or without the row that crosses the budget)."""
    kept, total = [], 0
    for example in seeded_order(list(counts), seed):
        if total + counts[example] > budget:
            if abs(total + counts[example] - budget) < abs(total - budget):
                kept.append(example)
                total += counts[example]
            break
        kept.append(example)
        total += counts[example]
    return kept, total


def within(tokens: int, budget: int) -> bool:
    return abs(tokens - budget) <= TOLERANCE * budget


def fit_arm(workspace: Workspace, arm: Arm, params: dict[str, str], budget: int, pool_ids: list[str], counter: TokenCounter,
            seed: int) -> Fitted:
    """Bring one arm to the budget (see the module docstring)."""

    recipe = load_recipe(arm.recipe or "full")

    def counts(values: dict[str, str]) -> dict[str, int]:
        return counter.per_row(choose(workspace, recipe, values, keep=pool_ids))

    if arm.name == "random":
        kept, total = trim(counts(params), budget, seed)
        return Fitted(arm.name, seed, "fitted", len(kept), total, f"a random subset of the pool (seed {seed})", params, kept)
    how, values = "the recipe as it is", dict(params)
    rows = counts(values)
    if arm.fit:
        knob, low, high = arm.fit["param"], float(arm.fit.get("low", 0.0)), float(arm.fit.get("high", 1.0))
        top = counts({**params, knob: str(high)})
        if sum(top.values()) < budget * (1 - TOLERANCE):
            return Fitted(arm.name, None, "cannot_meet_budget", len(top), sum(top.values()),
                          f"{knob}={high:g} (its largest) trains only {sum(top.values()):,} tokens", {**params, knob: str(high)})
        rows, values = top, {**params, knob: str(high)}
        for _ in range(24):  # the smallest knob value that reaches the budget
            middle = (low + high) / 2
            trial = counts({**params, knob: f"{middle:.6g}"})
            if sum(trial.values()) >= budget * (1 - TOLERANCE):
                high, rows, values = middle, trial, {**params, knob: f"{middle:.6g}"}
            else:
                low = middle
            if within(sum(rows.values()), budget) or high - low < 1e-4:
                break
        how = f"{knob}={values[knob]} by bisection"
    total = sum(rows.values())
    if total < budget * (1 - TOLERANCE):
        return Fitted(arm.name, None, "cannot_meet_budget", len(rows), total, f"{how}: only {total:,} tokens", values)
    if within(total, budget):
        return Fitted(arm.name, None, "fitted", len(rows), total, how, values, sorted(rows))
    kept, kept_total = trim(rows, budget, seed)
    return Fitted(arm.name, seed, "fitted", len(kept), kept_total,
                  f"{how} ({total:,} tokens), then a random subset of its rows (seed {seed})", values, kept)

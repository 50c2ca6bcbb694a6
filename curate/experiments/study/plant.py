"""Planted canaries: known-bad copies of pool rows, added to one study's pool, so a report can say whether a
selection keeps them out.

A spec's ``[plant]`` section gives each kind's share of the planted pool and a seed::

    [plant]
    seed = 0
    swapped = 0.08         # the reply taken from another pool example
    answer_changed = 0.08  # the final answer (the reply's last number) changed, the reasoning kept
    shuffled = 0.05        # the reply's words in a random order
    truncated = 0.05       # the reply cut off between 30% and 70% of its words

Planted rows are examples of their own source, ``plant:<study name>``, in the pool split, with
``meta.planted = {kind, original, study, seed}`` and the original's reference answer. A study's pool is
``(its pool predicate, without any planted source) or source = 'plant:<its name>'`` and its held-out set
never holds a planted row (``study_predicates``): a study never sees another study's canaries, whatever its
predicates say.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Any, Callable

from curate.stages.records import example_id
from curate.store import schema
from curate.store.examples import example_predicate
from curate.store.sql import connect
from curate.store.workspace import Workspace, rows_to_table

PREFIX = "plant:"
NOT_PLANTED = f"not starts_with(coalesce(source, ''), '{PREFIX}')"
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


@dataclass(frozen=True)
class PlantSettings:
    shares: dict[str, float]  # kind -> its share of the planted pool
    seed: int = 0

    @property
    def total(self) -> float:
        return sum(self.shares.values())


def _reply(messages: list[dict[str, str]]) -> int | None:
    """The index of the last assistant message (the reply a kind spoils), or None."""
    return next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "assistant"), None)


def _answer_changed(text: str, rng: random.Random, _: list[str]) -> str | None:
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    digits = last.group().replace(",", "")
    value = float(digits) if "." in digits else int(digits)
    changed = value + rng.choice([-1, 1]) * rng.randint(1, 9) * (1 if abs(value) < 20 else max(1, int(abs(value)) // 10))
    new = f"{changed:.{len(digits.split('.')[1])}f}" if isinstance(value, float) else str(changed)
    return text[: last.start()] + new + text[last.end():]


def _shuffled(text: str, rng: random.Random, _: list[str]) -> str | None:
    words = text.split()
    if len(set(words)) < 2:
        return None
    for _attempt in range(10):
        order = words[:]
        rng.shuffle(order)
        if order != words:
            return " ".join(order)
    return None


def _truncated(text: str, rng: random.Random, _: list[str]) -> str | None:
    words = list(re.finditer(r"\S+", text))
    if len(words) < 4:
        return None
    cut = max(1, int(len(words) * rng.uniform(0.3, 0.7)))
    return text[: words[cut - 1].end()]  # cut after a word, the text before it as it was (line breaks kept)


def _swapped(text: str, rng: random.Random, replies: list[str]) -> str | None:
    others = [r for r in replies if r.strip() != text.strip()]
    return rng.choice(others) if others else None


KINDS: dict[str, Callable[[str, random.Random, list[str]], str | None]] = {
    "swapped": _swapped, "answer_changed": _answer_changed, "shuffled": _shuffled, "truncated": _truncated}


def plant_settings(raw: Any, *, where: str) -> PlantSettings | None:
    """``[plant]`` of a spec, checked: known kinds, shares in (0, 1) summing below 0.9, an integer seed."""
    if raw is None or raw == {}:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: [plant] is a table of kind = share (and seed), e.g. swapped = 0.1")
    values = dict(raw)
    seed = values.pop("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"{where}: plant.seed must be an integer, got {seed!r}")
    unknown = sorted(set(values) - set(KINDS))
    if unknown:
        raise ValueError(f"{where}: unknown plant kind(s) {unknown}; kinds: {', '.join(KINDS)} (and seed)")
    for kind, share in values.items():
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
            raise ValueError(f"{where}: plant.{kind} = {share!r}: give its share of the planted pool, a number in (0, 1)")
    if not values:
        raise ValueError(f"{where}: [plant] names no kind; kinds: {', '.join(KINDS)}")
    if sum(values.values()) >= 0.9:
        raise ValueError(f"{where}: the plant shares sum to {sum(values.values()):.2f}; keep them below 0.9 of the pool")
    return PlantSettings({k: float(values[k]) for k in KINDS if k in values}, seed)


def study_predicates(workspace: Workspace, *, name: str, pool: str, heldout: str, planted: bool) -> tuple[str, str]:
    """(pool, held-out) predicates of a study, enforced: no planted source in either, but the study's own
    planted rows in its pool when it plants."""
    clean_pool = f"({example_predicate(workspace, pool, option='pool')}) and {NOT_PLANTED}"
    own = f"({clean_pool}) or source = '{PREFIX}{name}'" if planted else clean_pool
    return own, f"({example_predicate(workspace, heldout, option='heldout')}) and {NOT_PLANTED}"


def plant(workspace: Workspace, *, name: str, pool: str, settings: PlantSettings) -> dict[str, str]:
    """Add the planted rows of study ``name`` (once: a re-run finds them); returns planted id -> kind.

    ``pool`` is the clean pool's predicate (``study_predicates``). The caller holds the writer lock."""
    source = f"{PREFIX}{name}"
    con = connect(workspace)
    clean = con.execute(f"select example_id, messages, reference_answer from examples where {pool} and {NOT_PLANTED} "
                        "order by example_id").fetchall()
    # ids taken by other examples (this study's own planted rows of an earlier run excluded: they are what a re-run makes again)
    existing_ids = {r[0] for r in con.execute("select example_id from examples where source is distinct from ?", [source]).fetchall()}
    rows = _planted_rows(clean, existing_ids, name=name, source=source, settings=settings)
    already = planted_kinds(workspace, name=name)
    wanted = {r["example_id"]: json.loads(r["meta"])["planted"]["kind"] for r in rows}
    if already and already != wanted:
        raise ValueError(f"{workspace.root} already holds {len(already)} planted rows of study {name!r} made from another pool or "
                         f"[plant] settings (these settings plant {len(wanted)} other rows); give the study another name, or "
                         "use a new workspace")
    if not already:
        workspace.write_part("examples", rows_to_table(rows, schema.EXAMPLES), schema=schema.EXAMPLES)
    return wanted


def _planted_rows(clean: list[tuple], existing_ids: set[str], *, name: str, source: str, settings: PlantSettings) -> list[dict]:
    """The planted copies: per kind, the first originals in a seeded order that the kind can spoil."""
    if not clean:
        raise ValueError(f"study {name!r}: its pool is empty, so there is nothing to plant from")
    order = sorted(clean, key=lambda r: hashlib.sha256(f"{settings.seed}:{r[0]}".encode()).hexdigest())
    replies = [r[1][_reply(r[1])]["content"] for r in clean if _reply(r[1]) is not None]
    scale = len(clean) / (1 - settings.total)  # the planted pool's size: kind shares are of it
    used, rows, taken = set(existing_ids), [], set()
    for kind, share in settings.shares.items():
        wanted = round(share * scale)
        made = 0
        for original, messages, reference in order:
            if made == wanted:
                break
            index = _reply(messages)
            if original in taken or index is None:
                continue
            rng = random.Random(f"{settings.seed}:{kind}:{original}")
            spoiled = KINDS[kind](messages[index]["content"], rng, replies)
            if spoiled is None:
                continue
            changed = [dict(m) for m in messages]
            changed[index]["content"] = spoiled
            identifier = example_id(changed)
            if identifier in used:
                continue
            used.add(identifier)
            taken.add(original)
            made += 1
            meta = {"planted": {"kind": kind, "original": original, "study": name, "seed": settings.seed}}
            rows.append({"example_id": identifier, "source": source, "split": "pool", "messages": changed,
                         "reference_answer": reference, "meta": json.dumps(meta, sort_keys=True)})
        if made < wanted:
            raise ValueError(f"study {name!r}: plant.{kind} = {share} needs {wanted} rows but only {made} pool rows could be "
                             f"spoiled that way (each original is planted once); lower the shares or widen the pool")
    return rows


def planted_kinds(workspace: Workspace, *, name: str) -> dict[str, str]:
    """planted id -> kind of study ``name`` (empty when it planted nothing)."""
    rows = connect(workspace).execute("select example_id, meta from examples where source = ?", [f"{PREFIX}{name}"]).fetchall()
    return {i: json.loads(m)["planted"]["kind"] for i, m in rows}


@dataclass(frozen=True)
class Canaries:
    """How many of a selection's rows and trained tokens are planted, per kind."""

    name: str
    rows: int
    tokens: int
    planted_rows: dict[str, int]  # kind -> rows
    planted_tokens: dict[str, int]  # kind -> trained tokens
    selections: int = 1  # pooled over this many selections (an arm's seeds)

    @property
    def row_share(self) -> float:
        return sum(self.planted_rows.values()) / self.rows if self.rows else 0.0

    @property
    def token_share(self) -> float:
        return sum(self.planted_tokens.values()) / self.tokens if self.tokens else 0.0

    @classmethod
    def pooled(cls, name: str, counts: list["Canaries"]) -> "Canaries":
        kinds = sorted({k for c in counts for k in c.planted_rows})
        return cls(name, sum(c.rows for c in counts), sum(c.tokens for c in counts),
                   {k: sum(c.planted_rows.get(k, 0) for c in counts) for k in kinds},
                   {k: sum(c.planted_tokens.get(k, 0) for c in counts) for k in kinds}, sum(c.selections for c in counts))


def count_canaries(name: str, ids: list[str], tokens: dict[str, int], planted: dict[str, str]) -> Canaries:
    """A selection's canaries: ``ids`` its rows (a row per stage counts once per stage), ``tokens`` the trained
    tokens per id as the trainer's loader counts them (TokenCounter.per_row), ``planted`` id -> kind."""
    rows: dict[str, int] = {}
    trained: dict[str, int] = {}
    for identifier in ids:
        kind = planted.get(identifier)
        if kind is not None:
            rows[kind] = rows.get(kind, 0) + 1
    for identifier, count in tokens.items():  # per id, as the budget counts them
        kind = planted.get(identifier)
        if kind is not None:
            trained[kind] = trained.get(kind, 0) + count
    return Canaries(name, len(ids), sum(tokens.values()), rows, trained)

"""``curate show EXAMPLE_ID``: one example's conversation, every token coloured by a signal (entropy, NLL or
KL), the tokens a selection's mask leaves out struck through, and the example's sample scores and quadrant.

Colour and layout are ``rich``'s. When the output is not a terminal the same text comes out plain, with the
masked tokens between ``⟦`` and ``⟧`` and each token's value available with ``--values``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from curate.models import registry
from curate.store import run_refs
from curate.store.sql import connect
from curate.store.workspace import Workspace

SIGNALS = ("entropy", "nll", "kl")
# a sequential scale, low to high (colour-blind safe: viridis sampled at 6 points)
SCALE = ("#440154", "#414487", "#2a788e", "#22a884", "#7ad151", "#fde725")
MASK_OPEN, MASK_CLOSE = "⟦", "⟧"


@dataclass
class Shown:
    """What ``show`` renders: tokens with their values and marks, and the example's numbers."""

    example_id: str
    signal: str
    key: str
    model: str
    tokens: list[str]
    values: list[float | None]
    message_index: list[int]
    roles: list[str | None]
    is_response: list[bool]
    masked: list[bool]  # excluded from training by the selection's mask
    sample: dict[str, Any]
    quadrant: str | None
    selection: str | None
    note: str | None = None

    @property
    def scale_max(self) -> float:
        values = [v for v, r in zip(self.values, self.is_response) if v is not None and r] or [v for v in self.values if v is not None]
        return max(values, default=1.0) or 1.0


def gather(workspace: Workspace, example_id: str, *, signal: str = "entropy", selection: str | None = None,
           run: str | None = None) -> Shown:
    """Everything ``show`` renders for one example (the scoring run: ``run``, a key or a model, else the only one)."""

    if signal not in SIGNALS:
        raise ValueError(f"unknown signal {signal!r}; choose one of {', '.join(SIGNALS)}")
    con = connect(workspace)
    if "token_scores" not in workspace.tables():
        raise FileNotFoundError(f"{workspace.root} has no token_scores; run curate score first")
    keys = [k for (k,) in con.execute("select distinct score_key from token_scores where example_id = ? and variant = 'chat'",
                                      [example_id]).fetchall()]
    if not keys:
        known = con.execute("select count(*) from examples where example_id = ?", [example_id]).fetchall()[0][0]
        raise LookupError(f"example {example_id} " + ("has no token scores; score it with curate score" if known
                                                       else f"is not in {workspace.root} (curate sql 'select example_id from examples')"))
    if run is not None:
        key = run_refs.resolve(workspace, "score_run", run, parameter="--run")
    elif len(keys) == 1:
        key = keys[0]
    else:
        raise LookupError(f"example {example_id} is scored under {len(keys)} runs ({', '.join(keys)}): pick one with --run")
    row = con.execute("select * from token_scores where example_id = ? and score_key = ? and variant = 'chat'",
                      [example_id, key]).fetchone()
    columns = [d[0] for d in con.description]
    tokens = dict(zip(columns, row))
    values = _values(con, tokens, signal, example_id, key, workspace)
    masked, note = _mask(workspace, con, selection, example_id, tokens)
    sample = con.execute("select * from sample_scores where example_id = ? and score_key = ?", [example_id, key]).fetchone()
    sample_columns = [d[0] for d in con.description]
    sample_row = dict(zip(sample_columns, sample)) if sample else {}
    return Shown(example_id, signal, key, tokens["model"], _texts(tokens), values, tokens["message_index"], tokens["role"],
                 tokens["is_response"], masked, sample_row, _quadrant(con, key, sample_row), selection, note)


def _values(con, tokens: dict, signal: str, example_id: str, key: str, workspace: Workspace) -> list[float | None]:
    if signal == "entropy":
        return list(tokens["entropy"])
    if signal == "nll":
        return [None if v is None else -v for v in tokens["logprob"]]
    if "pair_scores" not in workspace.tables():
        raise FileNotFoundError("--signal kl needs pair scores (curate score --pair BASE CALIBRATED)")
    found = con.execute("select kl from pair_scores where example_id = ? and base_key = ?", [example_id, key]).fetchall()
    if not found:
        raise LookupError(f"no pair scores for example {example_id} with base run {key}: score it with curate score --pair")
    return list(found[0][0])


def _mask(workspace: Workspace, con, selection: str | None, example_id: str, tokens: dict) -> tuple[list[bool], str | None]:
    """The response tokens a selection's mask excludes (or none: no selection, or no mask for this example)."""
    nothing = [False] * len(tokens["token_ids"])
    if selection is None:
        return nothing, None
    table = f"selections_{selection}"
    if table not in workspace.tables():
        raise FileNotFoundError(f"no selection {selection!r} in {workspace.root}")
    found = con.execute(f'select * from "{table}" where example_id = ?', [example_id]).fetchone()
    if found is None:
        return nothing, f"example {example_id} is not in selection {selection}"
    row = dict(zip([d[0] for d in con.description], found))
    if row.get("loss_mask") is None:
        return nothing, f"selection {selection} trains this example whole (no token mask)"
    if list(row.get("input_ids") or []) != list(tokens["token_ids"]):
        return nothing, f"selection {selection} trains this example on other tokens (a replaced reply): no mask to show"
    return [bool(r) and not m for r, m in zip(tokens["is_response"], row["loss_mask"])], None


def _texts(tokens: dict) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(registry.resolve(tokens["model"]))
    return [tokenizer.decode([t]) for t in tokens["token_ids"]]


def _quadrant(con, key: str, sample: dict) -> str | None:
    """Where the example lies on the error-uncertainty plane, around the run's medians (as curate plot)."""
    if not sample or sample.get("ppl") is None:
        return None
    ppl, entropy = con.execute("select median(ppl), median(mean_entropy) from sample_scores where score_key = ?", [key]).fetchone()
    high_ppl, high_h = sample["ppl"] > ppl, sample["mean_entropy"] > entropy
    return {(True, True): "Q1 noise", (True, False): "Q2 misconception", (False, True): "Q4 calibration",
            (False, False): "Q3 redundant"}[(high_ppl, high_h)]


def colour(value: float | None, top: float) -> str | None:
    if value is None:
        return None
    bucket = min(int(len(SCALE) * max(value, 0.0) / top), len(SCALE) - 1) if top > 0 else 0
    return SCALE[bucket]


def render(shown: Shown, *, console: Any, values: bool = False) -> None:
    """Print it: a header with the sample scores and quadrant, the legend, then the conversation by message."""
    from rich.text import Text

    top = shown.scale_max
    unit = {"entropy": "nats", "nll": "nats", "kl": "nats"}[shown.signal]
    console.print(f"example {shown.example_id}   score run {shown.key} ({shown.model})   signal: {shown.signal}", style="bold")
    sample = shown.sample
    if sample:
        ifd = f", IFD {sample['ifd']:.3f}" if sample.get("ifd") is not None else ""
        console.print(f"mean NLL {sample['mean_nll']:.3f}, PPL {sample['ppl']:.2f}, mean entropy {sample['mean_entropy']:.3f} "
                      f"over {sample['n_response_tokens']} response tokens{ifd}; quadrant {shown.quadrant}")
    if shown.selection:
        count = sum(shown.masked)
        console.print(f"selection {shown.selection}: " + (shown.note or f"{count} response token(s) masked out, shown struck through "
                                                                        "(between double brackets in plain text)"))
    legend = Text("scale: ")
    for i, shade in enumerate(SCALE):
        low, high = top * i / len(SCALE), top * (i + 1) / len(SCALE)
        legend.append(f" {low:.2f}-{high:.2f} ", style=f"on {shade}" + (" black" if i >= 3 else " white"))
    legend.append(f" {unit}; response tokens underlined")
    console.print(legend)
    current = None
    line = Text()
    for index, text in enumerate(shown.tokens):
        message = shown.message_index[index]
        if message != current:
            if line:
                console.print(line)
            role = shown.roles[index] or "template"
            console.print(Text(f"── message {message} ({role}) ──", style="dim"))
            line, current = Text(), message
        value = shown.values[index]
        shade = colour(value, top)
        style = (f"on {shade} " + ("black" if SCALE.index(shade) >= 3 else "white")) if shade else ""
        if shown.is_response[index]:
            style += " underline"
        shown_text = text + (f"({value:.2f})" if values and value is not None else "")
        if shown.masked[index]:
            line.append(MASK_OPEN + shown_text + MASK_CLOSE, style=style + " strike dim")
        else:
            line.append(shown_text, style=style.strip())
    if line:
        console.print(line)


def show(workspace: Workspace, example_id: str, *, signal: str = "entropy", selection: str | None = None, run: str | None = None,
         values: bool = False, console: Any = None) -> Shown:
    from rich.console import Console

    shown = gather(workspace, example_id, signal=signal, selection=selection, run=run)
    render(shown, console=console or Console(highlight=False, soft_wrap=True), values=values)
    return shown


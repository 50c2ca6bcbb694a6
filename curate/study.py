"""``curate study SPEC``: an equal-budget comparison of selection methods, run and reported with its spread.

The spec (TOML or YAML) names a model, a pool and a held-out set (SQL predicates on ``examples``), a budget
(a share of the full pool's response tokens, or a token count), the arms, the seeds, and the training and
evaluation settings. The study:

1. prepares what the arms' recipes read, each step resumable by its run key: the pool scored under the
   model (``score``), a calibrated model trained on a warm-up slice of the pool and the pair scores
   (``calibrate``), the answer-entropy probe (``probe``) and teacher traces for the probe's hard examples
   (``traces``);
2. brings every arm but ``full`` to the budget, counted as the trainer counts trained tokens (token masks
   included), within ±2%: a recipe with a size knob (``fit = {param, low, high}``) is searched on it by
   bisection, and what is still over is trimmed by a seeded random subset of its rows (``trim``); ``random``
   is a seeded random subset of the pool. An arm that cannot reach the budget is reported as such, and not
   trained or compared;
3. trains each arm x seed with the ``train`` package (two stages where a selection has a ``stage`` column),
   evaluates on the held-out set (mean answer NLL, teacher-forced; exact-match accuracy when asked), and
   writes ``studies/NAME/results.parquet``, ``report.md`` and ``study.png``. A killed study, re-run, redoes
   only the arm x seed runs that have no result.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from curate.workspace import Workspace

TOLERANCE = 0.02
BUILTIN_ARMS = ("full", "random")
RESULTS_FILE = "results.parquet"


# ---- the spec -----------------------------------------------------------------------------------------------


@dataclass
class Arm:
    name: str
    recipe: str | None = None  # full and random need none
    params: dict[str, str] = field(default_factory=dict)
    fit: dict[str, Any] | None = None  # {"param": "share", "low": 0.0, "high": 1.0}: a size knob, bisected to the budget


@dataclass
class StudySpec:
    name: str
    model: str
    pool: str  # SQL predicate on examples
    heldout: str
    arms: list[Arm]
    seeds: list[int] = field(default_factory=lambda: [0])
    budget_share: float | None = 0.25  # of the full pool's trained response tokens
    budget_tokens: int | None = None  # or an absolute count
    heldout_limit: int | None = None
    training: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields (lora_r, epochs, lr, max_len, ...)
    evaluation: dict[str, Any] = field(default_factory=dict)  # accuracy (bool), max_new_tokens, engine
    prepare: dict[str, Any] = field(default_factory=dict)  # score, calibrate, probe, traces settings
    engine: str = "vllm"
    dtype: str = "auto"
    full_seeds: int = 1  # the full-data reference trains on this many of the seeds

    @property
    def arm_names(self) -> list[str]:
        return [a.name for a in self.arms]


SPEC_FIELDS = {f for f in StudySpec.__dataclass_fields__}


BUNDLED_DIR = Path(__file__).parent / "studies"


def load_spec(path: str | Path) -> StudySpec:
    """A study spec from TOML or YAML (a path, or the name of a bundled one: ``gsm8k``); errors name the file,
    the key and what is expected."""
    source = Path(path)
    if not source.is_file() and (BUNDLED_DIR / f"{path}.toml").is_file():
        source = BUNDLED_DIR / f"{path}.toml"
    if not source.is_file():
        bundled = ", ".join(p.stem for p in sorted(BUNDLED_DIR.glob("*.toml")))
        raise FileNotFoundError(f"study spec {source} not found: give a .toml or .yaml file, or a bundled study ({bundled})")
    text = source.read_text(encoding="utf-8")
    if source.suffix in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text)
    else:
        import tomllib

        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{source}: not valid TOML: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: a study spec is a table of settings")
    unknown = sorted(set(raw) - SPEC_FIELDS - {"budget"})
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {unknown}; settings: {', '.join(sorted(SPEC_FIELDS))}")
    for required in ("name", "model", "pool", "heldout", "arms"):
        if required not in raw:
            raise ValueError(f"{source}: missing setting {required!r}")
    arms = []
    for index, entry in enumerate(raw.pop("arms")):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ValueError(f"{source}: arms[{index}] needs a name (and, unless it is full or random, a recipe)")
        if entry["name"] not in BUILTIN_ARMS and "recipe" not in entry:
            raise ValueError(f"{source}: arm {entry['name']!r} needs a recipe (a name from `curate recipes` or a .sql file)")
        extra = sorted(set(entry) - {"name", "recipe", "params", "fit"})
        if extra:
            raise ValueError(f"{source}: arm {entry['name']!r} has unknown setting(s) {extra}; an arm has name, recipe, params, fit")
        arms.append(Arm(entry["name"], entry.get("recipe"), {k: str(v) for k, v in (entry.get("params") or {}).items()}, entry.get("fit")))
    if "budget" in raw:  # budget = 0.25 (a share) or budget = 20000 (tokens)
        value = raw.pop("budget")
        raw["budget_share"], raw["budget_tokens"] = (float(value), None) if float(value) <= 1 else (None, int(value))
    spec = StudySpec(**raw, arms=arms)
    if len(set(spec.arm_names)) != len(spec.arm_names):
        raise ValueError(f"{source}: arm names must be unique, got {spec.arm_names}")
    if not spec.seeds:
        raise ValueError(f"{source}: seeds must list at least one seed")
    if not spec.name.replace("_", "").isalnum():
        raise ValueError(f"{source}: name {spec.name!r}: use letters, digits and underscores")
    return spec


# ---- preparing what the recipes read ------------------------------------------------------------------------


@dataclass
class Keys:
    """The run keys the arms' recipes take, filled into their run parameters by kind."""

    score: str | None = None
    calibrated: str | None = None
    pair: str | None = None
    probe: str | None = None
    traces: str | None = None

    def parameter(self, name: str, kind: str) -> str | None:
        if kind == "score_run":
            return self.calibrated if name.startswith("calibrated") else self.score
        return {"pair_run": self.pair, "probe_run": self.probe, "generate_run": self.traces}.get(kind)


def prepare(workspace: Workspace, spec: StudySpec, folder: Path, *, progress: bool) -> Keys:
    """Score, calibrate and pair-score, probe, and make traces as the spec's ``prepare`` asks (resumable)."""
    from curate.best_of_n import choose_best
    from curate.generate import Sampling, generate, open_teacher
    from curate.probe import probe
    from curate.recipes import load_recipe
    from curate.score import open_scorer, pair_key, score, score_pair
    from curate.select import select
    from train.sft import configure, run_calibrate

    steps = spec.prepare
    keys = Keys()
    options = {"engine": spec.engine, "dtype": spec.dtype}
    if steps.get("score", True) or steps.get("calibrate") or steps.get("probe"):
        base = open_scorer(spec.model, **options)
        if steps.get("score", True):
            keys.score = score(workspace, base, where=spec.pool, progress=progress).key
        if steps.get("probe"):
            keys.probe = probe(workspace, base, where=spec.pool, progress=progress).key
        base.close()
    if steps.get("calibrate"):
        settings = dict(steps["calibrate"]) if isinstance(steps["calibrate"], dict) else {}
        calibrated = folder / "calibrated"
        if not (calibrated / "train_config.json").is_file():
            pool = pool_table(workspace, spec.pool, folder)
            run_calibrate(configure({"data": str(pool), "model": resolve_model(spec.model), "out": str(calibrated),
                                     "fraction": settings.pop("fraction", 0.1), "seed": settings.pop("seed", 42), **settings}),
                          progress=progress)
        base, other = (open_scorer(m, together=2, **options) for m in (spec.model, str(calibrated)))
        score_pair(workspace, base, other, where=spec.pool, progress=progress)
        keys.score, keys.calibrated, keys.pair = base.key, other.key, pair_key(base, other)
        base.close()
        other.close()
    if steps.get("traces"):
        settings = dict(steps["traces"]) if isinstance(steps["traces"], dict) else {}
        if keys.probe is None:
            raise ValueError("prepare.traces generates for the probe's hard examples: set prepare.probe = true too")
        hard = f"study_{spec.name}_probe_hard"
        select(workspace, load_recipe("probe_hard"), name=hard, params={"probe_key": keys.probe, "split": settings.pop("split", "pool")})
        teacher = open_teacher(settings.pop("teacher", spec.model), dtype=spec.dtype, max_len=settings.pop("max_len", 2048))
        sampling = Sampling(n=settings.pop("n", 1), temperature=settings.pop("temperature", 0.0), max_tokens=settings.pop("max_tokens", 256))
        keys.traces = generate(workspace, teacher, source=hard, sampling=sampling, progress=progress).key
        teacher.close()
        choose_best(workspace, keys.traces, rule="shortest")
    return keys


def resolve_model(model: str) -> str:
    from curate.models import resolve

    return resolve(model)


def pool_table(workspace: Workspace, predicate: str, folder: Path) -> Path:
    """The pool's examples (what a calibrator trains a slice of), in ``data/pool``."""
    return examples_table(workspace, predicate, folder / "data" / "pool")


def examples_table(workspace: Workspace, predicate: str, folder: Path) -> Path:
    """The examples a predicate picks, as one Parquet part in ``folder`` (a table of the workspace)."""
    import pyarrow.parquet as pq

    from curate.kernel.atomic import write_atomic
    from curate.sql import connect
    from curate.stream import example_predicate

    table = connect(workspace).sql(f"select * from examples where {example_predicate(workspace, predicate)} order by example_id").to_arrow_table()
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "part-0.parquet", lambda tmp: pq.write_table(table, tmp))
    return folder / "part-0.parquet"


# ---- bringing arms to the budget ----------------------------------------------------------------------------


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
        from train.sft import load_tokenizer

        self.tokenizer = load_tokenizer(resolve_model(model))
        self.max_len = max_len

    def per_row(self, table) -> dict[str, int]:
        from train.data import load_examples

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
    from curate.recipes import load_recipe
    from curate.select import choose

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


# ---- training and evaluating --------------------------------------------------------------------------------


def train_and_evaluate(spec: StudySpec, selection: Path, out: Path, heldout: Path, seed: int, *, progress: bool) -> dict[str, Any]:
    """Train on a selection (stage 1 then 2 when it has stages) and evaluate on the held-out set."""
    import pyarrow.parquet as pq

    from train.evaluate import evaluate
    from train.sft import configure, run_sft

    started = time.perf_counter()
    base = resolve_model(spec.model)
    part = selection / "part-0.parquet"
    columns = pq.read_schema(part).names
    stages = sorted(set(pq.read_table(part, columns=["stage"]).column("stage").to_pylist())) if "stage" in columns else [None]
    model, summaries = base, []
    for stage in stages:
        target = out / (f"stage{stage}" if stage is not None else "train")
        summary_file = target / "train_config.json"
        if not summary_file.is_file():
            run_sft(configure({**spec.training, "data": str(selection), "model": model, "out": str(target), "seed": seed,
                               "stage": stage}), progress=progress)
        summaries.append(json.loads(summary_file.read_text()))
        model = str(target / ("model" if (target / "model").is_dir() else "adapter"))
    trained = time.perf_counter() - started
    evaluation = {"max_new_tokens": 256, **spec.evaluation}
    metrics = evaluate(model, str(heldout), limit=spec.heldout_limit, max_new_tokens=evaluation["max_new_tokens"],
                       engine=evaluation.get("engine", "auto"), accuracy=bool(evaluation.get("accuracy", False)))
    return {"train_loss_first": summaries[0]["first_loss"], "train_loss_last": summaries[-1]["last_loss"],
            "heldout_nll": metrics["mean_answer_nll"], "accuracy": metrics.get("accuracy"), "train_seconds": trained,
            "eval_seconds": metrics["seconds"], "model_path": model}


# ---- the study --------------------------------------------------------------------------------------------


def run_study(workspace: Workspace, spec: StudySpec, *, progress: bool = True) -> Path:
    """Run (or finish) a study; returns its folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.kernel.atomic import write_atomic, write_atomic_text
    from curate.kernel.keys import run_key
    from curate.kernel.runs import recorded_run
    from curate.recipes import RUN_TYPES, load_recipe
    from curate.select import choose, read_manifest, select
    from curate.sql import connect
    from curate.stream import example_predicate

    folder = workspace.root / "studies" / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    example_predicate(workspace, spec.pool, option="pool")
    example_predicate(workspace, spec.heldout, option="heldout")
    spec_record = {k: v for k, v in asdict(spec).items()}
    with workspace.writing(), recorded_run(workspace.root, "study", run_key(spec_record), models=[spec.name],
                                           parameters=spec_record) as record:
        keys = prepare(workspace, spec, folder, progress=progress)
        con = connect(workspace)
        pool_ids = [r[0] for r in con.execute(f"select example_id from examples where {spec.pool} order by example_id").fetchall()]
        heldout = examples_table(workspace, spec.heldout, folder / "data" / "heldout")
        counter = TokenCounter(spec.model, int(spec.training.get("max_len", 1024)))
        full_tokens = sum(counter.per_row(choose(workspace, load_recipe("full"), {}, keep=pool_ids)).values())
        budget = spec.budget_tokens or int(round(full_tokens * (spec.budget_share or 0.25)))
        results = []
        for arm in spec.arms:
            recipe = load_recipe(arm.recipe or "full")
            params = dict(arm.params)
            for name, parameter in recipe.parameters.items():  # run parameters come from the prepared runs
                if parameter.kind in RUN_TYPES and name not in params and keys.parameter(name, parameter.kind):
                    params[name] = keys.parameter(name, parameter.kind)
            seeds = spec.seeds[: spec.full_seeds] if arm.name == "full" else spec.seeds
            for seed in seeds:
                run_dir = folder / "runs" / arm.name / f"seed{seed}"
                result_file = run_dir / "result.json"
                if result_file.is_file():
                    results.append(json.loads(result_file.read_text()))
                    continue
                if arm.name == "full":
                    fitted = Fitted("full", None, "fitted", len(pool_ids), full_tokens, "every pool example", params, pool_ids)
                else:
                    fitted = fit_arm(workspace, arm, params, budget, pool_ids, counter, seed)
                row = {"study": spec.name, "arm": arm.name, "seed": seed, "status": fitted.status, "rows": fitted.rows,
                       "trained_tokens": fitted.trained_tokens, "budget_tokens": budget if arm.name != "full" else full_tokens,
                       "deviation": fitted.trained_tokens / (budget if arm.name != "full" else full_tokens) - 1, "fit": fitted.how,
                       "params": json.dumps(fitted.params, sort_keys=True), "selection": None, "selection_key": None}
                if fitted.status == "fitted":
                    selection = f"study_{spec.name}_{arm.name}" + (f"_s{seed}" if fitted.seed is not None else "")
                    select(workspace, recipe, name=selection, params=fitted.params, keep=fitted.keep, keep_note=fitted.how)
                    selection_dir = workspace.table_dir(f"selections/{selection}")
                    row |= {"selection": selection,
                            "selection_key": read_manifest(pq.read_table(selection_dir / "part-0.parquet")).get("key")}
                    row |= train_and_evaluate(spec, selection_dir, run_dir, heldout, seed, progress=progress)
                run_dir.mkdir(parents=True, exist_ok=True)
                write_atomic_text(result_file, json.dumps(row, default=str) + "\n")  # this arm x seed is done
                results.append(row)
        base_row = _base_reference(spec, folder, heldout)
        frame = pa.Table.from_pylist(results + [base_row])
        write_atomic(folder / RESULTS_FILE, lambda tmp: pq.write_table(frame, tmp))
        report = render_report(spec, results, base_row, budget, full_tokens)
        write_atomic_text(folder / "report.md", report)
        plot_study(spec, results, base_row, budget, folder / "study.png")
        record.counts = {"runs": len(results), "budget_tokens": budget}
    return folder


def _base_reference(spec: StudySpec, folder: Path, heldout: Path) -> dict[str, Any]:
    """The untrained model on the held-out set (kept once per study)."""
    from curate.kernel.atomic import write_atomic_text
    from train.evaluate import evaluate

    path = folder / "runs" / "base" / "result.json"
    if path.is_file():
        return json.loads(path.read_text())
    evaluation = {"max_new_tokens": 256, **spec.evaluation}
    metrics = evaluate(resolve_model(spec.model), str(heldout), limit=spec.heldout_limit, max_new_tokens=evaluation["max_new_tokens"],
                       engine=evaluation.get("engine", "auto"), accuracy=bool(evaluation.get("accuracy", False)))
    row = {"study": spec.name, "arm": "base (no training)", "seed": None, "status": "reference", "rows": 0, "trained_tokens": 0,
           "heldout_nll": metrics["mean_answer_nll"], "accuracy": metrics.get("accuracy"), "eval_seconds": metrics["seconds"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_text(path, json.dumps(row) + "\n")
    return row


# ---- the report -------------------------------------------------------------------------------------------


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


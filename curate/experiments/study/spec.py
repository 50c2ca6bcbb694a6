"""A study spec (TOML or YAML): the model, the pool and held-out predicates, the budget, the arms, the seeds and
the training and evaluation settings, loaded and checked before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curate.experiments.study.plant import PlantSettings, plant_settings

TOLERANCE = 0.02


BUILTIN_ARMS = ("full", "random")


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
    plant: dict[str, Any] = field(default_factory=dict)  # planted canaries: kind = share (and seed); see study.plant

    @property
    def planting(self) -> PlantSettings | None:
        return plant_settings(self.plant, where=f"study {self.name}")

    @property
    def arm_names(self) -> list[str]:
        return [a.name for a in self.arms]


SPEC_FIELDS = {f for f in StudySpec.__dataclass_fields__}


BUNDLED_DIR = Path(__file__).resolve().parents[2] / "studies"  # package data of curate


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
    plant_settings(spec.plant, where=str(source))  # checked now, before anything runs
    return spec

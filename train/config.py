"""What a training run is given: ``TrainConfig`` (every option, checked when it is made), the papers' named
presets (METHODS.md), and ``configure``, which lays options given over a preset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from curate.kernel.machine import PRECISIONS
from train.data import SPANS
from train.objectives import (
    EKSFT_COMBINE,
    EKSFT_NORMALISE,
    QTUNING_ENTROPY,
    QTUNING_NORMALISE,
    QTUNING_SEARCH,
)

METHODS = ("sft", "eksft", "qtuning")
BATCHINGS = ("auto", "packed", "padded")  # auto: packed for plain SFT, padded for the online methods
SCHEDULERS = ("linear", "cosine", "constant")


@dataclass
class TrainConfig:
    data: str
    model: str
    out: str
    method: str = "sft"
    lora_r: int = 16  # 0 = full fine-tuning
    epochs: float = 1.0
    lr: float = 2e-4
    scheduler: str = "linear"  # linear decay to 0, cosine, or constant (after the warm-up)
    warmup_ratio: float = 0.0  # share of the steps with a linear warm-up
    weight_decay: float = 0.0
    adam_beta2: float = 0.999
    max_len: int = 1024
    batch_size: int = 8  # examples per micro-batch (the unit EKSFT and Q-Tuning select within)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int | None = None
    eksft_ratio: float = 0.2  # EKSFT: k = floor(ratio x a sequence's response tokens), per top-k
    eksft_combine: str = "union"  # EKSFT: union (the paper's script) or intersection (the code's default) of the two top-k
    eksft_lambda_entropy: float = 0.05  # EKSFT: weight of the entropy bonus on the entropy-masked positions (0: off)
    eksft_lambda_kl: float = 0.05  # EKSFT: weight of the KL term on the KL-masked positions (0: off)
    eksft_normalise: str = "sequence"  # EKSFT: sequence (the reference: each sequence weighs the same) or token
    keep_end_of_turn: bool = False  # EKSFT: never mask the end-of-turn token (the reference may mask it)
    r_sample: float = 0.25  # Q-Tuning: share of samples kept (Q2 ∪ Q4, filled up); the paper's headline run
    r_token: float = 0.5  # Q-Tuning: kept tokens = round(T r_sample r_token) of the batch's T positions
    smoothing: float = 0.5  # Q-Tuning: λ, the weight of the neighbours in the token score
    qtuning_entropy: str = "all"  # Q-Tuning: sample entropy over all positions (the reference) or the response only
    qtuning_search: str = "last"  # Q-Tuning: the bisection's last iterate (the reference) or best-under
    qtuning_normalise: str = "reference"  # Q-Tuning: per micro-batch by kept non-pad positions (the reference), or token
    stage: int | None = None  # keep only rows of this stage (a `stage` column: complexity_split's two stages)
    preset: str | None = None  # the named preset these settings started from (train_config.json records it)
    split: str | None = None  # keep only rows of this split (a `split` column, as in curate's examples)
    limit: int | None = None  # first N rows only
    fraction: float | None = None  # random share of rows (calibration's warm-up slice)
    batching: str = "auto"  # packed (plain SFT: one row per micro-batch, no padding), padded, or auto (packed where it applies)
    span: str = "auto"  # trained reply tokens: slot ({content}<|im_end|>\n, the EKSFT/Q-Tuning forks'), content_eot, or
    # auto: slot for --method eksft|qtuning (their reference trains it), content_eot for plain SFT
    precision: str = "auto"  # autocast: auto = bfloat16 where native (GPUs, CPUs with AVX-512 BF16 or AMX), else float32
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.batching not in BATCHINGS:
            raise ValueError(f"unknown batching {self.batching!r}; choose one of {', '.join(BATCHINGS)}")
        if self.batching == "packed" and self.method != "sft":
            raise ValueError(f"--batching packed is for plain SFT; --method {self.method} selects per sequence over padded "
                             "micro-batches: use --batching padded or auto")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.span not in SPANS:
            raise ValueError(f"unknown span {self.span!r}; choose one of {', '.join(SPANS)}")
        for name in ("eksft_ratio", "r_sample", "r_token", "smoothing", "warmup_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name, allowed in (("scheduler", SCHEDULERS), ("eksft_combine", EKSFT_COMBINE), ("eksft_normalise", EKSFT_NORMALISE),
                              ("qtuning_entropy", QTUNING_ENTROPY), ("qtuning_search", QTUNING_SEARCH),
                              ("qtuning_normalise", QTUNING_NORMALISE)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")


# Named settings from the papers (METHODS.md); any option given explicitly overrides its preset value. The
# papers ran on several GPUs: global batches are kept as batch size x gradient accumulation on one device.
PRESETS: dict[str, dict[str, Any]] = {
    "instructdiff-math": {"lora_r": 0, "lr": 5e-5, "batch_size": 8, "grad_accum": 32, "epochs": 3, "max_len": 2048,
                          "scheduler": "cosine", "warmup_ratio": 0.05, "weight_decay": 0.01},
    "instructdiff-general": {"lora_r": 0, "lr": 2e-5, "batch_size": 8, "grad_accum": 8, "epochs": 10, "max_len": 2048,
                             "scheduler": "cosine", "warmup_ratio": 0.05, "weight_decay": 0.01},
    "instructdiff-medical": {"lora_r": 0, "lr": 2e-5, "batch_size": 8, "grad_accum": 8, "epochs": 3, "max_len": 512,
                             "scheduler": "cosine", "warmup_ratio": 0.05, "weight_decay": 0.01},
    "instructdiff-code": {"lora_r": 0, "lr": 1e-5, "batch_size": 8, "grad_accum": 32, "epochs": 5, "max_len": 4096,
                          "scheduler": "cosine", "warmup_ratio": 0.05, "weight_decay": 0.01},
    "eksft-paper": {"method": "eksft", "lora_r": 0, "lr": 1e-5, "batch_size": 1, "grad_accum": 64, "epochs": 8,
                    "max_len": 20000, "scheduler": "cosine", "warmup_ratio": 0.01, "weight_decay": 0.1, "adam_beta2": 0.95},
    "qtuning-paper": {"method": "qtuning", "lora_r": 16, "lr": 1e-4, "batch_size": 8, "grad_accum": 1, "epochs": 3,
                      "r_sample": 0.25, "r_token": 0.5},
    "complexity-stage1": {"lora_r": 0, "lr": 1e-5, "scheduler": "constant", "batch_size": 2, "grad_accum": 8, "epochs": 5,
                          "max_len": 800, "stage": 1},
    "complexity-stage2": {"lora_r": 0, "lr": 1e-5, "scheduler": "constant", "batch_size": 2, "grad_accum": 8, "epochs": 5,
                          "max_len": 2000, "stage": 2},
}


def configure(given: dict[str, Any], *, preset: str | None = None) -> TrainConfig:
    """A TrainConfig from a preset's values overridden by the options given (``None`` means not given)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    values = {**(PRESETS[preset] if preset else {}), **{k: v for k, v in given.items() if v is not None}}
    return TrainConfig(**values, preset=preset)

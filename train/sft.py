"""The SFT recipe, top to bottom: setup, loop, save. Plain SFT, or the online EKSFT / Q-Tuning token and
sample selection (train.objectives), with LoRA (peft) or full fine-tuning, on CPU or CUDA.

Loss: the sum over trained tokens of weight × NLL, divided by the number of trained tokens in the whole
optimizer step (every micro-batch of the gradient accumulation), so accumulation never changes the scale.
The online methods decide their masks after the forward pass, so gradients are summed unscaled and divided
by the step's kept-token count just before the optimizer step.

Batching (``batching``): plain SFT packs each micro-batch's examples into one row with no padding, attention
kept within each example and the output head run only at trained positions (train.packing; the same
per-token losses as padded batches). EKSFT and Q-Tuning select per sequence and per micro-batch over a [B, L]
layout (Q-Tuning's budget counts every predicted position, prompt included), so they train on padded
micro-batches of the same composition. Either way a micro-batch holds the same examples, in the same order.
"""

from __future__ import annotations

import copy
import json
import math
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from curate.kernel.atomic import staged_directory
from curate.kernel.fingerprint import model_fingerprint, table_fingerprint
from curate.kernel.keys import run_key
from curate.kernel.machine import device, resolve_precision
from curate.kernel.runs import model_names, recorded_run
from train.config import TrainConfig
from train.data import TrainExample, load_examples, read_table, sample_fraction
from train.packing import pack, packed_attention, packed_nll, packed_sft_objective
from train.objectives import (
    Objective,
    eksft_objective,
    qtuning_objective,
    sft_objective,
    token_stats,
)

def load_tokenizer(model: str) -> Any:
    """The model's tokenizer, padding with end-of-sequence when it names no pad token. A model that is neither
    a folder here nor found on the hub is an error that says what ``--model`` takes."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except OSError as err:
        if Path(model).is_dir():
            raise
        raise ValueError(f"--model {model}: no such folder, and the hub has no such model (or cannot be reached: {str(err).splitlines()[0]}). "
                         "train takes a checkpoint folder or a hub id; for curate's bundled model, `curate models pull "
                         f"{model}` prints its folder") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_checkpoint(model: str) -> Any:
    """A model from a checkpoint folder or hub id, or a LoRA adapter folder merged onto its base (float32)."""
    from transformers import AutoModelForCausalLM

    directory = Path(model)
    if (directory / "adapter_config.json").is_file():
        from peft import PeftModel

        base = json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"]
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), directory).merge_and_unload()
    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)


def load_model(config: TrainConfig) -> tuple[Any, Any]:
    from peft import LoraConfig, get_peft_model

    tokenizer = load_tokenizer(config.model)
    model = load_checkpoint(config.model).to(device())  # stage 2 starts from stage 1's adapter, merged
    if config.lora_r:
        lora = LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    return model, tokenizer


def batches(examples: list[TrainExample], config: TrainConfig) -> list[list[list[TrainExample]]]:
    """Steps of micro-batches for every epoch, shuffled by the seed (a fractional last epoch is cut)."""
    rng = random.Random(config.seed)
    steps: list[list[list[TrainExample]]] = []
    per_step = config.batch_size * config.grad_accum
    total_examples = math.ceil(len(examples) * config.epochs)
    stream: list[TrainExample] = []
    while len(stream) < total_examples:
        order = examples[:]
        rng.shuffle(order)
        stream += order
    stream = stream[:total_examples]
    for begin in range(0, len(stream), per_step):
        chunk = stream[begin : begin + per_step]
        steps.append([chunk[i : i + config.batch_size] for i in range(0, len(chunk), config.batch_size)])
    return steps[: config.max_steps] if config.max_steps else steps


def collate(micro: list[TrainExample], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in micro)
    ids = torch.full((len(micro), width), pad_id, dtype=torch.long)
    attention = torch.zeros(len(micro), width, dtype=torch.long)
    targets = torch.zeros(len(micro), width, dtype=torch.bool)
    end_of_turn = torch.zeros(len(micro), width, dtype=torch.bool)
    for row, example in enumerate(micro):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        attention[row, :n] = 1
        targets[row, :n] = torch.tensor(example.targets)
        end_of_turn[row, :n] = torch.tensor(example.end_of_turn)
    weights = torch.tensor([e.weight for e in micro], dtype=torch.float32)
    batch = {"input_ids": ids, "attention_mask": attention, "targets": targets, "end_of_turn": end_of_turn, "weights": weights}
    return {name: tensor.to(device()) for name, tensor in batch.items()}


def objective(config: TrainConfig, model: Any, reference: Any, batch: dict[str, torch.Tensor], stats: Any) -> Objective:
    """This micro-batch's loss by the method: what it trains on, and what the optimizer step divides by."""
    targets, weights = batch["targets"], batch["weights"]
    if config.method == "eksft":
        with torch.no_grad(), _autocast(config):
            if reference is None:  # LoRA: the frozen initial model is the base without its adapter
                with model.disable_adapter():
                    reference_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            else:
                reference_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return eksft_objective(stats, reference_logits, targets, weights, ratio=config.eksft_ratio, combine=config.eksft_combine,
                               lambda_entropy=config.eksft_lambda_entropy, lambda_kl=config.eksft_lambda_kl,
                               normalise=config.eksft_normalise, protected=batch["end_of_turn"] if config.keep_end_of_turn else None)
    if config.method == "qtuning":
        return qtuning_objective(stats, targets, batch["attention_mask"].sum(dim=1), weights, r_sample=config.r_sample,
                                 r_token=config.r_token, smoothing=config.smoothing, entropy_over=config.qtuning_entropy,
                                 search=config.qtuning_search, normalise=config.qtuning_normalise)
    return sft_objective(stats, targets, weights)


def learning_rate_factor(config: TrainConfig, steps: int):
    """The learning-rate multiplier at each step: a linear warm-up, then linear decay, cosine, or constant."""
    warmup = int(math.ceil(config.warmup_ratio * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(steps - warmup, 1)
        if config.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 if config.scheduler == "constant" else max(0.0, 1 - progress)

    return factor


def _autocast(config: TrainConfig):
    precision = resolve_precision(config.precision)
    return torch.autocast(device_type=device(), dtype=getattr(torch, precision), enabled=precision != "float32")


def train(config: TrainConfig, *, progress: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """Run the recipe; returns (model, tokenizer, summary). Writes nothing (see ``run_sft``)."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model, tokenizer = load_model(config)
    reference = None
    if config.method == "eksft" and not config.lora_r:
        reference = copy.deepcopy(model).eval().requires_grad_(False)  # the frozen initial model
    table = read_table(config.data, split=config.split, stage=config.stage, limit=config.limit)
    if config.fraction is not None:
        table = sample_fraction(table, config.fraction, seed=config.seed)
    examples, load_report = load_examples(table, tokenizer, max_len=config.max_len, source=config.data,
                                          span=_resolved_span(config))
    steps = batches(examples, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel per parameter instead of a dozen (the per-tensor loop is torch's default on a CPU); on the
    # 2-core AMD EPYC, a step over LoRA r=16's 420 tensors took 0.32 core-seconds instead of 0.88
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, config.adam_beta2), fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor(config, len(steps)))
    model.train()
    with packed_attention(model) as packable:
        if config.batching == "packed" and not packable:
            raise ValueError(f"--batching packed needs the model's attention to be sdpa, not {model.config._attn_implementation!r}: "
                             "use --batching padded")
        packed = packable and config.method == "sft" and config.batching != "padded"
        log = _loop(config, model, reference, tokenizer, steps, trainable, optimizer, scheduler, packed=packed, progress=progress)
    model.eval()
    summary = {"steps": len(log), "examples": len(examples), "load": asdict(load_report), "batching": "packed" if packed else "padded",
               "seconds": log[-1]["seconds"] if log else 0.0, "tokens_seen": sum(r["tokens"] for r in log),
               "first_loss": log[0]["loss"] if log else None, "last_loss": log[-1]["loss"] if log else None, "log": log}
    return model, tokenizer, summary


def _loop(config: TrainConfig, model: Any, reference: Any, tokenizer: Any, steps: list[list[list[TrainExample]]],
          trainable: list[torch.nn.Parameter], optimizer: Any, scheduler: Any, *, packed: bool, progress: bool) -> list[dict[str, Any]]:
    """The optimizer steps; one log record each (loss, lr, counts, and the tokens and computed positions)."""
    log: list[dict[str, Any]] = []
    started, tokens_seen = time.perf_counter(), 0
    bar = tqdm(steps, desc=f"train {config.method}", unit=" step", disable=not progress, file=sys.stderr)
    for step, micro_batches in enumerate(bar, start=1):
        loss_sum, units, record = 0.0, 0.0, {"step": step, "tokens": 0, "positions": 0}
        for micro in micro_batches:
            if packed:
                batch = pack(micro, device=device())
                with _autocast(config):
                    result = packed_sft_objective(packed_nll(model, batch), batch.weights)
                tokens = positions = batch.tokens
            else:
                batch = collate(micro, tokenizer.pad_token_id)
                with _autocast(config):
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                stats = token_stats(logits, batch["input_ids"], with_entropy=config.method != "sft")
                result = objective(config, model, reference, batch, stats)
                tokens, positions = int(batch["attention_mask"].sum()), batch["input_ids"].numel()
            result.loss.backward()
            loss_sum += float(result.loss.detach())
            units += result.units
            tokens_seen += tokens
            record["tokens"] += tokens
            record["positions"] += positions  # rows x width: the padding is positions - tokens
            for name, value in result.info.items():  # counts summed over the step's micro-batches
                record[name] = record.get(name, 0) + value
        if "kl_sum" in record:  # EKSFT: mean KL over the step's target tokens
            record["mean_kl"] = record.pop("kl_sum") / max(record["targets"], 1)
        if "alpha" in record:  # Q-Tuning: the mean of the micro-batches' alphas
            record["alpha"] /= len(micro_batches)
        for parameter in trainable:  # the method's normalisation: trained tokens, sequences or micro-batches
            if parameter.grad is not None:
                parameter.grad /= max(units, 1)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        record |= {"loss": loss_sum / max(units, 1), "lr": scheduler.get_last_lr()[0], "seconds": elapsed,
                   "tokens_per_s": tokens_seen / elapsed}
        log.append(record)
        bar.set_postfix_str(f"loss {record['loss']:.3f}, {record['tokens_per_s']:,.0f} tok/s")
    bar.close()
    return log


def run_sft(config: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train and write: the adapter (LoRA) or model (full; or LoRA trained on an adapter's merged model, as
    stage 2 on stage 1: merged again), the resolved config, metrics.jsonl, loss_curve.png.

    Everything is written into a staging folder that replaces ``--out`` whole at the end: a killed run
    leaves no folder that looks finished (and its staging folder is removed when it fails)."""
    with _run_record(config, "sft") as record, checkpoint_folder(config.out) as out:
        model, tokenizer, summary = train(config, progress=progress)
        # an adapter on top of another adapter's merged model would point at the wrong base: save it merged
        stacked = bool(config.lora_r) and (Path(config.model) / "adapter_config.json").is_file()
        target = out / ("adapter" if config.lora_r and not stacked else "model")
        (model.merge_and_unload() if stacked else model).save_pretrained(target)
        tokenizer.save_pretrained(target)
        write_run_files(out, config, summary)
        record.counts = _counts(summary)
    return summary | {"saved": str(Path(config.out) / target.name)}


def checkpoint_folder(out: str | Path):
    """A staging folder that becomes ``out`` when the block succeeds. An existing ``out`` is replaced only if
    it is an earlier run's output (it holds train_config.json), never a folder of something else."""
    target = Path(out).expanduser().resolve()
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / RUN_FILE).is_file())):
        raise ValueError(f"--out {target} exists and is not a train output (no {RUN_FILE}): pick a new folder")
    return staged_directory(target)


def _counts(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in ("log", "load")}


def _run_record(config: TrainConfig, stage: str):
    """The run's row in the workspace its data comes from (``ws/selections/NAME``, ``ws/examples``), if any."""
    import contextlib
    from types import SimpleNamespace

    workspace = find_workspace(config.data)
    if workspace is None:
        return contextlib.nullcontext(SimpleNamespace(counts={}))
    model_dir = Path(config.model)
    spec = {"config": {k: v for k, v in asdict(config).items() if k not in ("out", "data", "extra")},
            "precision": resolve_precision(config.precision),
            "model": model_fingerprint(model_dir) if (model_dir / "config.json").is_file() else config.model,
            "data": table_fingerprint(config.data)}
    return recorded_run(workspace, stage, run_key(spec), models=model_names(str(config.out), str(Path(config.out).resolve())),
                        parameters={**spec, "data": config.data, "out": config.out, "model_path": config.model},
                        fingerprints={"model": spec["model"], "data": spec["data"]})


def find_workspace(data: str | Path) -> Path | None:
    """The curate workspace a data path lies in (a folder holding ``examples/`` or ``.curate/``), or None."""
    path = Path(data).expanduser().resolve()
    for folder in [path, *path.parents]:
        if (folder / ".curate").is_dir() or (folder / "examples").is_dir():
            return folder
    return None


RUN_FILE = "train_config.json"


def write_run_files(out: Path, config: TrainConfig, summary: dict[str, Any]) -> None:
    (out / RUN_FILE).write_text(json.dumps({"config": asdict(config), "precision": resolve_precision(config.precision),
                                            "device": device(), "torch": torch.__version__,
                                                      **{k: v for k, v in summary.items() if k != "log"}}, indent=2) + "\n")
    with open(out / "metrics.jsonl", "w") as handle:
        for record in summary["log"]:
            handle.write(json.dumps(record) + "\n")
    plot_losses(summary["log"], out / "loss_curve.png", title=f"{config.method} on {Path(config.data).name}")


def plot_losses(log: list[dict[str, Any]], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot([r["step"] for r in log], [r["loss"] for r in log], marker="." if len(log) < 50 else None)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("mean NLL of trained tokens")
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_calibrate(config: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """InstructDiff's calibrated model: SFT on a random warm-up slice, saved as a normal checkpoint (config +
    safetensors + tokenizer) that vLLM and transformers both load. Full fine-tuning (``lora_r`` 0) is the
    reference; a LoRA adapter is merged (``merge_and_unload``) into the checkpoint. Written through a staging
    folder, so a killed calibration never leaves a checkpoint folder that a scorer would load."""
    with _run_record(config, "calibrate") as record, checkpoint_folder(config.out) as out:
        model, tokenizer, summary = train(config, progress=progress)
        (model.merge_and_unload() if config.lora_r else model).save_pretrained(out)
        tokenizer.save_pretrained(out)
        write_run_files(out, config, summary)
        record.counts = _counts(summary)
    return summary | {"saved": str(Path(config.out))}


def _resolved_span(config: TrainConfig) -> str:
    """``auto``: the reply slot for the online methods (their reference forks train it), the reply and its
    end-of-turn token for plain SFT."""
    if config.span != "auto":
        return config.span
    return "content_eot" if config.method == "sft" else "slot"

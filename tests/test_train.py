"""The trainer on a tiny randomly initialised model with the real SmolLM2 tokenizer: the loss, masks,
LoRA, golden first losses, EKSFT / Q-Tuning selection counts, data errors, and a merged calibrated
checkpoint that reproduces the adapter in transformers and vLLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, write_parquet
from curate.kernel.chat_tokens import tokenize_chat
from train.data import DataError, load_examples, read_table
from train.objectives import token_stats
from train.packing import head_only_at, pack, packed_attention, packed_nll, packed_sft_objective
from train.config import TrainConfig
from train.sft import collate, load_model, run_calibrate, run_sft, train

GOLDEN = REPO / "tests" / "golden" / "tiny_sft_first_losses.json"


def _chats(count: int) -> list[dict]:
    rows = []
    for i in range(count):
        a, b = i % 7 + 2, i % 5 + 3
        rows.append({"example_id": f"e{i:03d}", "messages": [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}.\n#### {a + b}"}],
            "reference_answer": str(a + b)})
    return rows


@pytest.fixture
def chats_parquet(tmp_path: Path) -> Path:
    return write_parquet(tmp_path / "chats.parquet", _chats(16))


def _config(data: Path, model: Path, out: Path, **options) -> TrainConfig:
    defaults = {"lora_r": 8, "lr": 5e-3, "batch_size": 4, "epochs": 1.0, "max_len": 128, "seed": 0, "precision": "float32"}
    return TrainConfig(data=str(data), model=str(model), out=str(out), **(defaults | options))


def test_loss_decreases_and_only_lora_weights_change(chats_parquet: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model, _, summary = train(_config(chats_parquet, tiny_model_dir, tmp_path, epochs=6), progress=False)
    losses = [r["loss"] for r in summary["log"]]
    assert len(losses) == 24 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5  # nats
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    changed_lora, frozen_same = 0, 0
    for name, value in model.state_dict().items():
        if "lora_B" in name:
            changed_lora += int(value.abs().sum() > 0)  # lora_B starts at zero
        elif "lora_" not in name:
            base_name = name.replace("base_model.model.", "").replace("base_layer.", "")
            assert torch.equal(value, before[base_name]), name
            frozen_same += 1
    assert changed_lora == 2 * 7 and frozen_same > 10  # 7 projections per layer, 2 layers


def test_masked_tokens_contribute_nothing_to_the_gradient(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Our masked loss == transformers' own loss with labels -100 at the masked tokens, gradients included."""
    config = _config(tmp_path, tiny_model_dir, tmp_path, lora_r=0)
    model, tokenizer = load_model(config)
    rows = _chats(3)
    table = __import__("pyarrow").Table.from_pylist(rows)
    examples, _ = load_examples(table, tokenizer, max_len=128, source="test")
    examples[1].targets[-5:] = [False] * 5  # mask the last five trained tokens of one example
    batch = collate(examples, tokenizer.pad_token_id)
    stats = token_stats(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["input_ids"])
    ours = (stats.nll * batch["targets"].float()).sum() / batch["targets"].sum()
    ours.backward()
    ours_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    labels = batch["input_ids"].masked_fill(~batch["targets"], -100)
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    reference.backward()
    assert float(ours.detach()) == pytest.approx(float(reference.detach()), abs=1e-5)
    for mine, theirs in zip(ours_grads, (p.grad for p in model.parameters())):
        assert torch.allclose(mine, theirs, atol=1e-6)


@pytest.mark.parametrize("batching", ["packed", "padded"])
def test_golden_first_losses(batching: str, chats_parquet: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The same golden losses whether the micro-batches are packed (the default for plain SFT) or padded."""
    _, _, summary = train(_config(chats_parquet, tiny_model_dir, tmp_path, max_steps=3, batching=batching), progress=False)
    assert summary["batching"] == batching
    assert all((r["positions"] == r["tokens"]) == (batching == "packed") for r in summary["log"])  # padding only if padded
    losses = [round(r["loss"], 5) for r in summary["log"]]
    if not GOLDEN.exists():  # first run on a new recipe: record, and say so
        GOLDEN.write_text(json.dumps({"losses": losses, "torch": torch.__version__}, indent=2) + "\n")
        pytest.skip(f"recorded golden losses {losses} in {GOLDEN}; commit them")
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert losses == pytest.approx(golden, abs=2e-4)


def test_packed_micro_batches_give_the_padded_per_token_losses_and_gradients(tiny_model_dir: Path, tmp_path: Path) -> None:
    """One micro-batch of examples of different lengths, weights and masks: packed into one row (attention cut at
    the examples' boundaries, the head only at trained positions) it gives every trained token the NLL the padded
    batch gives it, and the same loss and gradient; without the boundaries the tokens would see the examples
    before them (the check can fail)."""
    config = _config(tmp_path, tiny_model_dir, tmp_path, lora_r=0)
    model, tokenizer = load_model(config)
    rows = _chats(5)
    rows[2]["messages"][1]["content"] *= 4  # a long one among short ones: the padded batch is mostly padding
    examples, _ = load_examples(__import__("pyarrow").Table.from_pylist(rows), tokenizer, max_len=128, source="test")
    examples[1].targets[-4:] = [False] * 4
    examples[3].weight = 2.5
    padded = collate(examples, tokenizer.pad_token_id)
    stats = token_stats(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits, padded["input_ids"],
                        with_entropy=False)
    reference = stats.nll[padded["targets"]]  # row-major: example by example, position by position, as packed
    reference_loss = (stats.nll * padded["targets"].float() * padded["weights"][:, None]).sum()
    reference_loss.backward()
    reference_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    batch = pack(examples, device="cpu")
    assert batch.tokens == sum(len(e.input_ids) for e in examples) < padded["input_ids"].numel()
    with packed_attention(model) as packable:
        assert packable
        nll = packed_nll(model, batch)
    assert model.config._attn_implementation == "sdpa"  # restored: saved checkpoints name the standard attention
    assert nll.shape == reference.shape and (nll - reference).abs().max() < 1e-5
    result = packed_sft_objective(nll, batch.weights)
    assert result.units == int(padded["targets"].sum())
    assert float(result.loss.detach()) == pytest.approx(float(reference_loss.detach()), rel=1e-6)
    result.loss.backward()
    for mine, theirs in zip((p.grad for p in model.parameters()), reference_grads):
        assert torch.allclose(mine, theirs, atol=1e-5)
    with torch.no_grad():  # one causal row without the boundaries: the later examples' losses change
        with head_only_at(model, batch.predictors):
            logits = model(input_ids=batch.input_ids).logits
    unbounded = torch.nn.functional.cross_entropy(logits, batch.labels, reduction="none")
    assert (unbounded - reference).abs().max() > 1e-2


def test_packing_is_for_plain_sft(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--batching packed is for plain SFT; --method eksft"):
        TrainConfig(data="d", model="m", out="o", method="eksft", batching="packed")
    with pytest.raises(ValueError, match="unknown batching 'tight'"):
        TrainConfig(data="d", model="m", out="o", batching="tight")


@pytest.mark.parametrize("method", ["eksft", "qtuning"])
def test_online_methods_log_what_they_keep(method: str, chats_parquet: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    summary = run_sft(_config(chats_parquet, tiny_model_dir, tmp_path / method, method=method, max_steps=2, r_sample=0.5), progress=False)
    assert summary["batching"] == "padded"  # they select per sequence over [B, L]: auto pads them
    for record in summary["log"]:
        assert 0 < record["kept_tokens"] < record["targets"]
        if method == "eksft":  # per sequence, k = floor(0.2 n) by each signal: between k and 2k per row
            assert record["masked_by_entropy"] > 0 and record["masked_by_kl"] > 0
            assert record["targets"] - record["masked_by_entropy"] - record["masked_by_kl"] <= record["kept_tokens"]
        else:  # 4 samples, r_sample 0.5: two kept (Q2 and Q4, filled up), two dropped
            assert record["q2"] + record["q4"] + record["filled"] == 2 and record["dropped_samples"] == 2
    out = tmp_path / method
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "loss_curve.png").stat().st_size > 1000
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "train_config.json").read_text())["config"]["method"] == method


def test_a_preset_fills_in_what_is_not_given_and_explicit_options_win(tmp_path: Path) -> None:
    from train.config import configure

    config = configure({"data": "d", "model": "m", "out": "o", "lr": 1e-4, "batch_size": None}, preset="instructdiff-math")
    assert (config.lora_r, config.lr, config.epochs, config.scheduler, config.warmup_ratio, config.weight_decay) == (0, 1e-4, 3, "cosine", 0.05, 0.01)
    assert config.batch_size * config.grad_accum == 256 and config.preset == "instructdiff-math"
    with pytest.raises(ValueError, match="unknown preset 'paper'"):
        configure({"data": "d", "model": "m", "out": "o"}, preset="paper")


def test_two_stages_start_from_the_merged_first_stage(chats_parquet: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    rows = pq.read_table(chats_parquet).to_pylist()
    staged = write_parquet(tmp_path / "staged.parquet", [{**r, "stage": 1 if i < 10 else 2} for i, r in enumerate(rows)])
    first = run_sft(_config(staged, tiny_model_dir, tmp_path / "s1", stage=1), progress=False)
    assert first["examples"] == 10
    second = run_sft(_config(staged, tmp_path / "s1" / "adapter", tmp_path / "s2", stage=2), progress=False)
    assert second["examples"] == 6 and (tmp_path / "s2" / "model" / "config.json").is_file()  # stage 1 + 2, merged
    with pytest.raises(ValueError, match="no rows with stage = 3"):
        run_sft(_config(staged, tiny_model_dir, tmp_path / "s3", stage=3), progress=False)


def test_bad_training_data_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(DataError, match="missing column"):
        read_table(write_parquet(tmp_path / "a.parquet", [{"text": "hello"}]))
    row = _chats(1)[0]
    n = len(tokenize_chat(tokenizer, row["messages"]))
    cases = [
        ({"loss_mask": [1] * (n - 2)}, f"loss_mask has {n - 2} entries but the tokenized example has {n} tokens"),
        ({"loss_mask": [0] * n}, "all zero"),
        ({"loss_mask": [1] * n, "input_ids": list(range(n))}, "another tokenizer"),
    ]
    for extra, message in cases:
        good = {**_chats(2)[1], "loss_mask": [1] * len(tokenize_chat(tokenizer, _chats(2)[1]["messages"]))}
        if "input_ids" in extra:
            good["input_ids"] = tokenize_chat(tokenizer, good["messages"]).token_ids
        table = read_table(write_parquet(tmp_path / "b.parquet", [good, {**row, **extra}]))
        with pytest.raises(DataError, match=message) as err:
            load_examples(table, tokenizer, max_len=128, source="b.parquet")
        assert "b.parquet row 2 (example_id e000)" in str(err.value)


def test_loss_mask_and_weight_are_honoured(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = _chats(1)[0]
    n = len(tokenize_chat(tokenizer, row["messages"]))
    mask = [0] * (n - 3) + [1, 1, 1]
    table = read_table(write_parquet(tmp_path / "m.parquet", [{**row, "loss_mask": mask, "weight": 2.5}]))
    (example,), _ = load_examples(table, tokenizer, max_len=128, source="m.parquet")
    assert example.targets == [bool(v) for v in mask] and example.weight == 2.5


@pytest.mark.model
def test_calibrated_checkpoint_reproduces_the_adapter(chats_parquet: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "calibrated"
    config = _config(chats_parquet, tiny_model_dir, out, fraction=0.5, epochs=2)
    model, tokenizer, _ = train(config, progress=False)  # the adapter, before merging
    model.save_pretrained(tmp_path / "adapter")
    run_calibrate(config, progress=False)  # same seed and data: the same adapter, merged and saved
    ids = torch.tensor([tokenize_chat(tokenizer, _chats(20)[19]["messages"]).token_ids])
    with torch.no_grad():
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter").eval()
        adapter_logp = adapter(ids).logits[0].log_softmax(-1)
        merged_logp = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits[0].log_softmax(-1)
        base_logp = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits[0].log_softmax(-1)
    assert (adapter_logp - merged_logp).abs().max() < 1e-4
    assert (adapter_logp - base_logp).abs().max() > 1e-2  # the calibration did change the model
    pytest.importorskip("vllm")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(str(out), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.1, max_model_len=512)
    result = llm.generate([TokensPrompt(prompt_token_ids=ids[0].tolist())], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    prompt_logprobs = result[0].prompt_logprobs
    for t in range(1, ids.shape[1]):
        token = int(ids[0, t])
        assert prompt_logprobs[t][token].logprob == pytest.approx(float(adapter_logp[t - 1, token]), abs=2e-3)


def test_gradient_accumulation_does_not_change_the_loss_or_the_gradient(chats_parquet: Path, tiny_model_dir: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """One step over 8 examples: a micro-batch of 8, or 4 micro-batches of 2 accumulated, gives the same loss and
    the same gradient at the optimizer step (normalised by the step's trained tokens, not per micro-batch)."""
    gradients: list[list[torch.Tensor]] = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        gradients.append([p.grad.clone() for group in self.param_groups for p in group["params"] if p.grad is not None])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    losses = []
    for batch_size, grad_accum in ((8, 1), (2, 4)):
        _, _, summary = train(_config(chats_parquet, tiny_model_dir, tmp_path, lora_r=0, batch_size=batch_size,
                                      grad_accum=grad_accum, max_steps=1), progress=False)
        losses.append(summary["log"][0]["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    whole, accumulated = gradients
    scale = max(float(g.abs().max()) for g in whole)
    assert all(torch.allclose(a, b, atol=1e-5 * scale) for a, b in zip(whole, accumulated))


def test_train_eval_reports_answer_nll_and_grades_numbers_and_choices(tiny_model_dir: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import train.evaluate

    rows = _chats(2) + [{"example_id": "mc", "reference_answer": "C", "messages": [
        {"role": "user", "content": "Which is largest?\nA) 1\nB) 2\nC) 3"}, {"role": "assistant", "content": "Answer: C"}]}]
    data = write_parquet(tmp_path / "heldout.parquet", rows)
    completions = {"What is 2 plus 3?": "2 plus 3 is 5.\n#### 5", "What is 3 plus 4?": "#### 8", "Which is largest?": "The answer is (C)."}
    monkeypatch.setattr(train.evaluate, "generate_greedy", lambda model_dir, model, tokenizer, prompts, **_: (
        [next(v for k, v in completions.items() if p[-1]["content"].startswith(k)) for p in prompts], "stub"))
    metrics = train.evaluate.evaluate(str(tiny_model_dir), str(data))
    assert metrics["correct"] == 2 and metrics["with_reference"] == 3 and metrics["accuracy"] == pytest.approx(2 / 3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = []
    for row in rows:  # teacher-forced NLL of the response tokens, by hand
        chat = tokenize_chat(tokenizer, row["messages"])
        ids = torch.tensor([chat.token_ids])
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
        expected.append(float(-logp[torch.tensor(chat.is_response[1:])].mean()))
    assert metrics["mean_answer_nll"] == pytest.approx(sum(expected) / len(expected), abs=1e-4)


def test_a_failed_run_leaves_no_checkpoint_folder(chats_parquet: Path, tiny_model_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import train.sft

    out = tmp_path / "calibrated"

    def dies(*args, **kwargs):
        raise KeyboardInterrupt  # killed after training, while the checkpoint is being written

    monkeypatch.setattr(train.sft, "write_run_files", dies)
    with pytest.raises(KeyboardInterrupt):
        run_calibrate(_config(chats_parquet, tiny_model_dir, out, fraction=0.5, max_steps=1), progress=False)
    assert not out.exists() and not list(tmp_path.glob(".calibrated*"))  # nothing a scorer could load, no leftovers
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not a train output"):
        run_sft(_config(chats_parquet, tiny_model_dir, tmp_path / "mine", max_steps=1), progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_the_online_methods_train_the_forks_reply_slot_and_plain_sft_the_reply_and_its_end_of_turn(smollm2_tokenizer_dir: Path) -> None:
    """span=slot (the EKSFT and Q-Tuning forks' `{content}<|im_end|>\\n`, what --method eksft|qtuning train by
    default) adds the newline after each end-of-turn token; content_eot (plain SFT's default) stops at it."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    from train.sft import _resolved_span

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    table = pa.table({"messages": [messages]})

    def trained(span: str) -> str:
        (example,), _ = load_examples(table, tokenizer, max_len=256, source="t", span=span)
        return "|".join(tokenizer.decode([t]) for t, on in zip(example.input_ids, example.targets) if on)

    assert trained("content_eot") == "4|<|im_end|>|6|<|im_end|>"
    assert trained("slot") == "4|<|im_end|>|\n|6|<|im_end|>|\n"
    assert [_resolved_span(TrainConfig(data="d", model="m", out="o", method=m)) for m in ("sft", "eksft", "qtuning")] == \
        ["content_eot", "slot", "slot"]
    assert _resolved_span(TrainConfig(data="d", model="m", out="o", method="eksft", span="content_eot")) == "content_eot"


def test_a_model_that_is_no_folder_and_not_on_the_hub_is_named_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from train.sft import load_tokenizer

    import huggingface_hub.constants

    # no network wait: the hub lookup fails at once (huggingface_hub reads HF_HUB_OFFLINE when it is imported, so
    # the environment variable alone, set now, would leave ~45 s of retries against an unreachable hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"--model smollm2-typo: no such folder.*curate models pull smollm2-typo"):
        load_tokenizer("smollm2-typo")

"""Our output head against each listed architecture's own logits (tiny models built from configs), and pair
KL at the default bf16 precision against the float32 reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from curate.models.head import ARCHITECTURES, OutputHead, load_head, pair_signals, token_signals

SMALL = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 128}
# architecture -> (model type, what makes its logits special)
CONFIGS = {
    "LlamaForCausalLM": ("llama", {"tie_word_embeddings": False}),  # untied lm_head
    "MistralForCausalLM": ("mistral", {}),
    "Qwen2ForCausalLM": ("qwen2", {"tie_word_embeddings": True}),
    "Qwen3ForCausalLM": ("qwen3", {}),
    "Phi3ForCausalLM": ("phi3", {"pad_token_id": 0}),
    "Olmo2ForCausalLM": ("olmo2", {"pad_token_id": 0}),
    "GemmaForCausalLM": ("gemma", {}),
    "Gemma2ForCausalLM": ("gemma2", {"final_logit_softcapping": 5.0, "attn_logit_softcapping": None}),  # soft-capping
    "Gemma3ForCausalLM": ("gemma3_text", {"final_logit_softcapping": 5.0}),
    "GraniteForCausalLM": ("granite", {"logits_scaling": 4.0}),  # logits divided
    "CohereForCausalLM": ("cohere", {"logit_scale": 0.25}),  # logits multiplied
}


def test_every_listed_architecture_is_tested() -> None:
    assert set(CONFIGS) == set(ARCHITECTURES)


def _tiny(architecture: str, folder: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, special = CONFIGS[architecture]
    config = AutoConfig.for_model(model_type, **SMALL, **special)
    config.architectures = [architecture]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # make the logits large enough for scaling and soft-capping to matter
        for name, parameter in model.named_parameters():
            if "embed" in name or "lm_head" in name:
                parameter.mul_(20.0)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("architecture", sorted(CONFIGS))
def test_our_head_reproduces_the_architectures_logits(architecture: str, tmp_path: Path) -> None:
    model = _tiny(architecture, tmp_path)
    head = load_head(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = getattr(model, model.base_model_prefix)(input_ids=ids).last_hidden_state[0]
        expected = model(input_ids=ids).logits[0].float().log_softmax(-1)
    signals = token_signals(hidden, ids[0], head, top_k=3)
    targets = ids[0, 1:]
    assert torch.allclose(signals.logprob, expected[:-1].gather(1, targets[:, None])[:, 0], atol=1e-4), architecture
    assert torch.allclose(signals.entropy, -(expected[:-1].exp() * expected[:-1]).sum(-1), atol=1e-4), architecture
    assert torch.equal(signals.top_ids, expected[:-1].topk(3, dim=-1).indices)
    plain = (hidden @ head.weight.T).log_softmax(-1)  # the weight alone, without the architecture's rule
    if head.multiplier != 1.0 or head.softcap:
        assert (plain - expected).abs().max() > 1e-2, f"{architecture}: the test would not see a missing logit rule"


def test_pair_kl_at_the_default_bf16_tracks_float32(tmp_path: Path) -> None:
    """KL(calibrated ‖ base) from bf16 heads (fp32 recomputation of the likely logits) against all-fp32 math."""
    base_model = _tiny("LlamaForCausalLM", tmp_path / "base")
    calibrated_model = _tiny("LlamaForCausalLM", tmp_path / "calibrated")
    with torch.no_grad():
        for parameter in calibrated_model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    calibrated_model.save_pretrained(tmp_path / "calibrated")
    ids = torch.randint(0, SMALL["vocab_size"], (40,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = [getattr(m, m.base_model_prefix)(input_ids=ids[None]).last_hidden_state[0] for m in (base_model, calibrated_model)]
    exact = pair_signals(*hidden, ids, load_head(tmp_path / "base", dtype=torch.float32), load_head(tmp_path / "calibrated", dtype=torch.float32))
    heads = [load_head(tmp_path / name, dtype=torch.bfloat16) for name in ("base", "calibrated")]
    rounded = [h.bfloat16().float() for h in hidden]  # what a bf16 engine hands over
    bf16 = pair_signals(*rounded, ids, *heads)
    same_inputs = pair_signals(*rounded, ids, *(OutputHead(h.weight.float(), h.multiplier, h.softcap) for h in heads))
    assert exact.kl.mean() > 1e-3  # the two models differ
    # the head's own bf16 math (fp32 recomputation of the likely logits) against fp32 math on the same bf16 inputs
    assert (bf16.kl - same_inputs.kl).abs().max() < 2e-3 and (bf16.log_ratio - same_inputs.log_ratio).abs().max() < 1e-2
    # and the whole bf16 path (hidden states rounded too) against the float32 reference
    assert (bf16.kl - exact.kl).abs().max() < 1e-2 and (bf16.log_ratio - exact.log_ratio).abs().max() < 5e-2
    assert bf16.kl.min() > -1e-3  # a KL stays non-negative up to rounding

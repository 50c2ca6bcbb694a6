"""Packed micro-batches: a micro-batch's examples laid end to end in one row, with no padding, each attending
only to itself, and the output head run only where a trained token is predicted.

- Position ids restart at 0 for every example, so rotary embeddings see each one as they would alone.
- Attention runs per example: while a packed micro-batch is trained, the model's ``sdpa`` attention is swapped
  for one that splits the row at the examples' boundaries (the ``cu_seq_lens`` of flash-attention's varlen
  kernels, here plain offsets) and runs torch's scaled-dot-product attention, causal, on each piece. No
  position attends across a boundary and no [L, L] work is spent on pairs of different examples. Called
  without boundaries (evaluation, padded batches) it is transformers' own ``sdpa``, mask and all.
- The head (the model's output embeddings, with whatever the architecture does to its logits afterwards)
  sees only the hidden states that predict trained tokens: on GSM8K chats that skips ~40% of the vocabulary
  projection and of the [positions, vocabulary] log-softmax, which are a large share of a small model's step.

Each trained token's logits are then those of its example alone, as in a padded batch, up to float rounding
(tests/test_train.py checks the per-token losses and the gradients against padded batches).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from train.data import TrainExample
from train.objectives import Objective

PACKED_ATTENTION = "curate_packed_sdpa"


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, L]: the micro-batch's examples end to end, L = their total length
    position_ids: torch.Tensor  # [1, L]: 0.. within each example
    bounds: tuple[int, ...]  # the examples' start offsets and the end: (0, n1, n1 + n2, ..., L)
    predictors: torch.Tensor  # [K]: the positions whose logits predict a trained token (t - 1 for target t)
    labels: torch.Tensor  # [K]: those trained tokens
    weights: torch.Tensor  # [K]: each trained token's example weight

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[1])


def pack(micro: list[TrainExample], *, device: str) -> PackedBatch:
    """One row holding every example of ``micro`` in order, with what the loss needs at its trained tokens."""
    ids, positions, predictors, labels, weights, bounds = [], [], [], [], [], [0]
    for example in micro:
        start, n = bounds[-1], len(example.input_ids)
        ids += example.input_ids
        positions += range(n)
        trained = [t for t in range(1, n) if example.targets[t]]  # targets[0] is always False
        predictors += [start + t - 1 for t in trained]
        labels += [example.input_ids[t] for t in trained]
        weights += [example.weight] * len(trained)
        bounds.append(start + n)
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return PackedBatch(as_long(ids)[None], as_long(positions)[None], tuple(bounds), as_long(predictors), as_long(labels),
                       torch.tensor(weights, dtype=torch.float32, device=device))


def packed_nll(model: Any, batch: PackedBatch) -> torch.Tensor:
    """-log p of each trained token [K] (float32, with grad), from one forward pass over the packed row."""
    with head_only_at(model, batch.predictors):
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, packed_bounds=batch.bounds).logits
    return torch.nn.functional.cross_entropy(logits.float(), batch.labels, reduction="none")


def packed_sft_objective(nll: torch.Tensor, weights: torch.Tensor) -> Objective:
    """Plain SFT on a packed micro-batch: weight x NLL summed over its trained tokens ([K] each; ``sft_objective``
    over a flat list of trained tokens), divided by the optimizer step's trained tokens."""
    count = int(nll.shape[0])
    return Objective((nll * weights).sum(), count, torch.ones_like(nll, dtype=torch.bool), {"targets": count, "kept_tokens": count})


@contextlib.contextmanager
def head_only_at(model: Any, positions: torch.Tensor) -> Iterator[None]:
    """Within the block, the model's output head is applied to the hidden states of row 0 at ``positions`` only:
    its logits come back [K, vocabulary]. Logit scaling or soft-capping after the head is elementwise, so it
    applies unchanged."""
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda _, args: (args[0][0, positions], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def packed_attention(model: Any) -> Iterator[bool]:
    """Within the block the model attends per packed example (yields True), or, if its attention is not
    transformers' ``sdpa``, nothing changes and it yields False (train with padded batches then)."""
    config = model.config
    if config._attn_implementation != "sdpa":
        yield False
        return
    _register()
    model.set_attn_implementation(PACKED_ATTENTION)
    try:
        yield True
    finally:
        model.set_attn_implementation("sdpa")  # saved checkpoints name the standard implementation


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)  # unpacked calls get sdpa's masks


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, *, packed_bounds: tuple[int, ...] | None = None,
               **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention on each packed example [.., begin:end, ..] of row 0, causal; without
    ``packed_bounds``, sdpa itself. query/key/value [1, heads, L, head_dim]; returns [1, L, heads, head_dim]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    pieces = [sdpa_attention_forward(module, query[:, :, begin:end], key[:, :, begin:end], value[:, :, begin:end], None,
                                     is_causal=True, **kwargs)[0]
              for begin, end in zip(packed_bounds[:-1], packed_bounds[1:])]
    return torch.cat(pieces, dim=1), None

"""Run axolotl's own data path on a curate export, from inside the export folder (its `axolotl.yml` names the
data relative to it): load_cfg (validation and normalisation) and load_datasets (the pre-tokenized detection,
the long-sequence and zero-trainable-token filters and, with sample_packing, the packing preparation). With
sample_packing it then draws batches the way axolotl's trainer does: MultipackBatchSampler over the
dataset's lengths (sequential and keeping the last batch, so every row is counted once, where the trainer
shuffles and drops it) and V2BatchSamplerDataCollatorForSeq2Seq (the collator axolotl picks for llama without flash
attention, with the DataLoader patch axolotl applies for it), padding as its builder asks; without packing, axolotl's
DataCollatorForSeq2Seq over plain batches. Runs in its own process with axolotl's pinned packages first on
sys.path (tests/test_loaders.py); writes what it loaded as JSON.

usage: python axolotl_load.py MODEL_DIR WORK_DIR RESULT_JSON   (run with the export folder as cwd)
"""

from __future__ import annotations

import json
import math
import sys
from importlib.metadata import version
from pathlib import Path

SEQUENCE_LEN = 256  # short bins (2 x 256 tokens per packed batch): our 11 rows need several
MICRO_BATCH = 2


def load(model: str, work: Path, packing: bool) -> dict:
    import torch
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.utils.collators import DataCollatorForSeq2Seq, V2BatchSamplerDataCollatorForSeq2Seq
    from axolotl.loaders import load_tokenizer
    from axolotl.monkeypatch.data.batch_dataset_fetcher import apply_multipack_dataloader_patch
    from axolotl.utils.samplers import MultipackBatchSampler, get_dataset_lengths

    tag = "packed" if packing else "plain"
    cfg = load_cfg("axolotl.yml", base_model=model, sequence_len=SEQUENCE_LEN, sample_packing=packing, micro_batch_size=MICRO_BATCH,
                   gradient_accumulation_steps=1, num_epochs=1, learning_rate=1e-4, output_dir=str(work / f"out-{tag}"),
                   dataset_prepared_path=str(work / f"prepared-{tag}"), dataset_num_proc=1, strict=False)
    meta = load_datasets(cfg=cfg)
    dataset = meta.train_dataset
    tokenizer = load_tokenizer(cfg)
    multiple = 64  # axolotl's builder: pad_to_multiple_of 64 x ceil(sequence_len / 64) with pad_to_sequence_len
    pad_to = multiple * math.ceil(SEQUENCE_LEN / multiple) if cfg.pad_to_sequence_len else multiple
    if packing:
        apply_multipack_dataloader_patch()  # as axolotl's PatchManager does with sample_packing: bins of indices per batch
        sampler = MultipackBatchSampler(torch.utils.data.SequentialSampler(dataset), lengths=get_dataset_lengths(dataset),
                                        packing_efficiency_estimate=cfg.sample_packing_eff_est or 1.0,
                                        batch_max_len=MICRO_BATCH * SEQUENCE_LEN, batch_size=1,
                                        group_size=cfg.sample_packing_group_size, bin_size=cfg.sample_packing_bin_size,
                                        sequential=bool(cfg.sample_packing_sequentially), drop_last=False, num_processes=1)
        collator = V2BatchSamplerDataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=pad_to, return_tensors="pt")
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=pad_to, return_tensors="pt")
        loader = torch.utils.data.DataLoader(dataset, batch_size=MICRO_BATCH, collate_fn=collator)
    batches, sequences, trained = 0, 0, 0
    for batch in loader:
        batches += 1
        mask = batch["attention_mask"]  # packed: segment k of a row holds k (1, 2, ...); plain: 1 per real token
        sequences += int(mask.max(dim=1).values.sum()) if packing else mask.shape[0]
        trained += int((batch["labels"] != -100).sum())
    return {"packing": packing, "rows": len(dataset), "columns": dataset.column_names, "batches": batches,
            "sequences_in_batches": sequences, "trained_tokens_in_batches": trained,
            "labels": [list(r) for r in dataset["labels"]], "input_ids": [list(r) for r in dataset["input_ids"]]}


def main(model: str, work: str, result: str) -> None:
    runs = [load(model, Path(work), packing) for packing in (True, False)]
    with open(result, "w", encoding="utf-8") as handle:
        json.dump({"versions": {p: version(p) for p in ("axolotl", "transformers", "datasets")}, "runs": runs}, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])

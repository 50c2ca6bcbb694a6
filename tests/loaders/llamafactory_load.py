"""Run LLaMA-Factory's own data path on a curate export, as `llamafactory-cli train` does before it loads the
model: get_train_args, load_tokenizer, get_template_and_fix_tokenizer, then get_dataset (the dataset_info.json
parser, the ShareGPT aligner and the supervised processor). Runs in its own process with LLaMA-Factory's pinned
packages first on sys.path (tests/test_loaders.py); writes what it loaded as JSON.

usage: python llamafactory_load.py MODEL_DIR EXPORT_DIR DATASET_NAME OUTPUT_DIR RESULT_JSON
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version


def main(model: str, dataset_dir: str, name: str, output_dir: str, result: str) -> None:
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    model_args, data_args, training_args, _, _ = get_train_args({
        "model_name_or_path": model, "stage": "sft", "do_train": True, "finetuning_type": "full", "template": "smollm2",
        "dataset": name, "dataset_dir": dataset_dir, "cutoff_len": 2048, "output_dir": output_dir, "overwrite_cache": True,
        "report_to": "none", "use_cpu": True})
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    dataset = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)["train_dataset"]
    with open(result, "w", encoding="utf-8") as handle:
        json.dump({"versions": {p: version(p) for p in ("llamafactory", "transformers", "datasets")},
                   "columns": dataset.column_names, "default_system": template.default_system,
                   "rows": [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in dataset]}, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])

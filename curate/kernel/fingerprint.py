"""Model fingerprints: a hash of everything in a checkpoint folder that decides the numbers a model gives.

Hashed, whole: ``config.json``, ``generation_config.json``, every weights file (``*.safetensors``,
``*.bin``, ``*.pt``, ``*.gguf``) and every tokenizer file (``tokenizer.json``, ``tokenizer_config.json`` with
its chat template, ``special_tokens_map.json``, ``added_tokens.json``, ``vocab.json``, ``merges.txt``,
``tokenizer.model``, ``chat_template.jinja`` / ``chat_template.json``). Each file's SHA-256 is computed
once and cached by (path, size, modification time) in ``$CURATE_MODELS/../fingerprints.json``, so a
fingerprint of an unchanged 15 GB checkpoint costs a few ``stat`` calls after the first time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from curate.kernel.atomic import write_atomic_text

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
DECIDING_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
CACHE_ENV = "CURATE_MODELS"


def deciding_files(model_dir: str | Path) -> list[Path]:
    """The files of a checkpoint folder that decide its outputs, in a stable order."""
    directory = Path(model_dir)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a model checkpoint (no config.json)")
    files = [directory / name for name in DECIDING_FILES if (directory / name).is_file()]
    files += sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return files


def model_fingerprint(model_dir: str | Path) -> str:
    """16 hex digits over the names and SHA-256 of the deciding files."""
    cache = _Cache.load()
    digest = hashlib.sha256()
    for file in deciding_files(model_dir):
        digest.update(f"{file.name}:{cache.sha256(file)}\n".encode())
    cache.save()
    return digest.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def cache_path() -> Path:
    models = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "curate" / "models").expanduser()
    return models.parent / "fingerprints.json"


class _Cache:
    def __init__(self, path: Path, entries: dict[str, list]) -> None:
        self.path, self.entries, self.changed = path, entries, False

    @classmethod
    def load(cls) -> "_Cache":
        path = cache_path()
        try:
            entries = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            entries = {}
        return cls(path, entries if isinstance(entries, dict) else {})

    def sha256(self, file: Path) -> str:
        stat = file.stat()
        key = str(file.resolve())
        known = self.entries.get(key)
        if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return known[2]
        value = file_sha256(file)
        self.entries[key] = [stat.st_size, stat.st_mtime_ns, value]
        self.changed = True
        return value

    def save(self) -> None:
        if not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic_text(self.path, json.dumps(self.entries))
        except OSError:
            pass  # a read-only cache folder only costs re-hashing next time


def table_fingerprint(path: str | Path) -> str:
    """16 hex digits over the names, sizes and modification times of the Parquet files under ``path``: cheap,
    and it changes whenever a part is added, removed or rewritten."""
    root = Path(path)
    files = sorted(root.rglob("*.parquet")) if root.is_dir() else [root]
    digest = hashlib.sha256()
    for file in files:
        if file.name.startswith(".") or not file.is_file():
            continue
        stat = file.stat()
        digest.update(f"{file.relative_to(root) if root.is_dir() else file.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]

"""Content digests of a command's inputs: resumable writers (pairs, evaluate) store them beside their work and refuse
a rerun whose inputs changed, naming which, instead of silently mixing old and new work."""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
LARGE = 1 << 28  # files above 256 MiB (model weights) are keyed by size and modification time, not read


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes; for a large weight file its size and modification time (reading GBs to key a
    rerun costs more than it protects: a changed checkpoint is re-downloaded, which changes both)."""
    path = Path(path)
    stat = path.stat()
    if path.suffix in WEIGHT_SUFFIXES and stat.st_size > LARGE:
        return f"size={stat.st_size},mtime={int(stat.st_mtime)}"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def path_digest(path: str | Path | None) -> str | None:
    """:func:`file_digest` of a file, or one digest over a folder's files (names and digests); None for no path."""
    if not path or not Path(path).exists():
        return None
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    parts = [f"{p.relative_to(path)}:{file_digest(p)}" for p in sorted(path.rglob("*")) if p.is_file()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def input_digests(named: dict[str, str | Path | None]) -> dict[str, str | None]:
    """``{name: digest}`` for named input paths (files or folders)."""
    return {name: path_digest(path) for name, path in named.items()}


def changed_inputs(old: dict, new: dict) -> list[str]:
    return sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))

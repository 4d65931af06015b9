"""Content digests of a command's inputs: resumable writers (pairs, evaluate) store them beside their work and refuse
a rerun whose inputs changed, naming which, instead of silently mixing old and new work."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from focusdpo.atomic import atomic_write_text

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


# Inputs that belong to one part of the work (an entry's reference image, a variant's LoRA): a rerun over more or
# fewer entries or variants leaves the other parts' work valid, so they are compared only where both runs used them.
PART_INPUTS = ("reference ", "lora ")

RECORD_NAME = "run_settings.json"  # a resumable writer's settings and input digests, inside its output folder


def changed_inputs(old: dict, new: dict) -> list[str]:
    """Names of the inputs whose digest differs (a part's input only when both runs used it)."""
    def compared(name: str) -> bool:
        return not name.startswith(PART_INPUTS) or (name in old and name in new)
    return sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name) and compared(name))


def flat(settings: dict, prefix: str = "") -> dict:
    """Nested settings as ``{"sampling.steps": 3, ...}``, so a change is named down to the field."""
    out = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        out.update(flat(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return out


def changed_settings(old: dict, new: dict) -> list[str]:
    """``name (old → new)`` for each setting of ``new`` that ``old`` records otherwise (input digests excluded:
    :func:`changed_inputs` compares those)."""
    old = flat({k: v for k, v in old.items() if k != "inputs"})
    new = flat({k: v for k, v in new.items() if k != "inputs"})
    return [f"{name} ({shown(old.get(name))} → {shown(new[name])})" for name in sorted(new)
            if old.get(name) != new[name]]


def shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def as_json(record: dict) -> dict:
    """``record`` as it reads back from its file (tuples become lists, other objects their text)."""
    return json.loads(json.dumps(record, sort_keys=True, default=str))


def recorded(out: str | Path) -> dict | None:
    path = Path(out) / RECORD_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def check_record(out: str | Path, record: dict, error: type[Exception], holds: str, fix: str) -> None:
    """Refuse to resume into ``out`` when the settings or input digests it recorded differ from ``record`` (its
    settings, and ``inputs``: name → digest), naming each change: its work was made from something else, and a
    resume would silently mix the two. ``holds`` says what ``out`` holds, ``fix`` the option to write elsewhere.

    Only the settings ``record`` names are compared, so a check before the models load can pass part of them."""
    old = recorded(out)
    if old is None:
        return
    record = as_json(record)
    changed = changed_settings(old, record) + changed_inputs(old.get("inputs", {}), record.get("inputs", {}))
    if changed:
        shown_changes = "; ".join(changed[:5]) + ("; ..." if len(changed) > 5 else "")
        raise error(f"{out} holds {holds} made with other settings or inputs (changed: {shown_changes}): write to "
                    f"a new {fix}, or delete {out} to start over")


def write_record(out: str | Path, record: dict) -> None:
    """Store ``record`` in ``out`` (atomic), keeping the digests of parts this run did not use: a later run over
    them is still checked against what made their work."""
    old = recorded(out) or {}
    record = as_json(record)
    record["inputs"] = {**old.get("inputs", {}), **record.get("inputs", {})}
    atomic_write_text(Path(out) / RECORD_NAME, json.dumps(record, sort_keys=True, indent=1) + "\n")

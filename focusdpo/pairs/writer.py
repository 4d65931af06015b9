"""Incremental, resumable output of the pair generator: shards, the merged dataset, the summary.

Layout of ``out/``::

    shards/item-000012-r1/   one shard: pairs/ (save_to_disk, its kept pairs, if any) + items.json (every item it
                             covers, kept or not, with status and reason), moved into place atomically
    dataset/                 the merged pairs (save_to_disk), rows ordered by prompt-entry index
    summary.json             kept / dropped / failed counts and every non-kept item with its reason

An item is finished once a shard lists it, so a killed run restarted skips exactly those items: nothing written
is lost or duplicated, at most ``items_per_shard`` items per process are redone. Processes write disjoint shards.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

from datasets import Dataset, Features, List, Value, concatenate_datasets, load_from_disk

from focusdpo.data.schema import PAIR_FEATURES, SUBJECT_SCORES_FEATURE
from focusdpo.errors import PairGenError
from focusdpo.provenance import changed_inputs

META_FEATURES = {
    "item_index": Value("int64"), "classes": List(Value("string")), "chosen_seed": Value("int64"),
    "rejected_seed": Value("int64"), "candidate_seeds": List(Value("int64")),
    "candidate_scores": List(Value("float64")), "score_parts": Value("string"), "margin": Value("float64"),
    "strategy": Value("string"), "subject_scores": SUBJECT_SCORES_FEATURE,
}

GENERATED_FEATURES = Features({**PAIR_FEATURES, **META_FEATURES})

STATUSES = ("kept", "dropped_margin", "dropped_dip", "failed", "skipped")


def shard_dir(out: Path) -> Path:
    return Path(out) / "shards"


def finished_items(out: Path) -> dict[str, dict]:
    """``item_id → record`` of every item a complete shard lists (half-written staging folders don't count)."""
    records = {}
    for shard in sorted(shard_dir(out).glob("item-*")):
        for record in json.loads((shard / "items.json").read_text()):
            records[record["item_id"]] = record
    return records


class ShardWriter:
    """Buffers finished items of one process and writes them as shards of ``flush_every`` items."""

    def __init__(self, out: str | Path, rank: int, flush_every: int):
        self.root, self.rank, self.flush_every = shard_dir(Path(out)), rank, flush_every
        self.root.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        self.rows: list[dict] = []

    def add(self, record: dict, rows: list[dict]) -> None:
        self.records.append(record)
        self.rows += rows
        if len(self.records) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the buffer as one shard: staged beside its final name, then renamed (atomic)."""
        if not self.records:
            return
        name = f"item-{self.records[0]['item_index']:06d}-r{self.rank}"
        staging = self.root / f".staging-{name}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        if self.rows:  # datasets cannot load an empty saved dataset: a shard without pairs has items.json only
            Dataset.from_list(self.rows, features=GENERATED_FEATURES).save_to_disk(str(staging / "pairs"))
        (staging / "items.json").write_text(json.dumps(self.records, indent=1))
        os.replace(staging, self.root / name)
        self.records, self.rows = [], []


def check_run_settings(out: str | Path, settings: dict, write: bool) -> None:
    """Refuse to resume into ``out`` when it holds a run made with other settings (its pairs would mix).

    ``write``: record ``settings`` when ``out`` has none yet (the main process, before the others check).
    """
    path = Path(out) / "run_settings.json"
    text = json.dumps(settings, sort_keys=True, indent=1, default=str)
    if write and not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text(text)
        os.replace(path.with_suffix(".tmp"), path)
    if path.is_file() and path.read_text() != text:
        old, new = json.loads(path.read_text()), json.loads(text)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise PairGenError(f"{out} holds a pair run made with other settings (changed: {changed}); resume with the "
                           "same recipe, or write to a new out folder")


def check_run_inputs(out: str | Path, inputs: dict) -> None:
    """Refuse, before any model loads, to resume into ``out`` when what its pairs were made from changed (an edited
    prompt file, another reference photo, another model or LoRA under the same name)."""
    path = Path(out) / "run_settings.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text()).get("inputs", {})
    changed = changed_inputs(old, inputs)
    if changed:
        raise PairGenError(f"{out} holds pairs made from other inputs (changed: {', '.join(changed[:5])}"
                           f"{', ...' if len(changed) > 5 else ''}): write to a new out folder, or delete {out} to "
                           "start over")


def merge_shards(out: str | Path, provenance: dict) -> Dataset | None:
    """All shards' pairs as one dataset in ``out/dataset`` (ordered by item index); None when no pair was kept."""
    out = Path(out)
    parts = [load_from_disk(str(s / "pairs")) for s in sorted(shard_dir(out).glob("item-*")) if (s / "pairs").is_dir()]
    if not parts:
        return None
    merged = concatenate_datasets(parts)
    order = sorted(range(len(merged)), key=merged["item_index"].__getitem__)
    merged = merged.select(order).flatten_indices()  # rows in entry order, written as such (no index map)
    merged.info.description = json.dumps(provenance, sort_keys=True)
    staging = out / ".staging-dataset"
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_to_disk(str(staging))
    shutil.rmtree(out / "dataset", ignore_errors=True)
    os.replace(staging, out / "dataset")
    return merged


def write_summary(out: str | Path, records: dict[str, dict], skipped: list[tuple[str, str]]) -> dict:
    """Counts per status and every item that was not kept, with its reason; also ``out/summary.json``."""
    rows = sorted(records.values(), key=lambda r: r["item_index"])
    rows += [{"item_id": item_id, "item_index": -1, "status": "skipped", "reason": reason}
             for item_id, reason in skipped]
    counts = Counter(r["status"] for r in rows)
    summary = {"counts": {s: counts.get(s, 0) for s in STATUSES}, "total": len(rows),
               "not_kept": [{k: r[k] for k in ("item_id", "status", "reason")} for r in rows if r["status"] != "kept"]}
    path = Path(out) / "summary.json"
    path.with_suffix(".tmp").write_text(json.dumps(summary, indent=1))
    os.replace(path.with_suffix(".tmp"), path)
    return summary

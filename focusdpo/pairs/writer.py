"""Incremental, resumable output of the pair generator: shards, the merged dataset, the summary.

Layout of ``out/``::

    shards/item-000012-r1/   one shard: pairs/ (save_to_disk, its kept pairs, if any) + items.json (every item it
                             covers, kept or not, with status and reason), moved into place atomically
    dataset/                 the merged pairs (save_to_disk), rows ordered by prompt-entry index
    summary.json             kept / dropped / failed counts and every non-kept item with its reason
    run_settings.json        the settings and input digests the pairs were made with (focusdpo.provenance): a
                             resume with other ones is refused before any model loads

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

from focusdpo.atomic import atomic_write_text, disk_full_names
from focusdpo.data.schema import PAIR_FEATURES, SUBJECT_SCORES_FEATURE

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
        with disk_full_names(self.root):
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
        with disk_full_names(self.root, staging):
            staging.mkdir()
            if self.rows:  # datasets cannot load an empty saved dataset: a shard without pairs has items.json only
                Dataset.from_list(self.rows, features=GENERATED_FEATURES).save_to_disk(str(staging / "pairs"))
            (staging / "items.json").write_text(json.dumps(self.records, indent=1))
        os.replace(staging, self.root / name)
        self.records, self.rows = [], []


def merge_shards(out: str | Path, provenance: dict, indices: set[int]) -> Dataset | None:
    """The pairs of the entries ``indices`` as one dataset in ``out/dataset`` (ordered by entry); None when none
    of them kept a pair. Shards of other entries (a longer earlier run: ``max_items`` shrank) stay unused."""
    out = Path(out)
    parts = [load_from_disk(str(s / "pairs")) for s in sorted(shard_dir(out).glob("item-*")) if (s / "pairs").is_dir()]
    if not parts:
        return None
    merged = concatenate_datasets(parts)
    entry = list(merged["item_index"])
    order = sorted((row for row in range(len(merged)) if entry[row] in indices), key=entry.__getitem__)
    if not order:
        return None
    merged = merged.select(order).flatten_indices()  # rows in entry order, written as such (no index map)
    merged.info.description = json.dumps(provenance, sort_keys=True)
    staging = out / ".staging-dataset"
    shutil.rmtree(staging, ignore_errors=True)
    with disk_full_names(out, staging):
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
    atomic_write_text(Path(out) / "summary.json", json.dumps(summary, indent=1))
    return summary

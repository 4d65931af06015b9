"""Pairs stored the way the Hugging Face hub stores them: parquet folders with split names, the hub itself,
and Pick-a-Pic's layout.

A parquet source is told apart by its columns, never by its name: ``jpg_0``/``jpg_1``/``label_0``/``caption``
is Pick-a-Pic (converted to the pair schema), ``prompt``/``chosen``/``rejected`` is already the pair schema.
Parquet is read through ``datasets`` (the folder builder resolves ``data/train-*.parquet`` into splits), which
writes one arrow copy into the datasets cache; a second load of the same files reuses it and writes nothing.
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import datasets
import pyarrow.parquet as pq
from datasets import Dataset, Features, load_dataset, load_dataset_builder

from focusdpo.data.schema import PAIR_FEATURES
from focusdpo.errors import PairDataError

PICKAPIC_COLUMNS = ("jpg_0", "jpg_1", "label_0", "caption")

PAIR_COLUMNS = ("prompt", "chosen", "rejected")

PICKAPIC_LABELS = (0, 0.5, 1)

HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def parquet_files(path: Path, split: str) -> list[str]:
    """The parquet files of ``split``: a single file is its own (only) split; a folder is resolved by the
    datasets folder builder (``data/train-*.parquet``, ``train.parquet``...; unnamed files are 'train')."""
    if path.is_file():
        if split != "train":
            raise PairDataError(f"dataset {str(path)!r} is a single parquet file, which holds only the 'train' "
                                f"split, but dataset_split is {split!r}")
        return [str(path)]
    data_files = load_dataset_builder(str(path)).config.data_files
    if split not in data_files:
        raise PairDataError(f"dataset {str(path)!r} has no split {split!r}; its splits are {sorted(data_files)}: "
                            "set dataset_split to one of them")
    return sorted(str(f) for f in data_files[split])


def parquet_format(files: list[str], source: str) -> str:
    """'pickapic' or 'parquet' (the pair schema), from the columns of the first file."""
    columns = pq.read_schema(files[0]).names
    if all(c in columns for c in PICKAPIC_COLUMNS):
        return "pickapic"
    if all(c in columns for c in PAIR_COLUMNS):
        return "parquet"
    raise PairDataError(f"{files[0]} (dataset {source!r}) has columns {columns}: neither the pair schema "
                        f"({list(PAIR_COLUMNS)}) nor Pick-a-Pic ({list(PICKAPIC_COLUMNS)})")


def load_parquet_pairs(path: Path, split: str = "train", fmt: str = "auto") -> Dataset:
    """Pair-schema or Pick-a-Pic parquet (a file, or a folder with split-named files) as a Dataset."""
    files = parquet_files(path, split)
    fmt = parquet_format(files, str(path)) if fmt == "auto" else fmt
    if fmt == "pickapic":
        return import_pickapic(files, str(path))
    return load_dataset("parquet", data_files={split: files}, split=split)


def looks_like_hub_id(source: str) -> bool:
    return bool(HUB_ID.match(source)) and not source.startswith(".")


def load_hub_pairs(source: str, split: str) -> Dataset:
    """``load_dataset(source, split=split)``; refused up front when the hub is switched off."""
    if datasets.config.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise PairDataError(f"dataset {source!r} is not a local path (nothing is there), so it would be read from "
                            "the Hugging Face hub, but HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE (and "
                            "HF_DATASETS_OFFLINE) to download it, or give a local dataset path")
    raw = load_dataset(source, split=split)
    if all(c in raw.column_names for c in PICKAPIC_COLUMNS):
        kept = preference_rows(raw["label_0"], source)
        return Dataset.from_generator(pickapic_rows, features=pickapic_features(),
                                      gen_kwargs={"files": (), "kept": tuple(kept), "rows": raw})
    return raw


def preference_rows(labels: list, source: str) -> list[int]:
    """Indices of rows with a preference (``label_0`` 0 or 1); ties (0.5) and invalid labels are reported."""
    valid = [isinstance(v, (int, float)) and not math.isnan(v) and v in PICKAPIC_LABELS for v in labels]
    ties = sum(1 for v, ok in zip(labels, valid) if ok and v == 0.5)
    invalid = len(labels) - sum(valid)
    kept = [i for i, (v, ok) in enumerate(zip(labels, valid)) if ok and v != 0.5]
    why = f"{ties} ties (label_0 = 0.5) and {invalid} invalid label_0 values (valid: 0, 0.5, 1)"
    if not kept:
        raise PairDataError(f"no pairs left in {source}: of {len(labels)} rows, {why}")
    if ties or invalid:
        print(f"[focusdpo] {source}: {len(kept)} of {len(labels)} rows kept; dropped {why}", file=sys.stderr)
    return kept


def pickapic_features() -> Features:
    return Features({k: PAIR_FEATURES[k] for k in ("pair_id", "prompt", "chosen", "rejected")})


def import_pickapic(files: list[str], source: str) -> Dataset:
    """Pick-a-Pic files → the pair schema, winner first, ties dropped, written once (by a generator, one
    record batch in memory at a time) into the datasets cache; the files' sizes and times key that copy."""
    labels = [v for f in files for v in pq.read_table(f, columns=["label_0"]).column("label_0").to_pylist()]
    kept = preference_rows(labels, source)
    stamps = tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files)
    # Tuples, not lists: datasets would read lists in gen_kwargs as shards to split the generator over.
    return Dataset.from_generator(pickapic_rows, features=pickapic_features(),
                                  gen_kwargs={"files": tuple(files), "kept": tuple(kept), "stamps": stamps})


def pickapic_rows(files: tuple[str, ...], kept: tuple[int, ...], rows=None, stamps=None):
    """Schema rows for the ``kept`` row indices of Pick-a-Pic ``files`` (or of the Dataset ``rows``)."""
    wanted, index = set(kept), 0
    batches = (b.to_pylist() for f in files for b in pq.ParquetFile(f).iter_batches(columns=list(PICKAPIC_COLUMNS)))
    source = rows.select_columns(list(PICKAPIC_COLUMNS)).iter(batch_size=256) if rows is not None else None
    batches = batches if source is None else ([dict(zip(b, v)) for v in zip(*b.values())] for b in source)
    for batch in batches:
        for row in batch:
            if index in wanted:
                first_wins = row["label_0"] == 1
                yield {"pair_id": f"pickapic-{index}", "prompt": row["caption"],
                       "chosen": {"bytes": image_bytes(row["jpg_0" if first_wins else "jpg_1"]), "path": None},
                       "rejected": {"bytes": image_bytes(row["jpg_1" if first_wins else "jpg_0"]), "path": None}}
            index += 1


def image_bytes(value):
    """Pick-a-Pic stores raw bytes; a re-saved copy may hold datasets' ``{bytes, path}`` struct."""
    return value["bytes"] if isinstance(value, dict) else value

"""Loading pair data into the schema (:mod:`focusdpo.data.schema`): saved folders, jsonl folders, parquet, the hub,
the toy set; checked before any model loads; and the atomic dataset write every writer uses."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import datasets
from datasets import Dataset, Features, Image, List, load_from_disk

from focusdpo.atomic import check_replaceable, disk_full_names, mark_output
from focusdpo.data.checks import check_jsonl_row, preflight
from focusdpo.data.hub import load_hub_pairs, load_parquet_pairs, looks_like_hub_id
from focusdpo.data.schema import ARRAY_COLUMNS, IMAGE_COLUMNS, PAIR_FEATURES, REQUIRED_COLUMNS, SUBJECT_SCORES_FEATURE
from focusdpo.errors import OutputError, PairDataError


def load_recipe_pairs(data_cfg, seed: int = 0) -> Dataset:
    """:func:`load_pairs` with every setting of a recipe's ``DataConfig`` (what each command trains or caches on)."""
    return load_pairs(data_cfg.dataset, data_cfg.dataset_format, data_cfg.toy_num_pairs, data_cfg.resolution,
                      seed=seed, max_references=data_cfg.max_references, on_bad_pair=data_cfg.on_bad_pair,
                      split=data_cfg.dataset_split, max_samples=data_cfg.max_train_samples,
                      verify_images=data_cfg.verify_images)


def load_pairs(source: str, fmt: str = "auto", toy_num_pairs: int = 32, resolution: int = 32,
               seed: int = 0, max_references: int | None = None, on_bad_pair: str = "error",
               split: str = "train", max_samples: int | None = None, verify_images: str = "header") -> Dataset:
    """Load pairs in the schema from ``'toy'``, a saved dataset, a jsonl folder, parquet (pair schema or
    Pick-a-Pic, a file or a hub-style folder with split-named files) or a hub id, keep the first
    ``max_samples`` of ``split``, and check every pair (:func:`focusdpo.data.checks.preflight`; ``verify_images:
    full`` decodes every image too)."""
    checks = {"max_references": max_references, "on_bad_pair": on_bad_pair, "verify_images": verify_images}
    with no_cache_files():
        if source == "toy":
            from focusdpo.data.toy import make_toy_pairs
            return check_pairs(first(make_toy_pairs(toy_num_pairs, resolution, seed), max_samples), source, **checks)
        path = Path(source)
        if not path.exists() and looks_like_hub_id(source) and fmt in ("auto", "hub"):
            raw = load_hub_pairs(source, split)
        elif not path.exists():
            raise PairDataError(f"dataset {source!r} does not exist; give a dataset folder, a folder with "
                                "pairs.jsonl, a parquet file or folder (pair schema or Pick-a-Pic), a hub id, "
                                "or 'toy'")
        else:
            raw = load_local(path, detect_format(path) if fmt == "auto" else fmt, split)
        return check_pairs(first(raw, max_samples), source, **checks)


def load_local(path: Path, fmt: str, split: str) -> Dataset:
    if fmt == "pairs":
        return load_saved(path)
    if fmt == "splits":
        return load_saved_dict(path, split)
    if fmt == "jsonl":
        return import_jsonl(path)
    if fmt == "hub":
        raise PairDataError(f"dataset_format is 'hub' but {str(path)!r} is a local path")
    return load_parquet_pairs(path, split, fmt)


def first(ds: Dataset, count: int | None) -> Dataset:
    """The first ``count`` rows (all when ``count`` is None): fewer pairs to check, cast and decode."""
    return ds if count is None or count >= len(ds) else ds.select(range(count))


@contextmanager
def no_cache_files():
    """Transforms write their results to a temporary folder, not beside the user's dataset files: the
    dataset may sit in a read-only location, and stray ``cache-*.arrow`` files there would outlive the run."""
    enabled = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_caching()


def detect_format(path: Path) -> str:
    if path.is_dir() and (path / "pairs.jsonl").is_file():
        return "jsonl"
    if path.is_dir() and (path / "state.json").is_file():
        return "pairs"
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        return "splits"
    if path.suffix == ".parquet" or (path.is_dir() and any(path.rglob("*.parquet"))):
        return "auto"  # pair schema or Pick-a-Pic: told apart by the columns (focusdpo.hub_data)
    raise PairDataError(f"cannot tell the format of {path}: expected a datasets folder (state.json or "
                        "dataset_dict.json), a folder with pairs.jsonl, or parquet files; or set dataset_format")


def load_saved(path: Path) -> Dataset:
    """A ``save_to_disk`` folder (an empty one has no shards, which datasets cannot load)."""
    state = json.loads((path / "state.json").read_text()) if (path / "state.json").is_file() else {}
    if state.get("_data_files") == []:
        raise PairDataError(f"dataset {str(path)!r} holds no pairs")
    return read_saved(path)


def load_saved_dict(path: Path, split: str) -> Dataset:
    """A ``DatasetDict.save_to_disk`` folder (``dataset_dict.json``): the ``split`` member."""
    splits = read_saved(path)
    if split not in splits:
        raise PairDataError(f"dataset {str(path)!r} has no split {split!r}; its splits are {sorted(splits)}: "
                            "set dataset_split to one of them")
    return splits[split]


ARROW_END = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # the end-of-stream marker closing every arrow file datasets writes


def read_saved(path: Path):
    """``load_from_disk``, refusing a damaged folder by its file: an interrupted copy or write leaves an .arrow file
    without its end marker, which arrow would report as a bare byte count deep in its reader."""
    for data in sorted(path.rglob("*.arrow")):
        with open(data, "rb") as f:
            f.seek(max(0, data.stat().st_size - len(ARROW_END)))
            if f.read() != ARROW_END:
                raise PairDataError(f"dataset {str(path)!r}: {data.relative_to(path)} is cut short (no arrow end "
                                    "marker): the copy or the write that made it was interrupted; copy the folder "
                                    "again or write it again (focusdpo pairs, embed and focus write atomically)")
    try:
        return load_from_disk(str(path))
    except (OSError, ValueError, KeyError) as e:  # arrow's ArrowInvalid is a ValueError, its IOError an OSError
        raise PairDataError(f"dataset {str(path)!r} cannot be read ({e}): the folder is damaged; copy it again or "
                            "write it again") from None


def check_pairs(ds: Dataset, source: str, max_references: int | None = None, on_bad_pair: str = "error",
                verify_images: str = "header") -> Dataset:
    """Reject an empty dataset or missing columns; fill optional columns; keep images undecoded."""
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise PairDataError(f"dataset {source!r} lacks column(s) {missing}; it has {ds.column_names}. "
                            f"Pairs need {list(REQUIRED_COLUMNS)} (see focusdpo.data for the schema)")
    if len(ds) == 0:
        raise PairDataError(f"dataset {source!r} holds no pairs")
    if "pair_id" not in ds.column_names:
        ds = ds.add_column("pair_id", [f"{i:06d}" for i in range(len(ds))])
    for column, empty in (("references", []), ("reference_masks", []), ("prior_mask", None)):
        if column not in ds.column_names:
            ds = ds.add_column(column, [empty] * len(ds), feature=PAIR_FEATURES[column])
    return preflight(undecoded(ds), max_references, on_bad_pair, verify_images)


def undecoded(ds: Dataset) -> Dataset:
    """``ds`` with its image columns undecoded (the collator decodes: a broken file then names its pair
    instead of failing deep in arrow)."""
    return with_image_decoding(ds, False)


def with_image_decoding(ds: Dataset, decode: bool) -> Dataset:
    """``ds`` with its image columns' ``decode`` set. Only the features change: the arrow table, memory-mapped
    from the user's files, is reused as is, whereas ``cast_column`` on a list of images rewrites every image."""
    if len(ds.data) != len(ds):
        ds = ds.flatten_indices()  # a selection: the table must hold exactly the selected rows
    info = ds.info.copy()
    info.features = Features(ds.features)
    for column in (c for c in IMAGE_COLUMNS if c in ds.column_names):
        image = Image(decode=decode)
        info.features[column] = List(image) if column.startswith("reference") else image
    return Dataset(ds.data, info=info)


def first_pair_without_references(ds: Dataset) -> str | None:
    """The id of the first pair with no reference images, or None; reads list lengths, not images."""
    import pyarrow.compute as pc

    for batch in ds.select_columns(["pair_id", "references"]).with_format("arrow").iter(batch_size=4096):
        empty = pc.fill_null(pc.equal(pc.list_value_length(batch["references"]), 0), True)
        if pc.any(empty).as_py():
            return batch["pair_id"].filter(empty)[0].as_py()
    return None


def import_jsonl(folder: Path) -> Dataset:
    """A folder with ``pairs.jsonl``: one JSON object per line with ``prompt``, ``chosen``, ``rejected``
    and optional ``references``, ``reference_masks``, ``prior_mask`` (paths relative to the folder) and
    ``subject_scores`` (``[[chosen scores], [rejected scores]]``, one per reference)."""
    rows = []
    for number, line in enumerate((folder / "pairs.jsonl").read_text().splitlines(), 1):
        if line.strip():
            where = f"{folder / 'pairs.jsonl'} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PairDataError(f"{where} is not JSON: {e}") from None
            check_jsonl_row(row, where)
            rows.append(resolve_paths(row, folder, number))
    features = {**PAIR_FEATURES, "subject_scores": SUBJECT_SCORES_FEATURE}
    if any("subject_scores" in r for r in rows):
        for row in rows:
            row.setdefault("subject_scores", None)
    columns = {k: features[k] for k in features if any(k in r for r in rows)}
    return Dataset.from_list(rows, features=Features(columns))


def resolve_paths(row: dict, folder: Path, number: int) -> dict:
    def resolve(rel):
        path = folder / rel
        if not path.is_file():
            raise PairDataError(f"pairs.jsonl line {number}: image {rel!r} not found in {folder}")
        return str(path)

    for key in ("chosen", "rejected", "prior_mask"):
        if row.get(key):
            row[key] = resolve(row[key])
    for key in ("references", "reference_masks"):
        row[key] = [resolve(p) for p in row.get(key, [])]
    row["pair_id"] = str(row.get("pair_id", f"line-{number}"))
    row.setdefault("prior_mask", None)  # every row needs every column, and some lines may give one
    return row


def needs_pixels(columns: list[str], flow: bool, focus_on: bool, mosaic_on: bool) -> bool:
    """Whether a training step reads decoded images: it does unless the VAE latents are cached (with the reference
    latents, for the flow families), and so are the focus maps when focus weights are on and the MOSAIC points
    when MOSAIC losses are on."""
    return ("latents" not in columns or (flow and "reference_latents" not in columns)
            or (focus_on and "focus_maps" not in columns) or (mosaic_on and "mosaic_points" not in columns))


def with_array_format(ds, pixels: bool = True):
    """``ds`` as the training DataLoader reads it: cached array columns as numpy arrays (not nested Python lists),
    and, when no step decodes an image (``pixels=False``: :func:`needs_pixels`), without the image columns, whose
    encoded bytes would otherwise be copied out of arrow for every row."""
    if not isinstance(ds, Dataset):
        return ds
    if not pixels:
        ds = ds.remove_columns([c for c in IMAGE_COLUMNS if c in ds.column_names])
    columns = [c for c in ARRAY_COLUMNS if c in ds.column_names]
    return ds.with_format("numpy", columns=columns, output_all_columns=True) if columns else ds


def save_dataset(dataset, out: str) -> None:
    """``dataset.save_to_disk(out)`` through ``.out.staging`` and two renames: ``out`` is either the old
    dataset or the new one, never a mix (a kill between the renames leaves the old one as ``.out.old``)."""
    target = Path(out).resolve()
    if target.exists() and not target.is_dir():  # it would be moved aside and lost
        raise OutputError(f"{out} is a file, not a folder: the dataset is a folder; choose a new folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging, old = (target.parent / f".{target.name}.{tag}" for tag in ("staging", "old"))
    shutil.rmtree(staging, ignore_errors=True)  # debris of an earlier kill
    check_replaceable(target)
    with disk_full_names(target.parent, staging):
        with_image_decoding(dataset, True).save_to_disk(str(staging))  # saved images decode for any user
        mark_output(staging)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)

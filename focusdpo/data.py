"""Preference pairs: one schema, importers into it, and the collator that builds ``[w; l]`` batches.

Schema (a ``datasets.Dataset``; images are stored as encoded bytes):

===================  =====================  ==================================================
column               type                   meaning
===================  =====================  ==================================================
``pair_id``          string                 stable id, reported in errors and NaN stops
``prompt``           string                 the generation prompt
``chosen``           Image                  the preferred image (winner)
``rejected``         Image                  the other image (loser), same size as ``chosen``
``references``       list of Image          reference subjects, 0–6 (may be empty)
``reference_masks``  list of Image (L)      optional subject masks, one per reference, or empty
``prior_mask``       Image (L) or None      optional region where the pair differs (aligned pairs)
``focus_maps``       float16 (2, 2, h, w)   optional cache from ``focusdpo focus``: [w, l] × [structure, detail]
``focus_key``        string                 what produced the cache (extractor + config + grid)
``prompt_embeds``    float16 (L, D)         optional cache from ``focusdpo embed`` (flow models)
``pooled_prompt_embeds`` float16 (D,)       optional, FLUX.1's pooled CLIP embedding
``latents``          float16 (2, C, h, w)   optional VAE latents [chosen, rejected] (``embed --latents``)
``reference_latents`` float16 (K, C, h, w)  optional VAE latents of the references (flow models)
``encoder_key``      string                 what produced the embeddings/latents (model + sizes)
===================  =====================  ==================================================
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from datasets import Array2D, Array3D, Array4D, Dataset, Features, Image, List, Sequence, Value, load_from_disk
from PIL import Image as PILImage
from PIL import ImageOps

PAIR_FEATURES = Features({
    "pair_id": Value("string"), "prompt": Value("string"), "chosen": Image(), "rejected": Image(),
    "references": List(Image()), "reference_masks": List(Image()), "prior_mask": Image(),
})
REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")
TEXT_CACHE_COLUMNS = ("prompt_embeds", "pooled_prompt_embeds")
ENCODER_CACHE_COLUMNS = TEXT_CACHE_COLUMNS + ("latents", "reference_latents", "encoder_key")
IMAGE_COLUMNS = ("chosen", "rejected", "references", "reference_masks", "prior_mask")


class PairDataError(ValueError):
    """The pair data is wrong; the message names the file, column or pair and the fix."""


def load_pairs(source: str, fmt: str = "auto", toy_num_pairs: int = 32, resolution: int = 32,
               seed: int = 0) -> Dataset:
    """Load pairs in the schema from ``'toy'``, a saved dataset, a jsonl folder or Pick-a-Pic files."""
    if source == "toy":
        from .toy_pairs import make_toy_pairs
        return check_pairs(make_toy_pairs(toy_num_pairs, resolution, seed), source)
    path = Path(source)
    if not path.exists():
        raise PairDataError(f"dataset {source!r} does not exist; give a dataset folder, a folder with "
                            "pairs.jsonl, a Pick-a-Pic parquet file, or 'toy'")
    fmt = detect_format(path) if fmt == "auto" else fmt
    loaders = {"pairs": load_saved, "jsonl": import_jsonl, "pickapic": import_pickapic}
    return check_pairs(loaders[fmt](path), source)


def detect_format(path: Path) -> str:
    if path.is_dir() and (path / "pairs.jsonl").is_file():
        return "jsonl"
    if path.is_dir() and (path / "state.json").is_file():
        return "pairs"
    if path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
        return "pickapic"
    raise PairDataError(f"cannot tell the format of {path}: expected a datasets folder (state.json), a folder "
                        "with pairs.jsonl, or Pick-a-Pic parquet files; or set dataset_format")


def load_saved(path: Path) -> Dataset:
    """A ``save_to_disk`` folder (an empty one has no shards, which datasets cannot load)."""
    state = json.loads((path / "state.json").read_text()) if (path / "state.json").is_file() else {}
    if state.get("_data_files") == []:
        raise PairDataError(f"dataset {str(path)!r} holds no pairs")
    return load_from_disk(str(path))


def check_pairs(ds: Dataset, source: str) -> Dataset:
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
    # Decode in the collator instead: a broken file then names its pair instead of failing deep in arrow.
    for column in IMAGE_COLUMNS:
        feature = List(Image(decode=False)) if column.startswith("reference") else Image(decode=False)
        ds = ds.cast_column(column, feature)
    preflight(ds)
    return ds


def preflight(ds: Dataset, count: int = 16) -> None:
    """Decode the first ``count`` pairs now, so systematic data errors surface before any model loads."""
    for i in range(min(count, len(ds))):
        row = ds[i]
        chosen, rejected = (open_image(row[c], c, row["pair_id"]) for c in ("chosen", "rejected"))
        check_same_size(chosen, rejected, row["pair_id"])


def check_same_size(chosen: PILImage.Image, rejected: PILImage.Image, pair_id: str) -> None:
    if chosen.size != rejected.size:
        raise PairDataError(f"pair {pair_id}: chosen is {chosen.size[0]}x{chosen.size[1]} but rejected is "
                            f"{rejected.size[0]}x{rejected.size[1]}; a pair's images must have the same size")


def import_jsonl(folder: Path) -> Dataset:
    """A folder with ``pairs.jsonl``: one JSON object per line with ``prompt``, ``chosen``, ``rejected``
    and optional ``references``, ``reference_masks``, ``prior_mask`` (paths relative to the folder)."""
    rows = []
    for number, line in enumerate((folder / "pairs.jsonl").read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(resolve_paths(json.loads(line), folder, number))
            except json.JSONDecodeError as e:
                raise PairDataError(f"{folder / 'pairs.jsonl'} line {number} is not JSON: {e}") from None
    columns = {k: PAIR_FEATURES[k] for k in PAIR_FEATURES if any(k in r for r in rows)}
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
    row.setdefault("pair_id", f"line-{number}")
    return row


def import_pickapic(path: Path) -> Dataset:
    """Pick-a-Pic layout (``jpg_0``, ``jpg_1``, ``label_0``, ``caption``): ties dropped, winner first."""
    files = [str(path)] if path.is_file() else sorted(str(p) for p in path.glob("*.parquet"))
    raw = Dataset.from_parquet(files)
    missing = [c for c in ("jpg_0", "jpg_1", "label_0", "caption") if c not in raw.column_names]
    if missing:
        raise PairDataError(f"{path} is not in the Pick-a-Pic layout: missing {missing}")
    raw = raw.filter(lambda label: label in (0, 1), input_columns="label_0")  # 0.5 = tie: no preference

    def to_schema(row, index):
        first_wins = row["label_0"] == 1
        return {"pair_id": f"pickapic-{index}", "prompt": row["caption"],
                "chosen": {"bytes": row["jpg_0" if first_wins else "jpg_1"], "path": None},
                "rejected": {"bytes": row["jpg_1" if first_wins else "jpg_0"], "path": None}}

    return raw.map(to_schema, with_indices=True, remove_columns=raw.column_names,
                   features=Features({k: PAIR_FEATURES[k] for k in ("pair_id", "prompt", "chosen", "rejected")}))


def open_image(value: dict, column: str, pair_id: str, mode: str = "RGB") -> PILImage.Image:
    """Decode an undecoded datasets Image value fully (so truncation is caught here) in ``mode``."""
    source = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
    try:
        image = PILImage.open(source)
        image.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        where = value.get("path") or "embedded bytes"
        raise PairDataError(f"pair {pair_id}: {column} image ({where}) cannot be read: {e}. "
                            "Replace the file or drop the pair") from None
    return ImageOps.exif_transpose(image).convert(mode)


def square(image: PILImage.Image, size: int, resample=PILImage.BICUBIC) -> PILImage.Image:
    """Resize the short side to ``size`` and centre-crop to ``size × size``."""
    return ImageOps.fit(image, (size, size), method=resample)


def to_tensor(image: PILImage.Image) -> torch.Tensor:
    """PIL → float ``(C, H, W)`` in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1).contiguous()


def as_tensor(value) -> torch.Tensor:
    """A cached array column (nested lists of float16 in arrow) as a float32 tensor."""
    return torch.as_tensor(np.asarray(value, dtype=np.float32))


def array_feature(shape: tuple[int, ...], dynamic_first: bool = False):
    """A float16 datasets feature for arrays of ``shape`` (the first axis may vary per row)."""
    if len(shape) == 1:
        return Sequence(Value("float16"))
    shape = (None, *shape[1:]) if dynamic_first else tuple(shape)
    return {2: Array2D, 3: Array3D, 4: Array4D}[len(shape)](shape=shape, dtype="float16")


def add_array_column(pairs: Dataset, name: str, values: list[np.ndarray], dynamic_first: bool = False) -> Dataset:
    shape = max((v.shape for v in values), key=len)
    # Pairs without references come out as empty 1-D arrays: give them the (0, C, h, w) shape of the others.
    values = [v if v.ndim == len(shape) else np.zeros((0, *shape[1:]), v.dtype) for v in values]
    return pairs.add_column(name, [v.tolist() for v in values], feature=array_feature(shape, dynamic_first))


class PairCollator:
    """Rows of the pair schema → a training batch.

    Returns a dict with ``pixel_values`` ``(2B, 3, R, R)`` in [-1, 1] stacked ``[winners; losers]``,
    ``prompts`` and ``pair_ids`` (B lists), ``references`` (B tensors ``(K_i, 3, R, R)`` in [0, 1]),
    ``reference_masks`` (B tensors ``(K_i, R, R)`` or None), ``prior_mask`` (B tensors ``(R, R)`` or None)
    and, if cached, ``focus_maps`` ``(2B, 2, h, w)`` with its ``focus_key`` and ``prompt_embeds``
    ``(B, L, D)`` / ``pooled_prompt_embeds`` ``(B, D)``.
    """

    def __init__(self, resolution: int, max_references: int = 6):
        self.resolution = resolution
        self.max_references = max_references

    def __call__(self, rows: list[dict]) -> dict:
        parsed = [self.parse(row) for row in rows]
        winners = torch.stack([p["chosen"] for p in parsed])
        losers = torch.stack([p["rejected"] for p in parsed])
        batch = {"pixel_values": torch.cat([winners, losers]) * 2 - 1,
                 "prompts": [row["prompt"] for row in rows], "pair_ids": [row["pair_id"] for row in rows]}
        for key in ("references", "reference_masks", "prior_mask"):
            batch[key] = [p[key] for p in parsed]
        for key in TEXT_CACHE_COLUMNS:  # cached text conditioning (focusdpo embed): one row per pair
            if key in rows[0]:
                batch[key] = torch.stack([as_tensor(row[key]) for row in rows])
        if "latents" in rows[0]:  # cached VAE latents (focusdpo embed --latents): [chosen, rejected] per pair
            latents = torch.stack([as_tensor(row["latents"]) for row in rows])
            batch["latents"] = torch.cat([latents[:, 0], latents[:, 1]])
        if "reference_latents" in rows[0]:
            batch["reference_latents"] = [as_tensor(row["reference_latents"]) for row in rows]
        if "encoder_key" in rows[0]:
            batch["encoder_key"] = rows[0]["encoder_key"]
        if "focus_maps" in rows[0]:
            maps = torch.stack([as_tensor(row["focus_maps"]) for row in rows])
            batch["focus_maps"] = torch.cat([maps[:, 0], maps[:, 1]])
            batch["focus_key"] = rows[0]["focus_key"]
        return batch

    def parse(self, row: dict) -> dict:
        pair_id, size = row["pair_id"], self.resolution
        chosen, rejected = (open_image(row[c], c, pair_id) for c in ("chosen", "rejected"))
        check_same_size(chosen, rejected, pair_id)
        refs = row["references"] or []
        if len(refs) > self.max_references:
            raise PairDataError(f"pair {pair_id} has {len(refs)} references; at most {self.max_references} "
                                "are supported (max_references)")
        masks = row["reference_masks"] or []
        if masks and len(masks) != len(refs):
            raise PairDataError(f"pair {pair_id}: {len(masks)} reference masks for {len(refs)} references")
        prior = row["prior_mask"]
        return {
            "chosen": to_tensor(square(chosen, size)), "rejected": to_tensor(square(rejected, size)),
            "references": torch.stack([to_tensor(square(open_image(r, "references", pair_id), size)) for r in refs])
            if refs else torch.zeros(0, 3, size, size),
            "reference_masks": torch.stack([to_tensor(square(open_image(m, "reference_masks", pair_id, "L"), size,
                                                             PILImage.NEAREST))[0] for m in masks]) if masks else None,
            "prior_mask": to_tensor(square(open_image(prior, "prior_mask", pair_id, "L"), size,
                                           PILImage.NEAREST))[0] if prior else None,
        }

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
``latents``          float16 (2, C', h, w)  optional VAE latents [chosen, rejected] (``embed --latents``); UNets
                                           store the posterior's mean and std on the channel axis (C' = 2C)
``reference_latents`` float16 (K, C, h, w)  optional VAE latents of the references (flow models)
``encoder_key``      string                 what produced the embeddings/latents (model + sizes)
``pair_weight``      float ≥ 0              optional: multiplies the pair's loss (e.g. the generator's margin)
``preference``       float in [0.5, 1]      optional soft label p: ``inside`` scaled by 2p − 1
``original_size``    int (2,) or (2, 2)     optional SDXL micro-conditioning [h, w] (else the training size)
``crop_top_left``    int (2,) or (2, 2)     optional SDXL crop [top, left] (else (0, 0))
``mosaic_points``    int (P, 3)             optional MOSAIC points (k, ref token, target token), ``correspond``
``mosaic_key``       string                 what produced the points
===================  =====================  ==================================================
"""

from __future__ import annotations

import io
import json
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import datasets
from datasets import Array2D, Array3D, Array4D, Dataset, Features, Image, List, Sequence, Value, load_from_disk
from PIL import Image as PILImage
from PIL import ImageOps

from .hub_data import load_hub_pairs, load_parquet_pairs, load_saved_dict, looks_like_hub_id
from .pair_checks import PairDataError, check_jsonl_row, check_mask_size, preflight, to_eight_bit

PAIR_FEATURES = Features({
    "pair_id": Value("string"), "prompt": Value("string"), "chosen": Image(), "rejected": Image(),
    "references": List(Image()), "reference_masks": List(Image()), "prior_mask": Image(),
})
REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")
TEXT_CACHE_COLUMNS = ("prompt_embeds", "pooled_prompt_embeds")
ENCODER_CACHE_COLUMNS = TEXT_CACHE_COLUMNS + ("latents", "reference_latents", "encoder_key")
IMAGE_COLUMNS = ("chosen", "rejected", "references", "reference_masks", "prior_mask")


def load_recipe_pairs(data_cfg, seed: int = 0) -> Dataset:
    """:func:`load_pairs` with every setting of a recipe's ``DataConfig`` (what each command trains or caches on)."""
    return load_pairs(data_cfg.dataset, data_cfg.dataset_format, data_cfg.toy_num_pairs, data_cfg.resolution,
                      seed=seed, max_references=data_cfg.max_references, on_bad_pair=data_cfg.on_bad_pair,
                      split=data_cfg.dataset_split, max_samples=data_cfg.max_train_samples)


def load_pairs(source: str, fmt: str = "auto", toy_num_pairs: int = 32, resolution: int = 32,
               seed: int = 0, max_references: int | None = None, on_bad_pair: str = "error",
               split: str = "train", max_samples: int | None = None) -> Dataset:
    """Load pairs in the schema from ``'toy'``, a saved dataset, a jsonl folder, parquet (pair schema or
    Pick-a-Pic, a file or a hub-style folder with split-named files) or a hub id, keep the first
    ``max_samples`` of ``split``, and check every pair (:func:`focusdpo.pair_checks.preflight`)."""
    with no_cache_files():
        if source == "toy":
            from .toy_pairs import make_toy_pairs
            return check_pairs(first(make_toy_pairs(toy_num_pairs, resolution, seed), max_samples), source,
                               max_references, on_bad_pair)
        path = Path(source)
        if not path.exists() and looks_like_hub_id(source) and fmt in ("auto", "hub"):
            raw = load_hub_pairs(source, split)
        elif not path.exists():
            raise PairDataError(f"dataset {source!r} does not exist; give a dataset folder, a folder with "
                                "pairs.jsonl, a parquet file or folder (pair schema or Pick-a-Pic), a hub id, "
                                "or 'toy'")
        else:
            raw = load_local(path, detect_format(path) if fmt == "auto" else fmt, split)
        return check_pairs(first(raw, max_samples), source, max_references, on_bad_pair)


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
    return load_from_disk(str(path))


def check_pairs(ds: Dataset, source: str, max_references: int | None = None, on_bad_pair: str = "error") -> Dataset:
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
    return preflight(undecoded(ds), max_references, on_bad_pair)


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
            where = f"{folder / 'pairs.jsonl'} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PairDataError(f"{where} is not JSON: {e}") from None
            check_jsonl_row(row, where)
            rows.append(resolve_paths(row, folder, number))
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
    row["pair_id"] = str(row.get("pair_id", f"line-{number}"))
    row.setdefault("prior_mask", None)  # every row needs every column, and some lines may give one
    return row


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
    image = to_eight_bit(image, f"pair {pair_id}: {column} image ({value.get('path') or 'embedded bytes'})")
    return ImageOps.exif_transpose(image).convert(mode)


def needs_pixels(columns: list[str], flow: bool, focus_on: bool, mosaic_on: bool) -> bool:
    """Whether a training step reads decoded images: it does unless the VAE latents are cached (with the reference
    latents, for the flow families), and so are the focus maps when focus weights are on and the MOSAIC points
    when MOSAIC losses are on."""
    return ("latents" not in columns or (flow and "reference_latents" not in columns)
            or (focus_on and "focus_maps" not in columns) or (mosaic_on and "mosaic_points" not in columns))


ARRAY_COLUMNS = ("prompt_embeds", "pooled_prompt_embeds", "latents", "reference_latents", "focus_maps")


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


class PairCollator:
    """Rows of the pair schema → a training batch.

    Returns a dict with ``pixel_values`` ``(2B, 3, R, R)`` in [-1, 1] stacked ``[winners; losers]``,
    ``prompts`` and ``pair_ids`` (B lists), ``references`` (B tensors ``(K_i, 3, R, R)`` in [0, 1]),
    ``reference_masks`` (B tensors ``(K_i, R, R)`` or None), ``prior_mask`` (B tensors ``(R, R)`` or None)
    and, if cached, ``focus_maps`` ``(2B, 2, h, w)`` with its ``focus_key`` and ``prompt_embeds``
    ``(B, L, D)`` / ``pooled_prompt_embeds`` ``(B, D)``.
    """

    def __init__(self, resolution: int, max_references: int = 6, pixels: bool = True):
        """``pixels=False``: rows have no image columns (every reader of images uses a cache instead: VAE and
        reference latents, focus maps, MOSAIC points; :func:`needs_pixels`). The batch then has no
        ``pixel_values``; ``references`` are ``(K_i, 3, 0, 0)``, K_i counted from the cached reference latents (their
        count is what is read), masks are None."""
        self.resolution = resolution
        self.max_references = max_references
        self.pixels = pixels

    def __call__(self, rows: list[dict]) -> dict:
        parsed = [self.parse(row) for row in rows]
        batch = {"prompts": [row["prompt"] for row in rows], "pair_ids": [row["pair_id"] for row in rows]}
        if self.pixels:
            winners = torch.stack([p["chosen"] for p in parsed])
            losers = torch.stack([p["rejected"] for p in parsed])
            batch["pixel_values"] = torch.cat([winners, losers]) * 2 - 1
        for key in ("references", "reference_masks", "prior_mask"):
            batch[key] = [p[key] for p in parsed]
        for key in TEXT_CACHE_COLUMNS:  # cached text conditioning (focusdpo embed): one row per pair
            if key in rows[0]:
                batch[key] = as_tensor(np.stack([row[key] for row in rows]))
        if "latents" in rows[0]:  # cached VAE latents (focusdpo embed --latents): [chosen, rejected] per pair
            latents = as_tensor(np.stack([row["latents"] for row in rows]))
            batch["latents"] = torch.cat([latents[:, 0], latents[:, 1]])
        if "reference_latents" in rows[0]:
            batch["reference_latents"] = [as_tensor(row["reference_latents"]) for row in rows]
        if "encoder_key" in rows[0]:
            batch["encoder_key"] = rows[0]["encoder_key"]
        if "focus_maps" in rows[0]:
            maps = as_tensor(np.stack([row["focus_maps"] for row in rows]))
            batch["focus_maps"] = torch.cat([maps[:, 0], maps[:, 1]])
            batch["focus_key"] = rows[0]["focus_key"]
        batch.update(self.optional_pair_columns(rows))
        return batch

    def optional_pair_columns(self, rows: list[dict]) -> dict:
        """``pair_weight`` / ``preference`` ``(B,)`` (missing values: 1) and SDXL's ``original_size`` /
        ``crop_top_left`` ``(2B, 2)`` ``[winners; losers]`` (a row gives ``[h, w]`` for both images or
        ``[[h, w], [h, w]]`` for chosen and rejected; missing: the training size and ``(0, 0)``)."""
        out = {}
        for key, (low, high) in (("pair_weight", (0.0, math.inf)), ("preference", (0.5, 1.0))):
            if key in rows[0]:
                values = [1.0 if row[key] is None else float(row[key]) for row in rows]
                for row, value in zip(rows, values):
                    if not low <= value <= high:
                        raise PairDataError(f"pair {row['pair_id']}: {key}={value} must be in [{low}, {high}]")
                out[key] = torch.tensor(values)
        for key, default in (("original_size", self.resolution), ("crop_top_left", 0)):
            if key in rows[0]:
                sizes = [torch.tensor(row[key] if row[key] is not None else [default, default], dtype=torch.float32)
                         .expand(2, 2) for row in rows]
                out[key] = torch.cat([torch.stack([s[0] for s in sizes]), torch.stack([s[1] for s in sizes])])
        return out

    def counted_references(self, row: dict, pair_id: str) -> tuple[list, list]:
        """The row's (undecoded) references and masks, their counts checked."""
        refs, masks = row["references"] or [], row["reference_masks"] or []
        if len(refs) > self.max_references:
            raise PairDataError(f"pair {pair_id} has {len(refs)} references; at most {self.max_references} "
                                "are supported (max_references)")
        if masks and len(masks) != len(refs):
            raise PairDataError(f"pair {pair_id}: {len(masks)} reference masks for {len(refs)} references")
        return refs, masks

    def parse(self, row: dict) -> dict:
        pair_id, size = row["pair_id"], self.resolution
        if not self.pixels:  # every reader uses a cache: the counts are all a step needs
            count = len(row["reference_latents"]) if row.get("reference_latents") is not None else 0
            return {"references": torch.zeros(count, 3, 0, 0), "reference_masks": None, "prior_mask": None}
        refs, masks = self.counted_references(row, pair_id)
        chosen, rejected = (open_image(row[c], c, pair_id) for c in ("chosen", "rejected"))
        check_same_size(chosen, rejected, pair_id)
        prior = row["prior_mask"] and open_image(row["prior_mask"], "prior_mask", pair_id, "L")
        refs = [open_image(r, "references", pair_id) for r in refs]
        masks = [open_image(m, "reference_masks", pair_id, "L") for m in masks]
        for k, (ref, mask) in enumerate(zip(refs, masks)):
            check_mask_size(ref.size, mask.size, f"reference_masks[{k}]", f"references[{k}]", pair_id)
        if prior:
            check_mask_size(chosen.size, prior.size, "prior_mask", "chosen", pair_id)
        return {
            "chosen": to_tensor(square(chosen, size)), "rejected": to_tensor(square(rejected, size)),
            "references": torch.stack([to_tensor(square(r, size)) for r in refs])
            if refs else torch.zeros(0, 3, size, size),
            "reference_masks": torch.stack([to_tensor(square(m, size, PILImage.NEAREST))[0] for m in masks])
            if masks else None,
            "prior_mask": to_tensor(square(prior, size, PILImage.NEAREST))[0] if prior else None,
        }

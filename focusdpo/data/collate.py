"""Rows of the pair schema -> ``[w; l]`` training batches: decoding, the training crop, cached columns, padding."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image as PILImage

from focusdpo.data.checks import check_mask_size, open_image
from focusdpo.data.schema import TEXT_CACHE_COLUMNS
from focusdpo.errors import PairDataError
from focusdpo.images import square, to_tensor


def check_same_size(chosen: PILImage.Image, rejected: PILImage.Image, pair_id: str) -> None:
    if chosen.size != rejected.size:
        raise PairDataError(f"pair {pair_id}: chosen is {chosen.size[0]}x{chosen.size[1]} but rejected is "
                            f"{rejected.size[0]}x{rejected.size[1]}; a pair's images must have the same size")


def as_tensor(value) -> torch.Tensor:
    """A cached array column (nested lists of float16 in arrow) as a float32 tensor."""
    return torch.as_tensor(np.asarray(value, dtype=np.float32))


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
        batch.update(subject_columns(rows))
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


def subject_columns(rows: list[dict]) -> dict:
    """``subject_scores`` ``(B, 2, K_max)`` (missing subjects: NaN, which labels none) and cached ``subject_masks``
    ``(2B, K_max, h, w)`` ``[winners; losers]`` (missing subjects: zero masks), K_max the batch's most subjects."""
    out = {}
    if rows[0].get("subject_scores") is not None or any(row.get("subject_scores") is not None for row in rows):
        scores = [torch.full((2, 0), math.nan) if row.get("subject_scores") is None else
                  as_tensor(row["subject_scores"]).reshape(2, -1) for row in rows]
        most = max(s.shape[1] for s in scores)
        out["subject_scores"] = torch.stack([torch.cat([s, s.new_full((2, most - s.shape[1]), math.nan)], 1)
                                             for s in scores])
    if "subject_masks" in rows[0]:
        masks = [as_tensor(row["subject_masks"]) for row in rows]  # (K_i, 2, h, w)
        most = max(m.shape[0] for m in masks)
        padded = torch.stack([torch.cat([m, m.new_zeros(most - m.shape[0], *m.shape[1:])]) for m in masks])
        out["subject_masks"] = torch.cat([padded[:, :, 0], padded[:, :, 1]])
    return out

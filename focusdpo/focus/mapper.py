"""The correspondence mapper: static focus maps for batches of pairs, a cache, and PNG panels.

Static maps (everything but the timestep schedule) are computed once per pair, by
:func:`compute_static_maps` on patch features (DINOv2 or an offline ImageNet CNN,
``feature_backbone``), either on the fly by the trainer or
ahead of time by ``focusdpo focus`` into the pair dataset (float16, keyed by extractor + config +
grid so a stale cache is refused, never silently reused).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from datasets import Dataset, Features, Value, concatenate_datasets

from focusdpo.config.focus import FocusConfig
from focusdpo.data.collate import PairCollator
from focusdpo.data.schema import array_feature
from focusdpo.errors import PairDataError
from focusdpo.features.correspondence import masks_to_grid
from focusdpo.features.dino import feature_name, load_feature_extractor, patch_features
from focusdpo.focus.maps import focus_parts, focus_weights, reference_free_parts
from focusdpo.visualize import pair_facts, save_focus_panel

# FocusConfig fields that shape the static maps; λ and the schedule act per step and are not cached.
STATIC_FIELDS = ("feature_backbone", "feature_layer", "feature_weights",
                 "dino_model", "dino_weights", "dino_random_weights", "dino_depth", "dino_image_size", "top_n",
                 "subject_threshold", "subject_temperature", "confidence_scale", "entropy_bins", "entropy_sigma",
                 "reference_complexity", "pair_alignment")


# Bumped when the meaning of a cached channel changes (2: α_k on the detail term only, prior mask by area),
# so caches made by older code are refused instead of read with the old meaning.
MAPS_VERSION = 2
FOCUS_CACHE_COLUMNS = ("focus_maps", "focus_key", "subject_masks")


def focus_cache_key(cfg: FocusConfig, grid: tuple[int, int], masks: bool = False) -> str:
    """A readable key naming the extractor, the grid and a hash of every static-map setting (and of the subject
    masks' temperature when the cache holds ``subject_masks``)."""
    settings = {name: getattr(cfg, name) for name in STATIC_FIELDS}
    for name in ("dino_weights", "feature_weights"):  # no path: a recipe's `dino_weights:` is None, `--dino_weights ''` ""
        settings[name] = settings[name] or None
    if masks:
        settings["mask_temperature"] = cfg.mask_temperature
    settings["maps_version"] = MAPS_VERSION
    if cfg.confidence_source != "correspondence":  # maps without the correspondence gate (older keys unchanged)
        settings["static_confidence"] = "none"
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"{feature_name(cfg)}/grid{grid[0]}x{grid[1]}/{digest}"


class FocusMapper:
    """Holds the feature extractor and turns collated batches into static focus maps."""

    def __init__(self, cfg: FocusConfig, device=None, model=None):
        self.cfg = cfg
        # ``model``: an extractor built by the caller (focus_api), else the one cfg names.
        self.model = model if model is not None else load_feature_extractor(cfg, device)
        self.device = device

    def batch_maps(self, batch: dict, grid: tuple[int, int], parts: bool = False, masks: bool = False):
        """Static maps ``(2B, 2, h, w)`` (``[w; l]``) for a batch from :class:`~focusdpo.data.collate.PairCollator`.

        Pairs are grouped by reference count K so each group runs the extractor in one batched call.
        With ``parts`` returns the per-pair dicts of :func:`focusdpo.focus.focus_parts` instead; with ``masks``
        the pair ``(static maps, subject masks (2B, K_max, h, w))``, masks padded with zeros to the batch's most
        references.
        """
        pairs = len(batch["pair_ids"])
        images = (batch["pixel_values"].float().to(self.device) + 1) / 2
        for i, refs in enumerate(batch["references"]):
            if len(refs) == 0 and self.cfg.lambda_structure:
                raise PairDataError(f"pair {batch['pair_ids'][i]} has no references: the structure term "
                                    "(lambda_structure) needs at least one; add references, or set "
                                    "lambda_structure: 0 (lambda_detail then weights by image complexity alone)")
        results: list = [None] * pairs
        for count in sorted({len(r) for r in batch["references"]}):
            index = [i for i, r in enumerate(batch["references"]) if len(r) == count]
            out = self.group_maps(batch, images, index, grid, parts or masks)
            for j, i in enumerate(index):
                results[i] = {k: v[j::len(index)] for k, v in out.items()} if parts or masks else out[j::len(index)]
        if parts:
            return results
        static = unstack_pairs([r["static"] for r in results] if masks else results)
        return (static, unstack_pairs(padded_masks(results, grid))) if masks else static

    def group_maps(self, batch: dict, images: torch.Tensor, index: list[int], grid, parts: bool):
        pairs = len(batch["pair_ids"])
        refs = torch.stack([batch["references"][i] for i in index]).float().to(self.device)
        masks = [batch["reference_masks"][i] for i in index]
        priors = [batch["prior_mask"][i] for i in index]
        # A pair without masks treats each whole reference as its subject; without a prior, none.
        masks = torch.stack([m if m is not None else torch.ones(r.shape[0], *r.shape[-2:])
                             for m, r in zip(masks, refs)]).to(self.device)
        side = images.shape[-2:]
        prior = torch.stack([p if p is not None else torch.zeros(side) for p in priors]).to(self.device)
        with torch.no_grad():
            return compute_static_maps(self.model, images[index], images[[pairs + i for i in index]], refs, masks,
                                       grid, self.cfg, prior_mask=prior, parts=parts)


def unstack_pairs(per_pair: list[torch.Tensor]) -> torch.Tensor:
    """Per-pair ``(2, ...)`` tensors (``[w, l]``) -> one ``(2B, ...)`` batch ``[winners; losers]``."""
    stacked = torch.stack(per_pair)
    return torch.cat([stacked[:, 0], stacked[:, 1]])


def padded_masks(parts: list[dict], grid: tuple[int, int]) -> list[torch.Tensor]:
    """Each pair's subject masks ``(2, K_i, h, w)`` padded with zeros to ``(2, K_max, h, w)`` (no mask: K_i = 0)."""
    masks = [p.get("masks", p["static"].new_zeros(2, 0, *grid)) for p in parts]
    most = max(m.shape[1] for m in masks)
    return [torch.cat([m, m.new_zeros(2, most - m.shape[1], *grid)], dim=1) for m in masks]


def precompute_focus_maps(pairs: Dataset, cfg: FocusConfig, grid: tuple[int, int], resolution: int,
                          batch_size: int = 8, device=None, masks: bool = False) -> Dataset:
    """Add ``focus_maps`` (float16 ``(2, 2, h, w)`` per pair) and ``focus_key`` columns to ``pairs``; with ``masks``
    also ``subject_masks`` (float16 ``(K, 2, h, w)``: per reference, [winner, loser]) for ``preference_unit:
    subject``.

    Written by a batched ``Dataset.map``: one batch of maps is in memory at a time, whatever the dataset's size.
    """
    mapper, collate, key = FocusMapper(cfg, device), PairCollator(resolution), focus_cache_key(cfg, grid, masks)

    def batch_columns(rows: dict) -> dict:
        batch = collate([dict(zip(rows, values)) for values in zip(*rows.values())])
        count = len(rows["pair_id"])
        out = mapper.batch_maps(batch, grid, masks=masks)
        static = (out[0] if masks else out).cpu()
        columns = {"focus_maps": torch.stack([static[:count], static[count:]], dim=1).half().numpy(),
                   "focus_key": [key] * count}
        if masks:
            both = torch.stack([out[1][:count], out[1][count:]], dim=2).cpu().half()  # (B, K_max, 2, h, w)
            columns["subject_masks"] = [m[:len(r)].numpy() for m, r in zip(both, batch["references"])]
        return columns

    pairs = pairs.remove_columns([c for c in FOCUS_CACHE_COLUMNS if c in pairs.column_names])
    features = Features({"focus_maps": array_feature((2, 2, *grid)), "focus_key": Value("string"),
                         **({"subject_masks": array_feature((None, 2, *grid), dynamic_first=True)} if masks else {})})
    # Only the new columns are written (then joined side by side): the image bytes are not copied again.
    maps = pairs.map(batch_columns, batched=True, batch_size=batch_size, features=features,
                     remove_columns=pairs.column_names, desc="focus maps")
    return concatenate_datasets([pairs, maps], axis=1)


def check_cache_key(key: str, cfg: FocusConfig, grid: tuple[int, int], masks: bool = False) -> None:
    expected = focus_cache_key(cfg, grid, masks)
    if key != expected:
        raise ValueError(f"cached focus maps were made as {key!r} but this run needs {expected!r} (extractor, "
                         "grid or focus settings changed): re-run `focusdpo focus` with this recipe")


def save_focus_panels(rows: list[dict], mapper: FocusMapper, grid: tuple[int, int], resolution: int, out: Path,
                      noise_levels=(0.9, 0.5, 0.1)) -> list[Path]:
    """One PNG per pair: images and their difference, references, assignment, prior mask, confidence, complexity and
    W at ``noise_levels``, each map with its colour scale; under them the prompt, the pair's margin and the features."""

    cfg = mapper.cfg
    batch = PairCollator(resolution)(rows)
    images = (batch["pixel_values"] + 1) / 2
    lambdas = (cfg.lambda_structure or 1.0, cfg.lambda_detail or 1.0)  # show W even for a λ = 0 recipe
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(mapper.batch_maps(batch, grid, parts=True)):
        by_u = {u: focus_weights(part["static"][:1], torch.tensor([u]), *lambdas, cfg.schedule_center,
                                 cfg.schedule_width)[0] for u in noise_levels}
        paths.append(save_focus_panel(out / f"{rows[i]['pair_id']}.png", images[i], images[len(rows) + i],
                                      batch["references"][i], part["assignment"][0], part["confidence"][0],
                                      part["complexity"][0], by_u, caption=features_caption(mapper),
                                      prior=batch["prior_mask"][i], prompt=rows[i].get("prompt"),
                                      facts=pair_facts(rows[i])))
    return paths


def features_caption(mapper: FocusMapper) -> str:
    """Which features made a panel; CNN panels say outright that they are not DINOv2's."""
    caption = f"features: {mapper.model.name}"
    return caption if mapper.cfg.feature_backbone == "dinov2" else f"{caption} (ImageNet-CNN features, not DINOv2)"


def compute_static_maps(dino_model, winners, losers, references, ref_masks, grid, cfg: FocusConfig,
                        prior_mask=None, aligned: bool | torch.Tensor = False, parts: bool = False):
    """DINOv2 features + :func:`static_focus_maps` from images.

    Args:
        winners, losers: ``(B, 3, H, W)`` in [0, 1]; references: ``(B, K, 3, Hr, Wr)``; K = 0 (no
            references) only with ``cfg.lambda_structure == 0``: see :func:`reference_free_parts`.
        ref_masks: ``(B, K, Hr, Wr)`` pixel masks of the subjects, or ``None``.
        parts: return the :func:`focus_parts` dict instead of the ``(2B, 2, h, w)`` tensor.
    """
    if references.ndim != 5 or (references.shape[1] == 0 and cfg.lambda_structure):
        raise ValueError(f"references must be (B, K, 3, H, W) with K >= 1, got {tuple(references.shape)}: "
                         "the structure term (lambda_structure) compares the images with reference subjects, so "
                         "it needs at least one; without references set lambda_structure: 0 (the detail term, "
                         "lambda_detail, then uses the complexity map alone)")
    if references.shape[1] == 0:
        out = reference_free_parts(winners, losers, grid, cfg)
        return out if parts else out["static"]
    B, K = references.shape[:2]
    feats = patch_features(dino_model, torch.cat([winners, losers]), cfg.dino_image_size)
    ref_feats = patch_features(dino_model, references.flatten(0, 1), cfg.dino_image_size).unflatten(0, (B, K))
    if ref_masks is not None:
        expected = (B, K, *references.shape[-2:])
        if tuple(ref_masks.shape) != expected:
            raise ValueError(f"ref_masks must be (B, K, H, W) = {expected} like the reference images, "
                             f"got {tuple(ref_masks.shape)}")
        ref_masks = masks_to_grid(ref_masks, tuple(ref_feats.shape[-2:]))
    out = focus_parts(feats[:B], feats[B:], ref_feats, ref_masks, winners, losers, references, grid,
                      cfg, prior_mask, aligned)
    return out if parts else out["static"]

"""The correspondence mapper: static focus maps for batches of pairs, a cache, and PNG panels.

Static maps (everything but the timestep schedule) are computed once per pair, by
:func:`focusdpo.focus.compute_static_maps` on patch features (DINOv2 or an offline ImageNet CNN,
``feature_backbone``), either on the fly by the trainer or
ahead of time by ``focusdpo focus`` into the pair dataset (float16, keyed by extractor + config +
grid so a stale cache is refused, never silently reused).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from datasets import Dataset, Features, Value, concatenate_datasets

from .config import FocusConfig

from .recipe import RECIPE_EPILOG, parse_config
from .data import PairCollator, PairDataError, array_feature, load_recipe_pairs
from .features import feature_name, load_feature_extractor
from .focus import compute_static_maps, focus_weights
from .safe_write import check_out_is_not_input, save_dataset

# FocusConfig fields that shape the static maps; λ and the schedule act per step and are not cached.
STATIC_FIELDS = ("feature_backbone", "feature_layer", "feature_weights",
                 "dino_model", "dino_weights", "dino_random_weights", "dino_depth", "dino_image_size", "top_n",
                 "subject_threshold", "subject_temperature", "confidence_scale", "entropy_bins", "entropy_sigma",
                 "reference_complexity", "pair_alignment")


# Bumped when the meaning of a cached channel changes (2: α_k on the detail term only, prior mask by area),
# so caches made by older code are refused instead of read with the old meaning.
MAPS_VERSION = 2


def focus_cache_key(cfg: FocusConfig, grid: tuple[int, int]) -> str:
    """A readable key naming the extractor, the grid and a hash of every static-map setting."""
    settings = {name: getattr(cfg, name) for name in STATIC_FIELDS}
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

    def batch_maps(self, batch: dict, grid: tuple[int, int], parts: bool = False):
        """Static maps ``(2B, 2, h, w)`` (``[w; l]``) for a batch from :class:`~focusdpo.data.PairCollator`.

        Pairs are grouped by reference count K so each group runs the extractor in one batched call.
        With ``parts`` returns the per-pair dicts of :func:`focusdpo.focus.focus_parts` instead.
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
            out = self.group_maps(batch, images, index, grid, parts)
            for j, i in enumerate(index):
                results[i] = {k: v[j::len(index)] for k, v in out.items()} if parts else out[j::len(index)]
        if parts:
            return results
        stacked = torch.stack(results)  # (B, 2, 2, h, w): per pair, [w, l]
        return torch.cat([stacked[:, 0], stacked[:, 1]])

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


def precompute_focus_maps(pairs: Dataset, cfg: FocusConfig, grid: tuple[int, int], resolution: int,
                          batch_size: int = 8, device=None) -> Dataset:
    """Add ``focus_maps`` (float16 ``(2, 2, h, w)`` per pair) and ``focus_key`` columns to ``pairs``.

    Written by a batched ``Dataset.map``: one batch of maps is in memory at a time, whatever the dataset's size.
    """
    mapper, collate, key = FocusMapper(cfg, device), PairCollator(resolution), focus_cache_key(cfg, grid)

    def batch_columns(rows: dict) -> dict:
        out = mapper.batch_maps(collate([dict(zip(rows, values)) for values in zip(*rows.values())]), grid).cpu()
        count = len(rows["pair_id"])
        return {"focus_maps": torch.stack([out[:count], out[count:]], dim=1).half().numpy(), "focus_key": [key] * count}

    pairs = pairs.remove_columns([c for c in ("focus_maps", "focus_key") if c in pairs.column_names])
    features = Features({"focus_maps": array_feature((2, 2, *grid)), "focus_key": Value("string")})
    # Only the new columns are written (then joined side by side): the image bytes are not copied again.
    maps = pairs.map(batch_columns, batched=True, batch_size=batch_size, features=features,
                     remove_columns=pairs.column_names, desc="focus maps")
    return concatenate_datasets([pairs, maps], axis=1)


def check_cache_key(key: str, cfg: FocusConfig, grid: tuple[int, int]) -> None:
    expected = focus_cache_key(cfg, grid)
    if key != expected:
        raise ValueError(f"cached focus maps were made as {key!r} but this run needs {expected!r} (extractor, "
                         "grid or focus settings changed): re-run `focusdpo focus` with this recipe")


def recipe_and_options(argv: list[str], prog: str, description: str, options):
    """Split ``argv`` into this command's own options and the recipe fields (``--config`` + overrides)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=RECIPE_EPILOG)
    for args, kwargs in options:
        parser.add_argument(*args, **kwargs)
    own, rest = parser.parse_known_args(argv)
    return own, parse_config(rest)


def resolve_grid(model_cfg, resolution: int) -> tuple[int, int]:
    from .models import loss_grid
    return loss_grid(model_cfg.family, model_cfg.pretrained_path, resolution)


def precompute_main(argv: list[str]) -> None:
    """``focusdpo focus --out DIR --config recipe.yaml``: write the recipe's pairs with cached maps."""
    own, configs = recipe_and_options(argv, "focusdpo focus", "Precompute static focus maps into a pair dataset.", [
        (("--out",), dict(required=True, help="Folder for the dataset with cached maps (save_to_disk).")),
        (("--batch_size",), dict(type=int, default=8, help="Pairs per DINOv2 batch.")),
        (("--device",), dict(default="cuda" if torch.cuda.is_available() else "cpu",
                             help="Device for the feature extractor.")),
    ])
    _, model_cfg, data_cfg, _, focus_cfg = configs
    check_out_is_not_input(own.out, data_cfg.dataset)
    pairs = load_recipe_pairs(data_cfg)
    grid = resolve_grid(model_cfg, data_cfg.resolution)
    cached = precompute_focus_maps(pairs, focus_cfg, grid, data_cfg.resolution, own.batch_size, own.device)
    save_dataset(cached, own.out)
    print(f"[focusdpo] {len(cached)} pairs with focus maps on a {grid[0]}x{grid[1]} grid written to {own.out}; "
          f"train on them with `dataset: {own.out}`")


def save_focus_panels(rows: list[dict], mapper: FocusMapper, grid: tuple[int, int], resolution: int, out: Path,
                      noise_levels=(0.9, 0.5, 0.1)) -> list[Path]:
    """One PNG per pair: images, references, assignment, confidence, complexity and W at ``noise_levels``."""
    from .visualize import save_focus_panel

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
                                      part["complexity"][0], by_u, caption=features_caption(mapper)))
    return paths


def features_caption(mapper: FocusMapper) -> str:
    """Which features made a panel; CNN panels say outright that they are not DINOv2's."""
    caption = f"features: {mapper.model.name}"
    return caption if mapper.cfg.feature_backbone == "dinov2" else f"{caption} (ImageNet-CNN features, not DINOv2)"


def inspect_main(argv: list[str]) -> None:
    """``focusdpo inspect --out DIR --config recipe.yaml``: one PNG panel per pair."""
    own, configs = recipe_and_options(argv, "focusdpo inspect", "Write focus-map PNG panels for a few pairs.", [
        (("--out",), dict(required=True, help="Folder for the PNG panels.")),
        (("--num_pairs",), dict(type=int, default=4, help="How many pairs to draw.")),
        (("--noise_levels",), dict(type=float, nargs="+", default=[0.9, 0.5, 0.1], help="u values for W panels.")),
    ])
    _, model_cfg, data_cfg, _, focus_cfg = configs
    pairs = load_recipe_pairs(data_cfg)
    rows = [pairs[i] for i in range(min(own.num_pairs, len(pairs)))]
    grid = resolve_grid(model_cfg, data_cfg.resolution)
    paths = save_focus_panels(rows, FocusMapper(focus_cfg), grid, data_cfg.resolution, Path(own.out),
                              own.noise_levels)
    print(f"[focusdpo] {len(paths)} focus panels written to {own.out}")

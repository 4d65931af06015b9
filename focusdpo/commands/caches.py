"""``focusdpo focus | embed | correspond | inspect``: precompute the caches that take encoders, DINOv2 and the
correspondence search out of the training loop (each refused later if made with other settings), or draw focus panels."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from focusdpo.atomic import check_out_is_not_input, output_lock
from focusdpo.caches import cache_encoder_outputs
from focusdpo.config.recipe import RECIPE_EPILOG, parse_config, refusing
from focusdpo.data.load import load_recipe_pairs, save_dataset
from focusdpo.models import load_backbone, resolve_grid


def recipe_and_options(argv: list[str], prog: str, description: str, options):
    """Split ``argv`` into this command's own options and the recipe fields (``--config`` + overrides)."""
    parser = refusing(argparse.ArgumentParser(prog=prog, description=description, epilog=RECIPE_EPILOG))
    for args, kwargs in options:
        parser.add_argument(*args, **kwargs)
    own, rest = parser.parse_known_args(argv)
    return own, parse_config(on_device(rest, getattr(own, "device", "cpu")))


def on_device(recipe_argv: list[str], device: str) -> list[str]:
    """A recipe parsed for a command that runs on ``device``: on the CPU the training settings are checked as for a
    CPU run (a bf16 recipe is otherwise refused on a machine without a GPU, though caching needs none)."""
    return [*recipe_argv, "--use_cpu", "true"] if str(device).startswith("cpu") else recipe_argv


def focus_main(argv: list[str]) -> None:
    """``focusdpo focus --out DIR --config recipe.yaml``: write the recipe's pairs with cached maps."""
    from focusdpo.focus.mapper import precompute_focus_maps

    own, configs = recipe_and_options(argv, "focusdpo focus", "Precompute static focus maps into a pair dataset.", [
        (("--out",), dict(required=True, help="Folder for the dataset with cached maps (save_to_disk).")),
        (("--batch_size",), dict(type=int, default=8, help="Pairs per DINOv2 batch.")),
        (("--device",), dict(default="cuda" if torch.cuda.is_available() else "cpu",
                             help="Device for the feature extractor.")),
    ])
    _, model_cfg, data_cfg, loss_cfg, focus_cfg = configs
    check_out_is_not_input(own.out, data_cfg.dataset)
    with output_lock(own.out):
        pairs = load_recipe_pairs(data_cfg)
        grid = resolve_grid(model_cfg, data_cfg.resolution)
        cached = precompute_focus_maps(pairs, focus_cfg, grid, data_cfg.resolution, own.batch_size, own.device,
                                       masks=loss_cfg.preference_unit == "subject")
        save_dataset(cached, own.out)
    print(f"[focusdpo] {len(cached)} pairs with focus maps on a {grid[0]}x{grid[1]} grid written to {own.out}; "
          f"train on them with `dataset: {own.out}`")


def inspect_main(argv: list[str]) -> None:
    """``focusdpo inspect --out DIR --config recipe.yaml``: one PNG panel per pair."""
    from focusdpo.focus.mapper import FocusMapper, save_focus_panels

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


def embed_main(argv: list[str]) -> None:
    """``focusdpo embed --out DIR --config recipe.yaml [--latents] [--no_text]``."""
    parser = refusing(argparse.ArgumentParser(prog="focusdpo embed", description=__doc__.split("\n\n")[0],
                                              epilog=RECIPE_EPILOG))
    parser.add_argument("--out", required=True, help="Folder for the pairs with cached encoder outputs.")
    parser.add_argument("--latents", action="store_true", help="Also cache VAE latents of images and references.")
    parser.add_argument("--no_text", action="store_true", help="Do not cache prompt embeddings.")
    parser.add_argument("--batch_size", type=int, default=16, help="Pairs per encoder batch.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Device.")
    own, rest = parser.parse_known_args(argv)
    _, model_cfg, data_cfg, _, _ = parse_config(on_device(rest, own.device))
    check_out_is_not_input(own.out, data_cfg.dataset, model_cfg.pretrained_path)
    with output_lock(own.out):
        pairs = load_recipe_pairs(data_cfg)
        backbone = load_backbone(model_cfg.family, model_cfg.pretrained_path, model_cfg.tiny_seed,
                                 **model_cfg.adapter_options(data_cfg.max_references)).to(own.device)
        cached = cache_encoder_outputs(pairs, backbone, model_cfg, data_cfg, not own.no_text, own.latents,
                                       own.batch_size)
        save_dataset(cached, own.out)
    print(f"[focusdpo] {len(pairs)} pairs with cached encoder outputs written to {own.out}; train on them "
          f"with `dataset: {own.out}` (and `drop_text_encoders: true` for flow models)")


def correspond_main(argv: list[str]) -> None:
    """``focusdpo correspond --out DIR --config recipe.yaml``: the recipe's pairs with cached MOSAIC points."""
    from focusdpo.mosaic.objective import precompute_points

    own, configs = recipe_and_options(argv, "focusdpo correspond", "Precompute MOSAIC correspondence points.", [
        (("--out",), dict(required=True, help="Folder for the dataset with mosaic_points (save_to_disk).")),
        (("--device",), dict(default="cuda" if torch.cuda.is_available() else "cpu",
                             help="Device for the feature extractor.")),
    ])
    _, model_cfg, data_cfg, _, focus_cfg = configs
    check_out_is_not_input(own.out, data_cfg.dataset)
    with output_lock(own.out):
        pairs = load_recipe_pairs(data_cfg)
        target = resolve_grid(model_cfg, data_cfg.resolution)
        reference = resolve_grid(model_cfg, model_cfg.reference_size or data_cfg.resolution)
        cached = precompute_points(pairs, focus_cfg, target, reference, data_cfg.resolution, own.device)
        save_dataset(cached, own.out)
    print(f"[focusdpo] {len(cached)} pairs with MOSAIC points (target grid {target[0]}x{target[1]}, reference grid "
          f"{reference[0]}x{reference[1]}) written to {own.out}; train on them with `dataset: {own.out}`")

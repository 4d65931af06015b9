"""Cache what the frozen encoders compute, in the pair dataset: prompt embeddings and VAE latents.

``focusdpo embed --config recipe.yaml --out DIR [--latents]`` encodes every prompt (and, with
``--latents``, every chosen/rejected image and reference) once with the recipe's model, on GPU when
there is one, and writes the pairs with float16 ``prompt_embeds`` (FLUX.1 also
``pooled_prompt_embeds``), ``latents`` and ``reference_latents`` plus an ``encoder_key``. Training
on DIR then skips those encoders every step; ``drop_text_encoders: true`` frees the text stack. A
cache made for another model, resolution or reference size is refused, never silently reused.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm

from .config import DataConfig, ModelConfig
from .data import ENCODER_CACHE_COLUMNS, PairCollator, add_array_column, load_pairs
from .models import Backbone, load_backbone

# ModelConfig/DataConfig fields that change what the encoders produce.
ENCODER_FIELDS = ("family", "pretrained_path", "tiny_seed", "reference_size", "max_sequence_length",
                  "text_encoder_out_layers")


def encoder_cache_key(model_cfg: ModelConfig, data_cfg: DataConfig) -> str:
    settings = {name: getattr(model_cfg, name) for name in ENCODER_FIELDS}
    settings["resolution"] = data_cfg.resolution
    return json.dumps(settings, sort_keys=True)


def check_encoder_key(key: str, model_cfg: ModelConfig, data_cfg: DataConfig) -> None:
    expected = encoder_cache_key(model_cfg, data_cfg)
    if key != expected:
        raise ValueError(f"the dataset's cached embeddings/latents were made with {key} but this run uses "
                         f"{expected}: re-run `focusdpo embed` with this recipe, or train on the uncached pairs")


def encode_pairs(pairs: Dataset, backbone: Backbone, resolution: int, text: bool, latents: bool,
                 batch_size: int, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Per-pair float16 arrays of every requested encoder output."""
    collate, generator = PairCollator(resolution), torch.Generator().manual_seed(seed)
    columns: dict[str, list[np.ndarray]] = {}
    for start in tqdm(range(0, len(pairs), batch_size), desc="encoding pairs", unit="batch"):
        rows = [pairs[i] for i in range(start, min(start + batch_size, len(pairs)))]
        outputs = dict(backbone.text_cache([r["prompt"] for r in rows])) if text else {}
        if latents:
            outputs.update(backbone.latent_cache(collate(rows), generator))
        for name, values in outputs.items():
            columns.setdefault(name, []).extend(v.detach().float().cpu().half().numpy() for v in values)
    return columns


def cache_encoder_outputs(pairs: Dataset, backbone: Backbone, model_cfg: ModelConfig, data_cfg: DataConfig,
                          text: bool = True, latents: bool = False, batch_size: int = 16) -> Dataset:
    """``pairs`` with cached prompt embeddings and/or VAE latents, and the ``encoder_key`` they were made with."""
    columns = encode_pairs(pairs, backbone, data_cfg.resolution, text, latents, batch_size)
    pairs = pairs.remove_columns([c for c in ENCODER_CACHE_COLUMNS if c in pairs.column_names])
    for name, values in columns.items():
        if not any(v.size for v in values):
            continue  # e.g. no pair has references
        pairs = add_array_column(pairs, name, values, dynamic_first=name == "reference_latents")
    return pairs.add_column("encoder_key", [encoder_cache_key(model_cfg, data_cfg)] * len(pairs))


def drop_text_encoders(backbone: Backbone, pairs: Dataset) -> None:
    """Free the text stack; refuse when the pairs carry no cached embeddings to replace it."""
    if "prompt_embeds" not in pairs.column_names:
        raise ValueError("drop_text_encoders: true needs prompt embeddings cached in the dataset: run "
                         "`focusdpo embed --config <recipe> --out DIR` and train on DIR")
    for name in list(backbone.pipeline.components):
        if name.startswith("text_encoder"):
            setattr(backbone.pipeline, name, None)


def embed_main(argv: list[str]) -> None:
    """``focusdpo embed --out DIR --config recipe.yaml [--latents] [--no_text]``."""
    from .config import RECIPE_EPILOG, parse_config
    from .safe_write import check_out_is_not_input, save_dataset

    parser = argparse.ArgumentParser(prog="focusdpo embed", description=__doc__.split("\n\n")[0],
                                     epilog=RECIPE_EPILOG)
    parser.add_argument("--out", required=True, help="Folder for the pairs with cached encoder outputs.")
    parser.add_argument("--latents", action="store_true", help="Also cache VAE latents of images and references.")
    parser.add_argument("--no_text", action="store_true", help="Do not cache prompt embeddings.")
    parser.add_argument("--batch_size", type=int, default=16, help="Pairs per encoder batch.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Device.")
    own, rest = parser.parse_known_args(argv)
    _, model_cfg, data_cfg, _, _ = parse_config(rest)
    check_out_is_not_input(own.out, data_cfg.dataset)
    pairs = load_pairs(data_cfg.dataset, data_cfg.dataset_format, data_cfg.toy_num_pairs, data_cfg.resolution)
    backbone = load_backbone(model_cfg.family, model_cfg.pretrained_path, model_cfg.tiny_seed,
                             **model_cfg.adapter_options(data_cfg.max_references)).to(own.device)
    cached = cache_encoder_outputs(pairs, backbone, model_cfg, data_cfg, not own.no_text, own.latents,
                                   own.batch_size)
    save_dataset(cached, own.out)
    print(f"[focusdpo] {len(pairs)} pairs with cached encoder outputs written to {own.out}; train on them "
          f"with `dataset: {own.out}` (and `drop_text_encoders: true` for flow models)")

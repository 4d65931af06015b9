"""Cache what the frozen encoders compute, in the pair dataset: prompt embeddings and VAE latents.

``focusdpo embed --config recipe.yaml --out DIR [--latents]`` encodes every prompt (and, with
``--latents``, every chosen/rejected image and reference) once with the recipe's model, on GPU when
there is one, and writes the pairs with float16 ``prompt_embeds`` (FLUX.1 also
``pooled_prompt_embeds``), ``latents`` and ``reference_latents`` plus an ``encoder_key``. Training
on DIR then skips those encoders every step; ``drop_text_encoders: true`` frees the text stack. A
cache made for another model, resolution or reference size is refused, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
from datasets import Dataset, Features, Value

from focusdpo.config.training import DataConfig, ModelConfig
from focusdpo.data.collate import PairCollator
from focusdpo.data.schema import ENCODER_CACHE_COLUMNS, array_feature
from focusdpo.models.base import Backbone

# ModelConfig/DataConfig fields that change what the encoders produce.
ENCODER_FIELDS = ("family", "pretrained_path", "tiny_seed", "reference_size", "max_sequence_length",
                  "text_encoder_out_layers")

# Bumped when the meaning of a cached column changes (2: UNet latents hold the posterior's mean and std, not a
# sample), so caches written by an older version are refused instead of misread.
CACHE_FORMAT = 2


def encoder_cache_key(model_cfg: ModelConfig, data_cfg: DataConfig) -> str:
    settings = {name: getattr(model_cfg, name) for name in ENCODER_FIELDS}
    settings["resolution"] = data_cfg.resolution
    settings["format"] = CACHE_FORMAT
    return json.dumps(settings, sort_keys=True)


def comparable_key(key: str) -> dict:
    """A cache key's settings with a local model folder named by its real path: the same folder reached by a
    relative path, an absolute path or a symlink is the same model (a hub id, or a folder gone, stays as written)."""
    settings = json.loads(key)
    path = settings.get("pretrained_path")
    if path and os.path.isdir(path):
        settings["pretrained_path"] = os.path.realpath(path)
    return settings


def check_encoder_key(key: str, model_cfg: ModelConfig, data_cfg: DataConfig) -> None:
    expected = encoder_cache_key(model_cfg, data_cfg)
    if key != expected and comparable_key(key) != comparable_key(expected):
        raise ValueError(f"the dataset's cached embeddings/latents were made with {key} but this run uses "
                         f"{expected}: re-run `focusdpo embed` with this recipe, or train on the uncached pairs")


def encoder_outputs(rows: dict, backbone: Backbone, collate: PairCollator, text: bool, latents: bool,
                    generator: torch.Generator) -> dict[str, list[np.ndarray]]:
    """Per-pair float16 arrays of every requested encoder output for a batch of rows (columns → lists)."""
    listed = [dict(zip(rows, values)) for values in zip(*rows.values())]
    outputs = dict(backbone.text_cache(rows["prompt"])) if text else {}
    if latents:
        outputs.update(backbone.latent_cache(collate(listed), generator))
    return {name: [v.detach().float().cpu().half().numpy() for v in values] for name, values in outputs.items()}


def cache_encoder_outputs(pairs: Dataset, backbone: Backbone, model_cfg: ModelConfig, data_cfg: DataConfig,
                          text: bool = True, latents: bool = False, batch_size: int = 16) -> Dataset:
    """``pairs`` with cached prompt embeddings and/or VAE latents, and the ``encoder_key`` they were made with.

    Written by a batched ``Dataset.map``: one batch of arrays is in memory at a time, whatever the dataset's size.
    The first pair is encoded once more up front to learn each column's array shape.
    """
    collate, generator = PairCollator(data_cfg.resolution, data_cfg.max_references), torch.Generator().manual_seed(0)
    key = encoder_cache_key(model_cfg, data_cfg)
    pairs = pairs.remove_columns([c for c in ENCODER_CACHE_COLUMNS if c in pairs.column_names])
    probe = encoder_outputs(pairs[:1], backbone, collate, text, latents, generator)
    features = Features({**pairs.features, "encoder_key": Value("string"), **{
        name: array_feature(values[0].shape, dynamic_first=name == "reference_latents")
        for name, values in probe.items()}})

    def encode(rows: dict) -> dict:
        out = encoder_outputs(rows, backbone, collate, text, latents, generator)
        return {**out, "encoder_key": [key] * len(rows["prompt"])}

    fingerprint = hashlib.sha256(f"{pairs._fingerprint}|{key}|{text}|{latents}".encode()).hexdigest()[:16]
    return pairs.map(encode, batched=True, batch_size=batch_size, features=features, desc="encoding pairs",
                     new_fingerprint=fingerprint, load_from_cache_file=False)  # the backbone is too big to hash


def drop_text_encoders(backbone: Backbone, pairs: Dataset) -> None:
    """Free the text stack; refuse when the pairs carry no cached embeddings to replace it."""
    if "prompt_embeds" not in pairs.column_names:
        raise ValueError("drop_text_encoders: true needs prompt embeddings cached in the dataset: run "
                         "`focusdpo embed --config <recipe> --out DIR` and train on DIR")
    for name in list(backbone.pipeline.components):
        if name.startswith("text_encoder"):
            setattr(backbone.pipeline, name, None)

"""Cache prompt embeddings in the pair dataset, so flow models train without their text encoders.

``focusdpo embed --config recipe.yaml --out DIR`` encodes every prompt once with the recipe's model
(on GPU when there is one) and writes the pairs with ``prompt_embeds`` (and FLUX.1's
``pooled_prompt_embeds``) as float16. Train on DIR with ``drop_text_encoders: true``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from datasets import Array2D, Dataset, Sequence, Value
from tqdm.auto import tqdm

from .data import load_pairs
from .models import Backbone, load_backbone


def cache_text_embeddings(pairs: Dataset, backbone: Backbone, batch_size: int = 16) -> Dataset:
    """Add float16 ``prompt_embeds`` ``(L, D)`` (and ``pooled_prompt_embeds`` ``(D,)``) columns to ``pairs``."""
    prompts = pairs["prompt"]
    columns: dict[str, list] = {}
    for start in tqdm(range(0, len(prompts), batch_size), desc="prompt embeddings", unit="batch"):
        for name, value in backbone.text_cache(prompts[start:start + batch_size]).items():
            columns.setdefault(name, []).extend(value.detach().cpu().half().numpy())
    for name, values in columns.items():
        if name in pairs.column_names:
            pairs = pairs.remove_columns(name)
        shape = values[0].shape
        feature = Array2D(shape=shape, dtype="float16") if len(shape) == 2 else Sequence(Value("float16"))
        pairs = pairs.add_column(name, [np.asarray(v).tolist() for v in values], feature=feature)
    return pairs


def drop_text_encoders(backbone: Backbone, pairs: Dataset) -> None:
    """Free the text stack; refuse when the pairs carry no cached embeddings to replace it."""
    if "prompt_embeds" not in pairs.column_names:
        raise ValueError("drop_text_encoders: true needs prompt embeddings cached in the dataset: run "
                         "`focusdpo embed --config <recipe> --out DIR` and train on DIR")
    for name in list(backbone.pipeline.components):
        if name.startswith("text_encoder"):
            setattr(backbone.pipeline, name, None)


def embed_main(argv: list[str]) -> None:
    """``focusdpo embed --out DIR --config recipe.yaml``."""
    from .config import RECIPE_EPILOG, parse_config

    parser = argparse.ArgumentParser(prog="focusdpo embed", description=__doc__.split("\n\n")[0],
                                     epilog=RECIPE_EPILOG)
    parser.add_argument("--out", required=True, help="Folder for the pairs with cached embeddings.")
    parser.add_argument("--batch_size", type=int, default=16, help="Prompts per text-encoder batch.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Device.")
    own, rest = parser.parse_known_args(argv)
    _, model_cfg, data_cfg, _, _ = parse_config(rest)
    pairs = load_pairs(data_cfg.dataset, data_cfg.dataset_format, data_cfg.toy_num_pairs, data_cfg.resolution)
    backbone = load_backbone(model_cfg.family, model_cfg.pretrained_path, model_cfg.tiny_seed,
                             **model_cfg.adapter_options(data_cfg.max_references)).to(own.device)
    cache_text_embeddings(pairs, backbone, own.batch_size).save_to_disk(own.out)
    print(f"[focusdpo] {len(pairs)} pairs with cached prompt embeddings written to {own.out}; train on them "
          f"with `dataset: {own.out}` and `drop_text_encoders: true`")

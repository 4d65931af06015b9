"""The world's judge as an oracle: per-subject scores for ``focusdpo pairs`` (a user scorer) and subject masks.

The judge knows each quadrant's truth: it reads shape, colour and pattern per quadrant, and the references'
identities come from their file names in the prompt set (``world.write_prompt_set``). Per reference the score is
``judge.subject_scores``: (attributes right − attributes leaked) / 3 on its matched quadrant, −1 when missing.
Its mask on the loss grid is that matched quadrant (empty when missing): the upper bound that spatial labels can
reach in this world (true labels, true places).

``focusdpo pairs`` loads the scorer by name (``scorer: efficacy_stages.oracle:judge_scores``); the judge's weights
come from ``$EFFICACY_JUDGE`` (set by the pairs stage while it runs the generator).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from focusdpo.data.load import no_cache_files

from . import judge as judging
from . import world
from .base_model import to_pixels

JUDGE_ENV = "EFFICACY_JUDGE"
SCORER = "efficacy_stages.oracle:judge_scores"
_loaded: dict[str, judging.Judge] = {}


def load(path: str | Path) -> judging.Judge:
    path = str(path)
    if path not in _loaded:
        model = judging.Judge()
        model.load_state_dict(torch.load(path, weights_only=True))
        _loaded[path] = model.eval()
    return _loaded[path]


def identities(item_or_paths) -> list[int]:
    paths = getattr(item_or_paths, "references", item_or_paths)
    return [world.identity_of(p) for p in paths]


def judge_scores(images, item) -> list[list[float]]:
    """The user scorer: per candidate image, one score per reference of ``item`` (``judge.subject_scores``)."""
    path = os.environ.get(JUDGE_ENV)
    if not path:
        raise RuntimeError(f"the oracle scorer needs ${JUDGE_ENV}: the path of the study's judge.pt")
    predicted = judging.predict(load(path), to_pixels(images))
    ids = identities(item)
    return [judging.subject_scores(ids, quadrants) for quadrants in predicted]


def quadrant_masks(model: judging.Judge, images, ids: list[int], grid: tuple[int, int]) -> np.ndarray:
    """``(len(images), K, h, w)``: per image, each reference's matched quadrant on the loss grid (0 if missing)."""
    h, w = grid
    out = np.zeros((len(images), len(ids), h, w), np.float32)
    for n, quadrants in enumerate(judging.predict(model, to_pixels(images))):
        for k, q in enumerate(judging.assign(ids, quadrants)):
            if q is not None:
                row, col = divmod(q, 2)
                out[n, k, row * h // 2:(row + 1) * h // 2, col * w // 2:(col + 1) * w // 2] = 1.0
    return out


def as_image(value):
    """A dataset image cell, decoded or not (``{"bytes", "path"}``), as an RGB PIL image."""
    import io

    from PIL import Image

    if isinstance(value, dict):
        value = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    return value.convert("RGB")


def scene_identities(pairs, scenes: list[dict]) -> list[list[int]]:
    """Per pair of a generated set, its scene's identities (``item_index``: the entry of the prompt set)."""
    return [scenes[i]["identities"] for i in pairs["item_index"]]


def with_oracle_masks(pairs, ids: list[list[int]], judge_path: Path, grid: tuple[int, int]):
    """A subject-unit focus cache (``focusdpo focus`` with ``preference_unit: subject``) with its ``subject_masks``
    replaced by the judge's quadrants, ``(K, 2, h, w)`` per pair ([winner, loser]). The cache key stays the one
    ``focusdpo focus`` wrote, so the trainer accepts it (the package has no field saying where masks came from)."""
    if "subject_masks" not in pairs.column_names:
        raise ValueError("with_oracle_masks needs a subject-unit cache (a subject_masks column) to replace")
    model, features = load(judge_path), pairs.features

    def replace(chosen: list, rejected: list, index: list[int]) -> dict:
        masks = []
        for winner, loser, i in zip(chosen, rejected, index):
            both = quadrant_masks(model, [as_image(winner), as_image(loser)], ids[i], grid)
            masks.append(np.stack([both[0], both[1]], axis=1).astype(np.float16))  # (K, 2, h, w)
        return {"subject_masks": masks}

    with no_cache_files():  # written to a temporary folder, not beside the cache it reads
        return pairs.map(replace, input_columns=["chosen", "rejected"], with_indices=True, batched=True,
                         batch_size=64, features=features, desc="oracle masks")

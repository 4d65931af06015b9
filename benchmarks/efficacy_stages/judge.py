"""The judge: a small CNN on 16 px quadrant crops → occupied, shape, colour, pattern; and the per-scene scores.

Trained on clean renders and their VAE reconstructions (so the base model's decoder blur is in distribution).
Placement is free in the generated images (the prompt is constant and references carry no position), so the
K references are matched to the occupied quadrants by the assignment with the most equal attributes:

- fidelity (per reference): its matched quadrant has all three attributes right;
- leakage (per reference): a wrong attribute of its match equals that attribute of another reference;
- missing (per reference): no occupied quadrant left for it;
- extra (per scene): occupied quadrants beyond K.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from . import world
from .base_model import to_pixels

HEADS = {"occupied": 2, "shape": len(world.SHAPES), "colour": len(world.COLOURS), "pattern": len(world.PATTERNS)}
ATTRIBUTES = ("shape", "colour", "pattern")


class Judge(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(2 * width, n) for name, n in HEADS.items()})

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """``crops (N, 3, 16, 16)`` in [-1, 1] → logits per head."""
        features = self.trunk(crops)
        return {name: head(features) for name, head in self.heads.items()}


def quadrant_crops(pixels: torch.Tensor) -> torch.Tensor:
    """``(N, 3, 32, 32)`` → ``(4N, 3, 16, 16)``, quadrants row-major per image."""
    q = world.QUADRANT
    return torch.stack([pixels[:, :, r * q:(r + 1) * q, c * q:(c + 1) * q] for r in (0, 1) for c in (0, 1)], 1
                       ).flatten(0, 1)


def quadrant_labels(scene: world.Scene) -> np.ndarray:
    """``(4, 4)``: occupied, shape, colour, pattern per quadrant (attributes -100 = ignored when empty)."""
    labels = np.full((4, 4), -100, np.int64)
    labels[:, 0] = 0
    for identity, quadrant in zip(scene.identities, scene.quadrants):
        labels[quadrant] = (1, *world.attributes(identity))
    return labels


def training_batch(rng: np.random.Generator, size: int, vae) -> tuple[torch.Tensor, torch.Tensor]:
    scenes = [world.random_scene(rng, None) for _ in range(size)]
    pixels = to_pixels([world.render(s) for s in scenes])
    if vae is not None:  # half the batch as VAE reconstructions
        with torch.no_grad():
            half = size // 2
            pixels[:half] = vae.decode(vae.encode(pixels[:half]).latent_dist.mode()).sample.clamp(-1, 1)
    labels = torch.from_numpy(np.concatenate([quadrant_labels(s) for s in scenes]))
    return quadrant_crops(pixels), labels


def train_judge(steps: int, batch: int, seed: int, vae=None) -> Judge:
    torch.manual_seed(seed)
    judge, rng = Judge(), np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    for _ in range(steps):
        crops, labels = training_batch(rng, batch, vae)
        logits = judge(crops)
        loss = sum(loss_fn(logits[name], labels[:, i]) for i, name in enumerate(HEADS))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return judge.eval()


@torch.no_grad()
def predict(judge: Judge, pixels: torch.Tensor) -> np.ndarray:
    """``(N, 4, 4)``: occupied, shape, colour, pattern per quadrant."""
    logits = judge(quadrant_crops(pixels))
    return torch.stack([logits[name].argmax(-1) for name in HEADS], -1).view(-1, 4, 4).numpy()


def identity_accuracy(judge: Judge, scenes: list[world.Scene], pixels: torch.Tensor) -> float:
    """Fraction of subjects whose quadrant the judge reads exactly (occupied and all attributes)."""
    predicted, hits, total = predict(judge, pixels), 0, 0
    for scene, quadrants in zip(scenes, predicted):
        truth = quadrant_labels(scene)
        for q in scene.quadrants:
            hits += int((quadrants[q] == truth[q]).all())
            total += 1
    return hits / max(total, 1)


def assign(identities: list[int], quadrants: np.ndarray) -> list[int | None]:
    """Reference k → its matched occupied quadrant (or None: missing), by the assignment with the most equal
    attributes, then the most references placed (``quadrants``: the judge's ``(4, 4)``)."""
    refs = [world.attributes(i) for i in identities]
    occupied = [q for q in range(4) if quadrants[q, 0] == 1]
    best, best_key = [None] * len(refs), (-1, -1)
    for chosen in itertools.permutations(occupied + [None] * len(refs), len(refs)):
        placed = [(k, q) for k, q in enumerate(chosen) if q is not None]
        key = (sum(int((quadrants[q, 1:] == np.array(refs[k])).sum()) for k, q in placed), len(placed))
        if key > best_key:
            best, best_key = list(chosen), key
    return best


def reference_outcomes(identities: list[int], quadrants: np.ndarray) -> list[dict]:
    """Per reference: its quadrant (None: missing), attributes right, attributes leaked (a wrong attribute equal
    to that attribute of another reference)."""
    refs = [world.attributes(i) for i in identities]
    out = []
    for k, q in enumerate(assign(identities, quadrants)):
        if q is None:
            out.append({"quadrant": None, "right": 0, "leaked": 0})
            continue
        predicted, own = quadrants[q, 1:], refs[k]
        others = [r for j, r in enumerate(refs) if j != k]
        out.append({"quadrant": q, "right": sum(int(predicted[a] == own[a]) for a in range(3)),
                    "leaked": sum(int(predicted[a] != own[a] and any(predicted[a] == o[a] for o in others))
                                  for a in range(3))})
    return out


def score_scene(identities: list[int], quadrants: np.ndarray) -> dict:
    """Scores of one generated image (``quadrants``: the judge's ``(4, 4)``) against its K references."""
    outcomes = reference_outcomes(identities, quadrants)
    placed = [o for o in outcomes if o["quadrant"] is not None]
    occupied = int((quadrants[:, 0] == 1).sum())
    count = len(identities)
    return {"fidelity": sum(o["right"] == 3 for o in placed) / count,
            "leakage": sum(o["leaked"] > 0 for o in placed) / count,
            "missing": (count - len(placed)) / count, "extra": max(0, occupied - count)}


def subject_scores(identities: list[int], quadrants: np.ndarray) -> list[float]:
    """The oracle's per-reference score: (attributes right − attributes leaked) / 3 for a placed subject, −1 for a
    missing one, minus extra / K for every reference (extra: occupied quadrants beyond the K references). The extras
    belong to no subject; they are shared out because ``focusdpo pairs`` takes a user scorer's image score as the
    mean of its subject scores, and an image score blind to extras prefers images with more blobs (measured: without
    the term the judge-chosen images held 0.32 extra subjects per scene, the rejected ones 0.09)."""
    count = len(identities)
    extra = max(0, int((quadrants[:, 0] == 1).sum()) - count)
    return [(-1.0 if o["quadrant"] is None else (o["right"] - o["leaked"]) / 3) - extra / count
            for o in reference_outcomes(identities, quadrants)]

"""The controlled world: 32×32 scenes of 2–3 known subjects in a 2×2 grid of 16 px quadrants.

Identity = shape × colour × pattern (5 × 6 × 3 = 90). A scene puts K ∈ {2, 3} distinct identities in distinct
quadrants (side 10–14 px, jittered inside the quadrant) over a light low-frequency texture. References are
each subject alone on a near-white 16 px canvas. Identity *pairs* are split by a hash: training scenes use
only training pairs, held-out scenes contain at least one held-out pair (new combinations, known identities).
Pairs are instance-disrupted: the loser is the winner with one subject replaced by another identity in the
same box, which is the pair's prior mask.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, Features
from PIL import Image, ImageDraw

from focusdpo.data.schema import PAIR_FEATURES, SUBJECT_SCORES_FEATURE

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = ((220, 40, 40), (40, 160, 60), (40, 80, 220), (235, 200, 30), (200, 50, 200), (30, 190, 200))
PATTERNS = ("plain", "striped", "hollow")
NUM_IDENTITIES = len(SHAPES) * len(COLOURS) * len(PATTERNS)
SIZE, QUADRANT, REF_SIZE = 32, 16, 16
SUPERSAMPLE = 4
PROMPT = "a photo of the referenced subjects"  # constant: the references alone say what to draw
HELD_OUT_PAIR_PERCENT = 20


def attributes(identity: int) -> tuple[int, int, int]:
    """identity → (shape, colour, pattern) indices."""
    return identity // 18, identity // 3 % 6, identity % 3


def pair_held_out(a: int, b: int) -> bool:
    """The hash split of identity combinations (order-free, stable across runs and machines)."""
    return zlib.crc32(f"{min(a, b)}-{max(a, b)}".encode()) % 100 < HELD_OUT_PAIR_PERCENT


def scene_held_out(identities) -> bool:
    return any(pair_held_out(a, b) for a, b in itertools.combinations(identities, 2))


@dataclass
class Scene:
    identities: list[int]
    quadrants: list[int]          # 0..3, row-major
    boxes: list[tuple[int, int, int, int]]  # pixel boxes at SIZE
    background: np.ndarray        # (SIZE, SIZE, 3) uint8


def outline(shape: str, box) -> list | None:
    x0, y0, x1, y1 = box
    cx, cy, w = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0)
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "cross":
        a, b = w / 3, 2 * w / 3
        return [(x0 + a, y0), (x0 + b, y0), (x0 + b, y0 + a), (x1, y0 + a), (x1, y0 + b), (x0 + b, y0 + b),
                (x0 + b, y1), (x0 + a, y1), (x0 + a, y0 + b), (x0, y0 + b), (x0, y0 + a), (x0 + a, y0 + a)]
    return None


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    points = outline(shape, box)
    if points is not None:
        draw.polygon(points, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.rectangle(box, fill=fill)


def shrink(box, fraction: float):
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * fraction, (y1 - y0) * fraction
    return (x0 + dx, y0 + dy, x1 - dx, y1 - dy)


def paint(canvas: Image.Image, identity: int, box) -> Image.Image:
    """Paint one subject (box at supersampled scale) onto ``canvas``; returns its mask."""
    shape_i, colour_i, pattern_i = attributes(identity)
    shape, colour = SHAPES[shape_i], COLOURS[colour_i]
    mask = Image.new("L", canvas.size, 0)
    draw_shape(ImageDraw.Draw(mask), shape, box, 255)
    layer = Image.new("RGB", canvas.size, colour)
    if PATTERNS[pattern_i] == "striped":
        draw = ImageDraw.Draw(layer)
        step = max(2, int((box[2] - box[0]) / 5))
        for x in range(int(box[0]), int(box[2]), 2 * step):
            draw.rectangle((x, box[1], x + step - 1, box[3]), fill=tuple(c // 3 for c in colour))
    elif PATTERNS[pattern_i] == "hollow":  # the inside shows the background: only a thick outline is painted
        draw_shape(ImageDraw.Draw(mask), shape, shrink(box, 0.3), 0)
    canvas.paste(layer, (0, 0), mask)
    return mask


def background(rng: np.random.Generator) -> np.ndarray:
    """Light low-frequency texture: a 4×4 random field around 225, bicubically enlarged."""
    field = (225 + rng.integers(-20, 20, (4, 4, 3))).clip(0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(field).resize((SIZE, SIZE), Image.BICUBIC))


def render(scene: Scene, identities: list[int] | None = None) -> Image.Image:
    """The scene (optionally with other identities in the same boxes) at SIZE px."""
    big = SIZE * SUPERSAMPLE
    canvas = Image.fromarray(scene.background).resize((big, big), Image.BICUBIC)
    for identity, box in zip(identities or scene.identities, scene.boxes):
        x0, y0, x1, y1 = (v * SUPERSAMPLE for v in box)
        paint(canvas, identity, (x0, y0, x1 - 1, y1 - 1))  # PIL boxes include their end: stay inside the box
    return canvas.resize((SIZE, SIZE), Image.BOX)


def reference(identity: int) -> tuple[Image.Image, Image.Image]:
    """The subject alone, centred, on a near-white REF_SIZE canvas; and its mask."""
    big = REF_SIZE * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), (248, 248, 248))
    mask = paint(canvas, identity, (big * 0.15, big * 0.15, big * 0.85, big * 0.85))
    return canvas.resize((REF_SIZE, REF_SIZE), Image.BOX), mask.resize((REF_SIZE, REF_SIZE), Image.BOX)


def random_scene(rng: np.random.Generator, held_out: bool | None) -> Scene:
    """A scene whose identity set is in the training split (False), the held-out split (True), or either (None)."""
    while True:
        count = int(rng.integers(2, 4))
        identities = [int(i) for i in rng.choice(NUM_IDENTITIES, count, replace=False)]
        if held_out is None or scene_held_out(identities) == held_out:
            break
    quadrants = [int(q) for q in rng.choice(4, count, replace=False)]
    boxes = []
    for q in quadrants:
        side = int(rng.integers(10, 15))
        x0 = (q % 2) * QUADRANT + int(rng.integers(0, QUADRANT - side + 1))
        y0 = (q // 2) * QUADRANT + int(rng.integers(0, QUADRANT - side + 1))
        boxes.append((x0, y0, x0 + side, y0 + side))
    return Scene(identities, quadrants, boxes, background(rng))


def box_mask(box) -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=255)
    return mask


def disrupted_pair(rng: np.random.Generator, scene: Scene, index: int, tag: str, labels: bool = False) -> dict:
    """Winner = the scene; loser = one subject replaced by an identity not in the scene; prior = its box. With
    ``labels``, also ``subject_scores`` as ``focusdpo pairs`` writes them for a disruption: the replaced subject
    prefers the winner (1 vs 0), every other subject ties (1 vs 1)."""
    slot = int(rng.integers(len(scene.identities)))
    swapped = list(scene.identities)
    swapped[slot] = int(rng.choice([i for i in range(NUM_IDENTITIES) if i not in scene.identities]))
    refs = [reference(i) for i in scene.identities]
    return {"pair_id": f"{tag}-{index:06d}", "prompt": PROMPT, "chosen": render(scene),
            "rejected": render(scene, swapped), "references": [r[0] for r in refs],
            "reference_masks": [r[1] for r in refs], "prior_mask": box_mask(scene.boxes[slot]),
            **({"subject_scores": [[1.0] * len(refs), [0.0 if k == slot else 1.0 for k in range(len(refs))]]}
               if labels else {})}


def make_pairs(count: int, seed: int, tag: str, labels: bool = False) -> Dataset:
    """``count`` instance-disrupted pairs of training-split scenes, in the project's pair schema (with ``labels``
    also ``subject_scores``: the same pairs, the same random draws)."""
    rng = np.random.default_rng(seed)
    rows = [disrupted_pair(rng, random_scene(rng, held_out=False), i, tag, labels) for i in range(count)]
    features = Features({**PAIR_FEATURES, "subject_scores": SUBJECT_SCORES_FEATURE}) if labels else PAIR_FEATURES
    return Dataset.from_list(rows, features=features)


def scene_record(scene: Scene) -> dict:
    return {"identities": scene.identities, "quadrants": scene.quadrants, "boxes": scene.boxes}


def make_scenes(count: int, seed: int, held_out: bool | None) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [random_scene(rng, held_out) for _ in range(count)]


def reference_file(identity: int, mask: bool = False) -> str:
    """The file name of an identity's reference (or its mask) in a prompt set: the oracle reads the identity back
    from it (:func:`identity_of`)."""
    return f"id_{identity:03d}{'_mask' if mask else ''}.png"


def identity_of(path: str) -> int:
    return int(Path(path).stem.split("_")[1])


def write_prompt_set(out: Path, count: int, seed: int) -> None:
    """``count`` training-split scenes as a prompt file for ``focusdpo pairs`` (the jsonl layout): ``prompts.jsonl``
    (one entry per scene: the constant prompt and its references with their masks, under ``refs/``) and
    ``scenes.json`` (identities, quadrants, boxes). Only the references are written: the generator draws the scene."""
    import json

    (out / "refs").mkdir(parents=True, exist_ok=True)
    scenes = make_scenes(count, seed, held_out=False)
    for identity in sorted({i for scene in scenes for i in scene.identities}):
        image, mask = reference(identity)
        image.save(out / "refs" / reference_file(identity))
        mask.save(out / "refs" / reference_file(identity, mask=True))
    lines = [json.dumps({"id": f"scene-{index:05d}", "prompt": PROMPT,
                         "references": [f"refs/{reference_file(i)}" for i in scene.identities],
                         "reference_masks": [f"refs/{reference_file(i, mask=True)}" for i in scene.identities]})
             for index, scene in enumerate(scenes)]
    (out / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    (out / "scenes.json").write_text(json.dumps([scene_record(s) for s in scenes]))

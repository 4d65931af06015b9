"""The procedural toy pair set: multi-subject scenes disrupted by construction (no model, no downloads).

Each toy pair has 2–3 reference subjects (coloured, patterned shapes, each on its own canvas with a
mask). The winner shows every subject as referenced; the loser is the same image with one subject
replaced by a different instance (another colour/shape/pattern), so the pair differs only there and
the disrupted box is the pair's prior mask. No downloads, no third-party files.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset, Features
from PIL import Image, ImageDraw

from focusdpo.data.schema import PAIR_FEATURES, SUBJECT_SCORES_FEATURE

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40),
           "purple": (140, 60, 180)}

SHAPES = ("circle", "square", "triangle")

PATTERNS = ("plain", "striped")

SUPERSAMPLE = 4  # draw large, then downsample: smooth edges at tiny resolutions


def draw_shape(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], shape: str, fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def draw_subject(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], subject: tuple[str, str, str]) -> None:
    colour, shape, pattern = subject
    fill = COLOURS[colour]
    x0, y0, x1, y1 = box
    draw_shape(draw, box, shape, fill)
    if pattern == "striped":  # dark stripes clipped to the shape: the detail the complexity map sees
        step = max(2, (x1 - x0) // 5)
        for x in range(x0, x1, 2 * step):
            draw.rectangle((x, y0, x + step // 2, y1), fill=tuple(c // 3 for c in fill))


def render(subjects: list, boxes: list, size: int, background: np.ndarray) -> tuple[Image.Image, list[Image.Image]]:
    """Draw ``subjects`` in ``boxes`` (at supersampled scale) over ``background``; return image and masks."""
    big = size * SUPERSAMPLE
    canvas = Image.fromarray(background).resize((big, big), Image.NEAREST)
    masks = []
    for subject, box in zip(subjects, boxes):
        mask = Image.new("L", (big, big), 0)
        draw_shape(ImageDraw.Draw(mask), box, subject[1], 255)
        masks.append(mask.resize((size, size), Image.BOX))
        layer = canvas.copy()
        draw_subject(ImageDraw.Draw(layer), box, subject)
        canvas.paste(layer, (0, 0), mask)
    # BOX (area) downsampling: a pixel changes only if its own block touches a changed subject.
    return canvas.resize((size, size), Image.BOX), masks


def random_subject(rng: np.random.Generator, exclude: set) -> tuple[str, str, str]:
    while True:
        subject = (rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(PATTERNS))
        subject = tuple(str(s) for s in subject)
        if subject not in exclude:
            return subject


def layout(rng: np.random.Generator, count: int, big: int) -> list[tuple[int, int, int, int]]:
    """``count`` non-overlapping boxes in side-by-side slots with random size and jitter."""
    slot = big // count
    boxes = []
    for i in range(count):
        side = int(slot * rng.uniform(0.55, 0.85))
        x0 = i * slot + int(rng.integers(0, slot - side + 1))
        y0 = int(rng.integers(0, big - side + 1))
        boxes.append((x0, y0, x0 + side, y0 + side))
    return boxes


def describe(subject: tuple[str, str, str]) -> str:
    colour, shape, pattern = subject
    return f"a {colour} {'striped ' if pattern == 'striped' else ''}{shape}"


def toy_pair(rng: np.random.Generator, size: int, index: int) -> dict:
    count, big = int(rng.integers(2, 4)), size * SUPERSAMPLE
    subjects: list = []
    for _ in range(count):
        subjects.append(random_subject(rng, set(subjects)))
    background = (235 + rng.integers(-12, 12, (8, 8, 3))).clip(0, 255).astype(np.uint8)
    boxes = layout(rng, count, big)
    disrupted = int(rng.integers(count))
    swapped = subjects.copy()
    swapped[disrupted] = random_subject(rng, set(subjects))
    chosen, _ = render(subjects, boxes, size, background)
    rejected, _ = render(swapped, boxes, size, background)
    centred = (big // 5, big // 5, big * 4 // 5, big * 4 // 5)
    plain = np.full((8, 8, 3), 250, np.uint8)
    refs = [render([s], [centred], size, plain) for s in subjects]
    prior = Image.new("L", (big, big), 0)
    ImageDraw.Draw(prior).rectangle(boxes[disrupted], fill=255)
    labels = [[1.0] * count, [0.0 if k == disrupted else 1.0 for k in range(count)]]  # the repainted subject only
    return {"pair_id": f"toy-{index:05d}", "prompt": " and ".join(describe(s) for s in subjects),
            "chosen": chosen, "rejected": rejected, "references": [r[0] for r in refs],
            "reference_masks": [r[1][0] for r in refs], "subject_scores": labels,
            "prior_mask": prior.resize((size, size), Image.BOX).point(lambda v: 255 if v else 0)}


def make_toy_pairs(num_pairs: int = 32, resolution: int = 32, seed: int = 0) -> Dataset:
    """A procedurally generated multi-subject pair set in the pair schema (see :mod:`focusdpo.data`)."""
    rng = np.random.default_rng(seed)
    rows = [toy_pair(rng, resolution, i) for i in range(num_pairs)]
    return Dataset.from_list(rows, features=Features({**PAIR_FEATURES, "subject_scores": SUBJECT_SCORES_FEATURE}))

"""Sampling held-out scenes with the project's sampler and scoring them with the judge.

Every arm and seed samples the same held-out scenes from the same noise seeds (paired comparison). The
references go in as FLUX.2 in-context reference tokens, exactly as in training.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from focusdpo.models import load_backbone
from focusdpo.models.sampling import apply_loras, sample_images
from focusdpo.visualize import image_grid

from . import arms, recipes, world
from . import judge as judging
from .base_model import to_pixels
from .resume import run_stage, settings_of

SAMPLE_KEYS = ("sample_steps", "sample_batch", "png_scenes")


def load_judge(folder: Path) -> judging.Judge:
    model = judging.Judge()
    model.load_state_dict(torch.load(folder / "judge.pt", weights_only=True))
    return model.eval()


def load_scenes(folder: Path) -> list[dict]:
    return json.loads((folder / "held_out.json").read_text())


def sample_arm(pipeline: Path, lora: Path | None, scenes: list[dict], steps: int, batch: int,
               personalization: Path | None = None):
    """``personalization``: a LoRA under ``lora`` (a second-round model: its first round's LoRA, then its own)."""
    backbone = load_backbone("flux2", str(pipeline), reference_size=world.REF_SIZE, max_references=3,
                             max_sequence_length=recipes.COMMON["max_sequence_length"])  # as in training
    if lora is not None or personalization is not None:
        apply_loras(backbone, personalization_lora=personalization, dpo_lora=lora)
    prompts = [world.PROMPT] * len(scenes)
    references = [[world.reference(i)[0] for i in scene["identities"]] for scene in scenes]
    seeds = [10_000 + i for i in range(len(scenes))]  # the same noise for every arm
    return sample_images(backbone, prompts, references, seeds, world.SIZE, steps, batch_size=batch)


def score_images(judge: judging.Judge, scenes: list[dict], images) -> list[dict]:
    predicted = judging.predict(judge, to_pixels(images))
    return [judging.score_scene(scene["identities"], quadrants) for scene, quadrants in zip(scenes, predicted)]


def evaluate_arm(out: Path, label: str, pipeline: Path, lora: Path | None, world_dir: Path, judge_dir: Path,
                 sizes: dict, personalization: Path | None = None) -> None:
    """Writes ``scores.jsonl`` (one line per held-out scene) and ``samples.png`` (the first scenes)."""
    scenes = load_scenes(world_dir)
    images = sample_arm(pipeline, lora, scenes, sizes["sample_steps"], sizes["sample_batch"], personalization)
    scores = score_images(load_judge(judge_dir), scenes, images)
    (out / "scores.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scores))
    shown = sizes["png_scenes"]
    tiles = [reference_tile(scene["identities"]) for scene in scenes[:shown]]
    image_grid([tiles, images[:shown]], ["references", label], min_cell=64).save(out / "samples.png")
    strip(tiles).save(out / "references.png")  # unlabelled strips: the report stacks every arm's into one PNG
    strip(images[:shown]).save(out / "strip.png")


def strip(images) -> Image.Image:
    """Images side by side, at their own size."""
    out = Image.new("RGB", (sum(i.width for i in images), images[0].height), "white")
    for k, image in enumerate(images):
        out.paste(image, (k * images[0].width, 0))
    return out


def tiles_of(path: Path, size: int) -> list[Image.Image]:
    """The ``size`` px images of a strip written by :func:`strip`."""
    image = Image.open(path).convert("RGB")
    return [image.crop((x, 0, x + size, size)) for x in range(0, image.width, size)]


def reference_tile(identities: list[int]) -> Image.Image:
    """The scene's references side by side in one SIZE px tile (quadrants in order)."""
    tile = Image.new("RGB", (world.SIZE, world.SIZE), "white")
    for k, identity in enumerate(identities):
        tile.paste(world.reference(identity)[0], ((k % 2) * world.QUADRANT, (k // 2) * world.QUADRANT))
    return tile


def sample_stage(out: Path, name: str, seed: int, run: Path | None, sizes: dict, base: Path, world_dir: Path,
                 judge_dir: Path, personalization: Path | None = None, evals: str = "eval") -> None:
    """The resumable ``<evals>/<name>/seed<seed>`` stage: ``run`` is the arm's folder (None: the base model);
    ``personalization``: the arm folder of its first round (a second-round arm); ``world_dir``: where the scenes'
    ``held_out.json`` is (the held-out test scenes, or the study's validation scenes)."""
    upstream = [base, world_dir, judge_dir] + [r for r in (run, personalization) if r is not None]
    work = partial(evaluate_arm, label=name, pipeline=base / "pipeline",
                   lora=run / "run" if run is not None else None, world_dir=world_dir, judge_dir=judge_dir, sizes=sizes,
                   personalization=personalization / "run" if personalization is not None else None)
    label = "" if evals == "eval" else f"{evals} "
    run_stage(out / evals / name / f"seed{seed}", f"sampling {label}{name} seed {seed}",
              settings_of(sizes, SAMPLE_KEYS, *upstream), work)


def train_and_sample(out: Path, name: str, arm: dict, seed: int, sizes: dict, base: Path, pairs: Path,
                     world_dir: Path, judge_dir: Path) -> None:
    """One arm × seed: its training stage, then its sampling stage (each skipped when finished)."""
    run = out / "arms" / name / f"seed{seed}"
    run_stage(run, f"arm {name} seed {seed}", {**settings_of(sizes, arms.ARM_KEYS, base, pairs), "arm": arm},
              partial(arms.train_arm, arm=arm, sizes=sizes, pipeline=base / "pipeline", pairs=pairs, seed=seed),
              resumable=True)
    sample_stage(out, name, seed, run, sizes, base, world_dir, judge_dir)

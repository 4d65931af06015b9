"""Validation images during training: every ``validation_steps`` steps, a captioned grid on disk and on trackers.

The policy is sampled with :func:`focusdpo.sampling.sample_images` (the project's one sampler) from fixed seeds
(one per prompt and image), so grids of different steps, and of two runs with the same settings, differ only by
the weights. The reference model is sampled once, at the first validation (it is frozen). Prompts are
``validation_prompts`` or the first ``num_sample_prompts`` training prompts; the in-context flow families get the
references of the first training pairs (cycled). Grids go to ``output_dir/validation/step-N.png`` and
``reference.png`` (atomic writes) and to every image tracker the Trainer runs (TensorBoard, W&B). At the first
validation, focus panels of a few training pairs go to the trackers too (maps from a ``focusdpo focus`` cache
are drawn by a mapper built with the same settings: the cache key guarantees the same maps).

With ``drop_text_encoders`` the prompts are encoded by :func:`prepare_validation` before the text stack is
dropped, and the sampler gets those embeddings.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import TrainerCallback

FOCUS_PANEL_PAIRS = 2  # training pairs whose focus panels are logged


@dataclass
class ValidationSet:
    """What every validation samples: prompts, per-prompt references (PIL), seeds, optional text conditioning."""

    prompts: list[str]
    references: list[list] | None
    seeds: list[list[int]]  # [prompt][image]
    text: dict[str, torch.Tensor] | None = None  # backbone.text_cache(prompts), when the text stack is dropped


def validation_seeds(seed: int, prompts: int, images: int) -> list[list[int]]:
    """Seeds that depend only on the run's ``seed`` and the grid position."""
    return [[zlib.crc32(f"{seed}|validation|{i}|{j}".encode()) for j in range(images)] for i in range(prompts)]


def training_references(dataset, count: int) -> list[list]:
    """References (PIL) of the first training pairs, cycled over ``count`` prompts."""
    from .data import open_image

    rows = [dataset[i] for i in range(min(count, len(dataset)))]
    refs = [[open_image(r, "references", row["pair_id"]).convert("RGB") for r in row["references"]] for row in rows]
    return [refs[i % len(refs)] for i in range(count)]


def prepare_validation(train_cfg, model_cfg, backbone, dataset) -> ValidationSet:
    """Prompts, references and seeds; the prompts' embeddings too when the text encoders will be dropped."""
    from .sampling import REFERENCE_FAMILIES

    prompts = list(train_cfg.validation_prompts) or list(dataset[: max(train_cfg.num_sample_prompts, 1)]["prompt"])
    references = training_references(dataset, len(prompts)) if backbone.family in REFERENCE_FAMILIES else None
    text = None
    if model_cfg.drop_text_encoders and "prompt_embeds" in dataset.column_names:  # now: the text stack is about to go
        with backbone.text_encoders_on_device():
            text = {k: v.detach() for k, v in backbone.text_cache(prompts).items()}
    seeds = validation_seeds(train_cfg.seed, len(prompts), train_cfg.num_validation_images)
    return ValidationSet(prompts, references, seeds, text)


def captioned_grid(images: list[list[Image.Image]], prompts: list[str], label: str) -> Image.Image:
    """One row per prompt (``images[prompt][seed]``), labelled ``label`` / ``prompt i``; the prompts, wrapped to the
    grid's width, written under it as ``i: prompt``."""
    import textwrap

    from .visualize import image_grid

    grid = image_grid(images, [f"{label}\nprompt {i}" for i in range(len(prompts))])
    lines = [part for i, prompt in enumerate(prompts)
             for part in textwrap.wrap(f"{i}: {prompt}", width=max(20, grid.width // 6 - 2))]
    line = 12
    out = Image.new("RGB", (grid.width, grid.height + line * len(lines) + 4), "white")
    out.paste(grid, (0, 0))
    draw = ImageDraw.Draw(out)
    for row, text in enumerate(lines):
        draw.text((6, grid.height + 2 + row * line), text, fill="black")
    return out


def save_png(image: Image.Image, path: Path) -> Path:
    """Write through a staging file and rename: a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    image.save(staging, format="PNG")
    os.replace(staging, path)
    return path


def log_images(trainer, images: dict[str, Image.Image], step: int) -> None:
    """Send images to the Trainer's image trackers: TensorBoard (its callback's writer) and W&B when present."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        writer = getattr(callback, "tb_writer", None) if isinstance(callback, TensorBoardCallback) else None
        if writer is not None:
            for tag, image in images.items():
                writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            writer.flush()
        if type(callback).__name__ == "WandbCallback":  # wandb is an install option: imported only when in use
            import wandb

            if wandb.run is not None:
                wandb.log({tag: wandb.Image(image) for tag, image in images.items()}, commit=False)


class ValidationCallback(TrainerCallback):
    """Every ``validation_steps`` optimizer steps (main process): sample, save the grid, log it."""

    def __init__(self, trainer, validation: ValidationSet):
        self.trainer, self.validation = trainer, validation
        self.folder = Path(trainer.args.output_dir) / "validation"
        self.reference_done = False

    def sample(self) -> list[list[Image.Image]]:
        from .sampling import sample_images

        v, trainer = self.validation, self.trainer
        per_prompt = len(v.seeds[0])
        repeat = lambda items: [x for x in items for _ in range(per_prompt)]  # noqa: E731  prompt-major order
        text = None if v.text is None else {k: t.repeat_interleave(per_prompt, dim=0) for k, t in v.text.items()}
        flat = sample_images(trainer.backbone, repeat(v.prompts), None if v.references is None else
                             repeat(v.references), [s for row in v.seeds for s in row], trainer.data_config.resolution,
                             trainer.args.sample_steps, text=text)
        return [flat[i:i + per_prompt] for i in range(0, len(flat), per_prompt)]

    def sample_reference(self) -> list[list[Image.Image]]:
        from .reference import reference_in_pipeline

        trainer = self.trainer
        with reference_in_pipeline(trainer.backbone, trainer.model_config.reference_mode, trainer.frozen_copy):
            return self.sample()

    def validate(self, step: int) -> dict[str, Image.Image]:
        """Sample and save; returns the images to log, tag → PIL."""
        denoiser = self.trainer.backbone.denoiser
        was_training = denoiser.training
        denoiser.eval()
        logged = {}
        try:
            if not self.reference_done:
                reference = captioned_grid(self.sample_reference(), self.validation.prompts, "reference")
                save_png(reference, self.folder / "reference.png")
                logged["validation/reference"] = reference
                logged.update(self.focus_panels())
                self.reference_done = True
            policy = captioned_grid(self.sample(), self.validation.prompts, f"step {step}")
        finally:
            denoiser.train(was_training)
        save_png(policy, self.folder / f"step-{step}.png")
        logged["validation/policy"] = policy
        return logged

    def focus_panels(self) -> dict[str, Image.Image]:
        """Panels of the first training pairs (focus weights on only), from the run's mapper or a new one."""
        trainer = self.trainer
        if not trainer.focus_config.enabled:
            return {}
        from .mapper import FocusMapper, save_focus_panels

        # Maps read from a `focusdpo focus` cache: a mapper with the same settings (the cache key) draws the same maps.
        mapper = trainer.focus_mapper or FocusMapper(trainer.focus_config, device=trainer.args.device)
        rows = [trainer.pairs[i] for i in range(min(FOCUS_PANEL_PAIRS, len(trainer.pairs)))]
        resolution = trainer.data_config.resolution
        paths = save_focus_panels(rows, mapper, trainer.backbone.loss_grid(resolution), resolution,
                                  self.folder / "focus")
        return {f"validation/focus/{row['pair_id']}": Image.open(p).convert("RGB") for row, p in zip(rows, paths)}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.validation_steps == 0 and state.is_world_process_zero:
            log_images(self.trainer, self.validate(state.global_step), state.global_step)
        return control

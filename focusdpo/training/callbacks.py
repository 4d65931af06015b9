"""Pictures of a run while it trains: one sampling callback for validation grids and per-subject scores.

Every ``every`` optimizer steps (main process) the policy is sampled with :func:`focusdpo.models.sampling.sample_images`
(the project's one sampler) from fixed seeds (one per prompt and image), so grids of different steps, and of two runs
with the same settings, differ only by the weights. The reference model is frozen: it is sampled once, at the first
call. Grids go to ``output_dir/<name>/step-N.png`` (atomic writes) and to every image tracker the Trainer runs
(TensorBoard, W&B).

- ``validation`` (``validation_steps``): prompts are ``validation_prompts`` or the first training prompts; the
  in-context flow families get the references of the first training pairs. The first call also writes
  ``reference.png`` and logs focus panels of a few training pairs.
- ``subject_eval`` (``subject_eval_steps``): the prompts of the first training pairs with references (or of a
  benchmark); reference and policy samples are scored per subject and logged as ``subject_eval/<metric>`` and
  ``..._delta`` (policy − reference) beside the DPO metrics.

With ``drop_text_encoders`` the validation prompts are encoded by :func:`validation_samples` before the text stack is
dropped, and the sampler gets those embeddings.
"""

from __future__ import annotations

import textwrap
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import TrainerCallback

from focusdpo.atomic import save_png
from focusdpo.config.evaluation import EvalConfig
from focusdpo.data.collate import open_image
from focusdpo.data.prompt_sets import load_prompt_set
from focusdpo.evaluation.report import prompt_row
from focusdpo.evaluation.run import (build_scorers, image_seed, read_image, reference_embeddings, score_image,
                                     subject_groups)
from focusdpo.images import to_pil, to_tensor
from focusdpo.models.sampling import sample_images
from focusdpo.training.reference import reference_in_pipeline
from focusdpo.visualize import before_after_grid, image_grid

FOCUS_PANEL_PAIRS = 2  # training pairs whose focus panels are logged at the first validation
SCORED = ("fidelity_mean", "fidelity_min", "ip_conf", "collapsed", "subject_count", "backbone_i")


@dataclass
class SampleSet:
    """What every call samples: prompts, per-prompt references (PIL), seeds, optional text conditioning."""

    prompts: list[str]
    references: list[list[Image.Image]] | None
    seeds: list[list[int]]  # [prompt][image]
    text: dict[str, torch.Tensor] | None = None  # backbone.text_cache(prompts), when the text stack is dropped


def fixed_seeds(seed: int, name: str, prompts: int, images: int) -> list[list[int]]:
    """Seeds that depend only on the run's ``seed``, the callback and the grid position."""
    return [[zlib.crc32(f"{seed}|{name}|{i}|{j}".encode()) for j in range(images)] for i in range(prompts)]


def training_references(dataset, count: int) -> list[list[Image.Image]]:
    """References (PIL) of the first training pairs, cycled over ``count`` prompts."""
    rows = [dataset[i] for i in range(min(count, len(dataset)))]
    refs = [[open_image(r, "references", row["pair_id"]).convert("RGB") for r in row["references"]] for row in rows]
    return [refs[i % len(refs)] for i in range(count)]


def validation_samples(train_cfg, model_cfg, backbone, dataset) -> SampleSet:
    """Prompts, references and seeds; the prompts' embeddings too when the text encoders will be dropped."""
    prompts = list(train_cfg.validation_prompts) or list(dataset[: max(train_cfg.num_sample_prompts, 1)]["prompt"])
    references = training_references(dataset, len(prompts)) if backbone.takes_references else None
    text = None
    if model_cfg.drop_text_encoders and "prompt_embeds" in dataset.column_names:  # now: the text stack is about to go
        with backbone.text_encoders_on_device():
            text = {k: v.detach() for k, v in backbone.text_cache(prompts).items()}
    seeds = fixed_seeds(train_cfg.seed, "validation", len(prompts), train_cfg.num_validation_images)
    return SampleSet(prompts, references, seeds, text)


def captioned_grid(images: list[list[Image.Image]], prompts: list[str], label: str) -> Image.Image:
    """One row per prompt (``images[prompt][seed]``), labelled ``label`` / ``prompt i``; the prompts, wrapped to the
    grid's width, written under it as ``i: prompt``."""
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


@contextmanager
def sampling_mode(trainer, reference: bool = False):
    """The denoiser in eval mode for sampling (training mode restored after); with ``reference``, the pipeline runs
    the frozen reference model instead of the policy."""
    denoiser = trainer.backbone.denoiser
    was_training = denoiser.training
    denoiser.eval()
    try:
        if reference:
            with reference_in_pipeline(trainer.backbone, trainer.model_config.reference_mode, trainer.frozen_copy):
                yield
        else:
            with torch.no_grad():
                yield
    finally:
        denoiser.train(was_training)


def sample_set(trainer, samples: SampleSet, reference: bool = False) -> list[list[Image.Image]]:
    """``images[prompt][seed]`` of the policy (or the reference model) for ``samples``."""
    per_prompt = len(samples.seeds[0])
    repeat = lambda items: [x for x in items for _ in range(per_prompt)]  # noqa: E731  prompt-major order
    text = None if samples.text is None else {k: t.repeat_interleave(per_prompt, 0) for k, t in samples.text.items()}
    with sampling_mode(trainer, reference):
        flat = sample_images(trainer.backbone, repeat(samples.prompts), None if samples.references is None else
                             repeat(samples.references), [s for row in samples.seeds for s in row],
                             trainer.data_config.resolution, trainer.args.sample_steps, text=text)
    return [flat[i:i + per_prompt] for i in range(0, len(flat), per_prompt)]


class SamplingCallback(TrainerCallback):
    """Every ``every`` optimizer steps (main process): sample, save the grid, log it (and, with a ``scorer``, the
    per-subject scores of reference and policy)."""

    def __init__(self, trainer, name: str, every: int, samples: SampleSet, scorer: "SubjectScorer | None" = None):
        self.trainer, self.name, self.every, self.samples, self.scorer = trainer, name, every, samples, scorer
        self.folder = Path(trainer.args.output_dir) / name
        self.reference_images = None  # the reference model is frozen: sampled once

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            print(f"[focusdpo] {self.name}: every {self.every} steps, {len(self.samples.prompts)} prompts sampled into "
                  f"{self.folder}/step-N.png (and the trackers)")

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and state.is_world_process_zero:
            log_images(self.trainer, self.run(state.global_step), state.global_step)
        return control

    def run(self, step: int) -> dict[str, Image.Image]:
        """Sample, score, save; returns the images to log, tag → PIL."""
        logged = {}
        if self.reference_images is None:
            self.reference_images = sample_set(self.trainer, self.samples, reference=True)
            logged.update(self.first_images())
        policy = sample_set(self.trainer, self.samples)
        if self.scorer is None:
            grid = captioned_grid(policy, self.samples.prompts, f"step {step}")
        else:
            metrics, grid = self.scorer.compare(self.reference_images, policy)
            self.trainer.log({f"{self.name}/{k}": v for k, v in metrics.items()})
        save_png(grid, self.folder / f"step-{step}.png")
        logged[f"{self.name}/policy"] = grid
        return logged

    def first_images(self) -> dict[str, Image.Image]:
        """At the first call of a validation: the reference model's grid, and focus panels of training pairs."""
        if self.scorer is not None:
            return {}
        reference = captioned_grid(self.reference_images, self.samples.prompts, "reference")
        save_png(reference, self.folder / "reference.png")
        return {f"{self.name}/reference": reference, **self.focus_panels()}

    def focus_panels(self) -> dict[str, Image.Image]:
        """Panels of the first training pairs (focus weights on only), from the run's mapper or a new one."""
        trainer = self.trainer
        if not trainer.focus_config.enabled:
            return {}
        from focusdpo.focus.mapper import FocusMapper, save_focus_panels

        # Maps read from a `focusdpo focus` cache: a mapper with the same settings (the cache key) draws the same maps.
        mapper = trainer.focus_mapper or FocusMapper(trainer.focus_config, device=trainer.args.device)
        rows = [trainer.pairs[i] for i in range(min(FOCUS_PANEL_PAIRS, len(trainer.pairs)))]
        resolution = trainer.data_config.resolution
        paths = save_focus_panels(rows, mapper, trainer.backbone.loss_grid(resolution), resolution,
                                  self.folder / "focus")
        return {f"{self.name}/focus/{row['pair_id']}": Image.open(p).convert("RGB") for row, p in zip(rows, paths)}


class SubjectScorer:
    """Per-subject fidelity of sampled images against their items' references (the evaluator's scorers)."""

    def __init__(self, trainer, items: list[dict]):
        self.items = items
        source = trainer.args.subject_eval_benchmark or "training pairs"
        self.cfg = EvalConfig(benchmark=source, metrics=["subject", "backbone_i"], score_size=112,
                              subject_top_n=trainer.focus_config.top_n, seed=trainer.args.seed)
        self.scorers = build_scorers(self.cfg, trainer.focus_config, trainer.args.device)
        self.refs = [reference_embeddings(self.scorers, self.cfg, it["views"], it["groups"], it["prompt"])
                     for it in items]

    def samples(self) -> SampleSet:
        references = [[to_pil(it["views"][g[0]]) for g in it["groups"]] for it in self.items]
        seeds = [[image_seed(self.cfg.seed, it["item_id"], 0)] for it in self.items]
        return SampleSet([it["prompt"] for it in self.items], references, seeds)

    def compare(self, reference_images, policy_images) -> tuple[dict[str, float], Image.Image]:
        """Mean scores of the policy samples and their difference to the reference samples; one grid of both."""
        totals, rows = {}, []
        for refs, (before,), (after,) in zip(self.refs, reference_images, policy_images):
            row = {}
            for name, image in (("reference", before), ("policy", after)):
                scores, regions = score_image(self.scorers, self.cfg, to_tensor(image.convert("RGB")), refs)
                for metric in SCORED:
                    if scores.get(metric) is not None:
                        totals.setdefault((name, metric), []).append(scores[metric])
                row[name] = (to_tensor(image.convert("RGB")), regions)
            rows.append((refs["refs"], row))
        return self.means(totals), self.grid(rows)

    @staticmethod
    def means(totals: dict) -> dict[str, float]:
        logs = {}
        for metric in SCORED:
            policy, reference = totals.get(("policy", metric)), totals.get(("reference", metric))
            if policy:
                logs[metric] = float(np.mean(policy))
            if policy and reference and len(policy) == len(reference):
                logs[f"{metric}_delta"] = float(np.mean(policy) - np.mean(reference))
        return logs

    def grid(self, rows) -> Image.Image:
        """One row per item: its prompt, references and both samples with the matched subject regions."""
        tiles = [prompt_row(it["prompt"], refs, shown, it["groups"]) for it, (refs, shown) in zip(self.items, rows)]
        grid = Image.new("RGB", (max(t.width for t in tiles), sum(t.height for t in tiles)), "white")
        for i, tile in enumerate(tiles):
            grid.paste(tile, (0, sum(t.height for t in tiles[:i])))
        return grid


def training_items(pairs, count: int) -> list[dict]:
    """``{item_id, prompt, views, groups}`` from the first training pairs that have references."""
    items = []
    for row in pairs:
        if row["references"]:
            views = [to_tensor(open_image(r, "references", row["pair_id"]).convert("RGB")) for r in row["references"]]
            items.append({"item_id": str(row["pair_id"]), "prompt": row["prompt"], "views": views,
                          "groups": [[k] for k in range(len(views))]})
        if len(items) == count:
            break
    return items


def benchmark_items(path: str, data_root: str | None, count: int) -> list[dict]:
    return [{"item_id": item.item_id, "prompt": item.prompt, "views": [read_image(p) for p in item.references],
             "groups": subject_groups(item)} for item in load_prompt_set(path, data_root=data_root).items[:count]]


def add_sampling_callbacks(trainer, validation: SampleSet | None) -> None:
    """Attach the validation and subject-eval callbacks the training config asks for (fails early on bad input)."""
    args = trainer.args
    if args.subject_eval_steps > 0:
        count = args.subject_eval_prompts
        items = (benchmark_items(args.subject_eval_benchmark, args.subject_eval_data_root, count)
                 if args.subject_eval_benchmark else training_items(trainer.pairs, count))
        if not items:
            raise ValueError("subject_eval_steps is set but no evaluation prompt has references: give "
                             "subject_eval_benchmark, or train on pairs with references")
        scorer = SubjectScorer(trainer, items)
        trainer.add_callback(SamplingCallback(trainer, "subject_eval", args.subject_eval_steps, scorer.samples(),
                                              scorer))
    if validation is not None:
        trainer.add_callback(SamplingCallback(trainer, "validation", args.validation_steps, validation))


def save_before_after(trainer, samples: SampleSet, path: Path) -> Path:
    """One PNG: the reference model's samples, the trained model's (same seeds) and |trained − reference| on one
    shared scale, prompts written under it."""
    before, after = sample_set(trainer, samples, reference=True), sample_set(trainer, samples)
    return save_png(before_after_grid([b[0] for b in before], [a[0] for a in after], samples.prompts), path)


def save_run_pictures(trainer, out: Path, count: int) -> list[str]:
    """At the end of a run: before/after samples of the first ``count`` training prompts, and the focus panels of
    their pairs when the maps were made on the fly; returns what was written, for the closing message."""
    count = min(count, len(trainer.pairs))
    if count == 0:
        return []
    prompts = list(trainer.pairs[:count]["prompt"])
    references = training_references(trainer.pairs, count) if trainer.backbone.takes_references else None
    samples = SampleSet(prompts, references, fixed_seeds(trainer.args.seed, "samples", count, 1))
    written = [save_before_after(trainer, samples, out / "samples_before_after.png").name]
    if trainer.focus_mapper is not None:  # maps made on the fly: show what the loss focused on
        from focusdpo.focus.mapper import save_focus_panels

        rows = [trainer.pairs[i] for i in range(count)]
        resolution = trainer.data_config.resolution
        save_focus_panels(rows, trainer.focus_mapper, trainer.backbone.loss_grid(resolution), resolution, out / "focus")
        written.append("focus/*.png")
    return written

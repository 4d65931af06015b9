"""Training-time evaluation: every N steps, per-subject scores of the policy vs the reference model.

A few fixed prompts (the first training pairs, or a benchmark file) are sampled with the reference model
once and with the policy at every evaluation, same seeds; the per-subject scores of :mod:`focusdpo.evaluate`
are logged as ``subject_eval/<metric>`` (policy) and ``subject_eval/<metric>_delta`` (policy - reference)
next to the DPO metrics, and a grid PNG goes to ``<output_dir>/subject_eval/`` and to TensorBoard / W&B.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from .eval_config import EvalConfig
from .evaluate import build_scorers, image_seed, read_image, reference_embeddings, score_image, subject_groups
from .reference import reference_in_pipeline

LOGGED = ("fidelity_mean", "fidelity_min", "ip_conf", "collapsed", "subject_count", "backbone_i")


def training_items(trainer, count: int) -> list[dict]:
    """``{item_id, prompt, views, groups}`` from the first training pairs that have references."""
    from .data import open_image, to_tensor

    items = []
    for row in trainer.pairs:
        if row["references"]:
            views = [to_tensor(open_image(r, "references", row["pair_id"])) for r in row["references"]]
            items.append({"item_id": str(row["pair_id"]), "prompt": row["prompt"], "views": views,
                          "groups": [[k] for k in range(len(views))]})
        if len(items) == count:
            break
    return items


def benchmark_items(path: str, data_root: str | None, count: int) -> list[dict]:
    from .prompt_sets import load_prompt_set

    return [{"item_id": item.item_id, "prompt": item.prompt, "views": [read_image(p) for p in item.references],
             "groups": subject_groups(item)} for item in load_prompt_set(path, data_root=data_root).items[:count]]


class SubjectEvalCallback(TrainerCallback):
    """Every ``every`` optimizer steps (main process): sample, score, log, and save a grid."""

    def __init__(self, trainer, items: list[dict], every: int, steps: int, resolution: int):
        self.trainer, self.items, self.every = trainer, items, every
        self.steps, self.resolution = steps, resolution
        source = trainer.args.subject_eval_benchmark or "training pairs"
        self.cfg = EvalConfig(benchmark=source, metrics=["subject", "backbone_i"], score_size=112,
                              subject_top_n=trainer.focus_config.top_n, seed=trainer.args.seed)
        self.scorers = build_scorers(self.cfg, trainer.focus_config, trainer.args.device)
        self.refs = [reference_embeddings(self.scorers, self.cfg, it["views"], it["groups"], it["prompt"])
                     for it in items]
        self.seeds = [image_seed(self.cfg.seed, it["item_id"], 0) for it in items]
        self.reference_images = None  # the reference model is frozen: sampled once

    def sample(self, use_reference: bool) -> list:
        from .sampling import sample_images

        trainer = self.trainer
        backbone = trainer.backbone
        prompts = [it["prompt"] for it in self.items]
        references = [[to_pil(it["views"][g[0]]) for g in it["groups"]] for it in self.items]
        if not use_reference:
            return sample_images(backbone, prompts, references, self.seeds, self.resolution, self.steps)
        with reference_in_pipeline(backbone, trainer.model_config.reference_mode, trainer.frozen_copy):
            return sample_images(backbone, prompts, references, self.seeds, self.resolution, self.steps)

    def evaluate(self, step: int) -> dict[str, float]:
        """Score reference and policy samples; returns the logged metrics and writes the grid."""
        denoiser = self.trainer.backbone.denoiser
        was_training = denoiser.training
        denoiser.eval()
        try:
            if self.reference_images is None:
                self.reference_images = self.sample(use_reference=True)
            policy_images = self.sample(use_reference=False)
        finally:
            denoiser.train(was_training)
        totals = {}
        rows = []
        for refs, before, after in zip(self.refs, self.reference_images, policy_images):
            row = []
            for name, image in (("reference", before), ("policy", after)):
                scores, regions = score_image(self.scorers, self.cfg, from_pil(image), refs)
                for metric in LOGGED:
                    if scores.get(metric) is not None:
                        totals.setdefault((name, metric), []).append(scores[metric])
                row.append((name, from_pil(image), regions))
            rows.append((refs["refs"], row))
        logs = {}
        for metric in LOGGED:
            policy, reference = totals.get(("policy", metric)), totals.get(("reference", metric))
            if policy:
                logs[f"subject_eval/{metric}"] = float(np.mean(policy))
            if policy and reference and len(policy) == len(reference):
                logs[f"subject_eval/{metric}_delta"] = float(np.mean(policy) - np.mean(reference))
        self.save_grid(rows, step)
        return logs

    def save_grid(self, rows, step: int) -> None:
        from PIL import Image

        from .eval_report import save_prompt_grid

        folder = Path(self.trainer.args.output_dir) / "subject_eval"
        paths = [save_prompt_grid(folder / f".row{i}.png", it["prompt"], refs, {n: (img, reg) for n, img, reg in row},
                                  it["groups"]) for i, (it, (refs, row)) in enumerate(zip(self.items, rows))]
        tiles = [Image.open(p).convert("RGB") for p in paths]
        grid = Image.new("RGB", (max(t.width for t in tiles), sum(t.height for t in tiles)), "white")
        y = 0
        for tile in tiles:
            grid.paste(tile, (0, y))
            y += tile.height
        grid.save(folder / f"step-{step:06d}.png")
        for p in paths:
            p.unlink()
        log_image(self.trainer, grid, step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and state.is_world_process_zero:
            self.trainer.log(self.evaluate(state.global_step))
        return control


def log_image(trainer, image, step: int) -> None:
    """Send the grid to the trackers that take images (TensorBoard, W&B), through their public APIs."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        writer = getattr(callback, "tb_writer", None) if isinstance(callback, TensorBoardCallback) else None
        if writer is not None:
            writer.add_image("subject_eval/grid", np.asarray(image), step, dataformats="HWC")
    if "wandb" in (trainer.args.report_to or []):
        import wandb

        if wandb.run is not None:
            wandb.log({"subject_eval/grid": wandb.Image(image)}, commit=False)


def to_pil(view: torch.Tensor):
    from PIL import Image

    return Image.fromarray((view.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def from_pil(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255


def add_subject_eval(trainer) -> None:
    """Attach the callback as configured by ``subject_eval_*`` in the training config (fails early on bad input)."""
    args = trainer.args
    count = args.subject_eval_prompts
    items = (benchmark_items(args.subject_eval_benchmark, args.subject_eval_data_root, count)
             if args.subject_eval_benchmark else training_items(trainer, count))
    if not items:
        raise ValueError("subject_eval_steps is set but no evaluation prompt has references: give "
                         "subject_eval_benchmark, or train on pairs with references")
    resolution = trainer.data_config.resolution
    trainer.add_callback(SubjectEvalCallback(trainer, items, args.subject_eval_steps, args.sample_steps, resolution))

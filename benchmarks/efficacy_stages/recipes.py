"""Runs of the project's trainer from generated recipes: every model in the study trains through
``focusdpo.train.main --config`` exactly as a user's run would."""

from __future__ import annotations

from pathlib import Path

import yaml

# Shared by every run: the toy FLUX.2 [klein] at 32 px with 16 px references (16 reference tokens each).
COMMON = {"family": "flux2", "resolution": 32, "reference_size": 16, "max_references": 3,
          "max_sequence_length": 64,  # the constant prompt is short: 512 padded text tokens would dominate attention
          "dataloader_num_workers": 0, "report_to": "none", "sample_every_run": False,
          "save_total_limit": 1, "logging_steps": 5}


def write_recipe(path: Path, fields: dict) -> Path:
    path.write_text(yaml.safe_dump({**COMMON, **fields}, sort_keys=True))
    return path


def train(recipe: Path, run: Path | None = None) -> None:
    """One trainer run in this process (the study sets one thread; the trainer honours the recipe's seed).

    ``run``: the recipe's ``output_dir``. When it holds a checkpoint of an interrupted attempt, training resumes from
    the newest one before the last step (``--resume_from_checkpoint``; the trainer replays noise and data exactly, so
    the result equals an uninterrupted run). A checkpoint at the last step is not resumed from: the trainer would run
    one step past ``max_steps`` (see docs/efficacy-round2.md); arms keep two checkpoints (``save_total_limit: 2``) so
    the one before it is there. A run folder with no usable checkpoint is cleared first (the trainer refuses a fresh
    run into a non-empty folder)."""
    import shutil

    from focusdpo.commands.train import main
    from focusdpo.training.run_folder import checkpoints

    argv = ["--config", str(recipe)]
    if run is not None and run.exists():
        last = yaml.safe_load(recipe.read_text())["max_steps"]
        usable = [c for c in checkpoints(run) if int(c.name.split("-")[1]) < last]
        if usable:
            print(f"[efficacy] {run}: resuming from {usable[0].name}")
            argv += ["--resume_from_checkpoint", str(usable[0])]
        else:
            shutil.rmtree(run)
    main(argv)

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


def train(recipe: Path) -> None:
    """One trainer run in this process (the study sets one thread; the trainer honours the recipe's seed)."""
    from focusdpo.commands.train import main

    main(["--config", str(recipe)])

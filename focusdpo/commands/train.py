"""``focusdpo train --config recipes/X.yaml [--field value ...]``: check the run folder, train, write the run."""

from __future__ import annotations

import sys
from pathlib import Path

from focusdpo.config.recipe import parse_config
from focusdpo.training.run_folder import check_resume_settings, prepare_output_dir, release_lock, resolve_resume
from focusdpo.training.trainer import FocusDPOTrainer, train_and_save


def main(argv: list[str] | None = None) -> FocusDPOTrainer:
    """Parse config, train, and write the LoRA, resolved config, metrics and before/after samples."""
    configs = parse_config(sys.argv[1:] if argv is None else argv)
    train_cfg = configs[0]
    out = Path(train_cfg.output_dir)
    resume = resolve_resume(out, train_cfg.resume_from_checkpoint)
    if resume is not None:
        check_resume_settings(resume, configs)
    model_cfg, data_cfg = configs[1], configs[2]
    inputs = (data_cfg.dataset, model_cfg.pretrained_path, model_cfg.personalization_lora)
    lock = prepare_output_dir(out, resuming=resume is not None, overwrite=train_cfg.overwrite_output_dir,
                              inputs=inputs)
    try:
        return train_and_save(configs, out, resume, freeze_heap=True)  # this process owns its heap
    finally:
        release_lock(lock)

"""Saving and resuming a run: LoRA files in diffusers format, atomic checkpoints, the settings each one ran with.

A mixin of :class:`~focusdpo.train.FocusDPOTrainer` (its ``_save``, ``_load_from_checkpoint`` and
``_save_checkpoint`` are the Trainer's own hooks, overridden: no public hook writes the checkpoint folder).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .export import export_lora
from .recipe import config_fields
from .reference import DPO_ADAPTER
from .run_checks import CHECKPOINT_CONFIG
from .safe_write import disk_full_names


class Checkpointing:
    """Needs the trainer's ``backbone``, ``model_config`` … ``focus_config`` and ``weight_average`` (or None)."""

    def all_configs(self) -> tuple:
        return self.args, self.model_config, self.data_config, self.loss_config, self.focus_config

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Write the DPO LoRA in diffusers format (or the full denoiser for a full fine-tune).

        Under FSDP/DeepSpeed the Trainer passes the gathered ``state_dict`` of the PolicyModel.
        """
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        if state_dict is not None:
            state_dict = {k.removeprefix("denoiser."): v for k, v in state_dict.items()}
        if self.model_config.lora_rank > 0:
            self.backbone.save_lora(output_dir, DPO_ADAPTER, state_dict)
            if self.model_config.save_kohya_format and self.args.should_save:
                export_lora(output_dir, self.model_config.family)
        else:
            self.backbone.denoiser.save_pretrained(Path(output_dir) / self.backbone.denoiser_name)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.model_config.lora_rank > 0:
            self.backbone.load_lora(resume_from_checkpoint, DPO_ADAPTER)
        else:
            loaded = type(self.backbone.denoiser).from_pretrained(
                Path(resume_from_checkpoint) / self.backbone.denoiser_name)
            self.backbone.denoiser.load_state_dict(loaded.state_dict())
        if self.weight_average is not None:
            self.weight_average.load(Path(resume_from_checkpoint))

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint into a staging folder and rename it: a crash never leaves half a checkpoint."""
        run_dir = self.args.output_dir
        staging = os.path.join(run_dir, ".staging")
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self.args.output_dir = staging
        try:
            with disk_full_names(Path(run_dir), Path(staging)):
                super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.args.should_save:
            with disk_full_names(Path(run_dir), Path(staging)):  # what resume compares the next settings with
                write_resolved_config(Path(staging, name, CHECKPOINT_CONFIG), self.all_configs())
                if self.weight_average is not None:
                    self.weight_average.save(Path(staging, name))
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(run_dir, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()


def write_resolved_config(path: Path, configs) -> None:
    """The full configuration the run used (every field, defaults included), as YAML that ``--config`` reads back."""
    import yaml

    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(yaml.safe_dump(config_fields(*configs), sort_keys=True))
    os.replace(staging, path)

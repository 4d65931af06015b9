"""Option names from TRL and the diffusers training scripts, answered with our field and the conversion.

Users arrive with `--pretrained_model_name_or_path` or `beta_dpo: 2500` in their fingers; HfArgumentParser
would answer with a bare "unrecognized arguments" traceback, and a silently renamed field could carry
another scale (diffusers' ``beta_dpo`` multiplies ``ref_diff − model_diff`` directly, our β is halved).
"""

from __future__ import annotations

from collections.abc import Iterable

# their name -> (our field, how to convert)
FOREIGN_NAMES = {
    "pretrained_model_name_or_path": ("pretrained_path", "a local diffusers pipeline folder (no hub ids offline)"),
    "model_name_or_path": ("pretrained_path", "a local diffusers pipeline folder"),
    "dataset_name": ("dataset", "a pair dataset folder, pairs.jsonl folder, Pick-a-Pic parquet or 'toy'"),
    "train_data_dir": ("dataset", "a pair dataset folder, pairs.jsonl folder, Pick-a-Pic parquet or 'toy'"),
    "lora_r": ("lora_rank", "same value"),
    "rank": ("lora_rank", "same value"),
    "train_batch_size": ("per_device_train_batch_size", "same value (pairs per device)"),
    "max_train_steps": ("max_steps", "same value"),
    "checkpointing_steps": ("save_steps", "same value"),
    "checkpoints_total_limit": ("save_total_limit", "same value"),
    "beta_dpo": ("beta", "our β = 2 × beta_dpo (inside = −½·β·Δ): diffusers' beta_dpo 2500 = our beta 5000"),
    "mixed_precision": ("bf16", "bf16: true or fp16: true (and the same --mixed_precision for accelerate launch)"),
}


def foreign_name_message(keys: Iterable[str], where: str) -> str | None:
    """The error for the first TRL/diffusers-script name among ``keys`` (YAML keys or CLI flags), else None."""
    for key in keys:
        name = key.removeprefix("--").split("=", 1)[0].replace("-", "_")
        if name in FOREIGN_NAMES:
            ours, conversion = FOREIGN_NAMES[name]
            return f"{name!r} ({where}) is the TRL/diffusers-scripts name; focusdpo calls it {ours!r}: {conversion}"
    return None


def cli_keys(argv: list[str]) -> list[str]:
    """The ``--flag`` tokens of a command line."""
    return [arg for arg in argv if arg.startswith("--")]

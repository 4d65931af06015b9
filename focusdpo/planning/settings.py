"""The recipe fields that decide a training step's size, read straight from the recipe YAML.

Defaults are the trainer's own (``ModelConfig``/``DataConfig``/``LossConfig`` and transformers'
``TrainingArguments``), so a field a recipe leaves out plans as it would train.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from focusdpo.models.families import QUANTIZE_CHOICES

FLOW_FAMILIES = ("flux2", "flux_kontext")


@dataclass(frozen=True)
class StepSettings:
    """What one optimizer step on one device holds: the model, the batch geometry and the training state."""

    family: str
    pretrained_path: str | None = None
    resolution: int = 32
    max_references: int = 6
    reference_size: int | None = None
    reference_ids: str = "kontext"
    max_sequence_length: int = 512
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_target_modules: tuple[str, ...] = ()
    per_device_train_batch_size: int = 2
    bf16: bool = False
    activation_checkpointing: bool = False
    optim: str = "adamw_torch_fused"
    objective: str = "dpo"
    reference_mode: str = "disable_adapters"
    lambda_sca: float = 0.0
    lambda_md: float = 0.0
    md_rows: str = "matched"
    attention_blocks: str = "double"
    drop_text_encoders: bool = False
    offload_text_encoders: bool = False
    personalization_lora: str | None = None
    quantize_base: str = "none"
    recipe: str | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.quantize_base not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize_base={self.quantize_base!r} is not valid; choose one of: "
                             f"{', '.join(QUANTIZE_CHOICES)}")

    @property
    def references(self) -> int:
        """References per sample in the traced batch: the recipe's most (the worst batch); UNets take none."""
        return self.max_references if self.family in FLOW_FAMILIES else 0

    @property
    def samples_per_pair(self) -> int:
        """Denoiser rows per pair: ``[w; l]`` for DPO, the winner alone for SFT."""
        return 1 if self.objective == "sft" else 2

    @property
    def mosaic(self) -> bool:
        return self.lambda_sca > 0 or self.lambda_md > 0

    @property
    def keeps_text_encoders(self) -> bool:
        """Whether the frozen text stack sits on the device during training (the trainer moves every component
        there unless ``drop_text_encoders`` frees it or ``offload_text_encoders`` keeps it on the CPU)."""
        return not (self.drop_text_encoders or self.offload_text_encoders)


ALIASES = {"gradient_checkpointing": "activation_checkpointing"}


def read_settings(path: str | Path, **overrides) -> StepSettings:
    """The step settings of a recipe YAML; ``overrides`` (e.g. ``per_device_train_batch_size=1``) win.

    Only the fields above are read: the rest of the recipe (data, focus, schedule) does not change a step's size.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no recipe at {path}; pass the path of a recipe YAML, e.g. recipes/tiny_cpu.yaml")
    raw = yaml.safe_load(path.read_text()) or {}
    raw = {ALIASES.get(k, k): v for k, v in raw.items()}
    if "family" not in raw:
        raise ValueError(f"{path} has no `family`; planning needs the model family (sd, sdxl, flux2, flux_kontext)")
    known = {f.name for f in fields(StepSettings)}
    values = {k: v for k, v in raw.items() if k in known}
    values["lora_target_modules"] = tuple(values.get("lora_target_modules") or ())
    settings = StepSettings(**values, recipe=str(path))
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})

"""What the Trainer trains: the denoiser wrapped as a plain module, its DPO LoRA, and the frozen base's dtype."""

from __future__ import annotations

import torch

from focusdpo.config.training import FocusDPOConfig, ModelConfig
from focusdpo.models.base import Backbone, DenoiseInputs, check_lora_file
from focusdpo.training.reference import DPO_ADAPTER, PERSONAL_ADAPTER


class PolicyModel(torch.nn.Module):
    """What the Trainer trains and wraps (DDP/FSDP): the denoiser, called on prepared inputs.

    A plain module without ``.config``: Trainer integrations read ``model.config`` as a transformers
    config, which diffusers models do not have.
    """

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.denoiser = backbone.denoiser
        self.backbone = [backbone]  # a list: keep the frozen pipeline out of this module's parameters

    def forward(self, inputs: DenoiseInputs) -> torch.Tensor:
        return self.backbone[0].predict(self.denoiser, inputs)

    def train(self, mode: bool = True) -> "PolicyModel":
        """The Trainer sets the training mode before every step: the walk over every submodule is skipped when the
        denoiser already is in ``mode`` (whoever switches it, sampling included, does so from the denoiser, which
        sets every submodule)."""
        if mode != self.training or mode != self.denoiser.training:
            super().train(mode)
        return self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer steps (the DPO LoRA, or the whole denoiser in a full fine-tune)."""
        return [p for p in self.parameters() if p.requires_grad]

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False) -> None:
        """Called by the Trainer for ``activation_checkpointing`` (alias ``gradient_checkpointing``):
        diffusers models have their own switch, which checkpoints every block."""
        if every_n_layers != 1 or offload or activation_checkpointing_kwargs:
            raise ValueError("activation_checkpointing_kwargs are not supported for diffusers models: they "
                             "checkpoint every transformer/UNet block; remove the kwargs")
        self.denoiser.enable_gradient_checkpointing()


def add_dpo_lora(backbone: Backbone, cfg: ModelConfig) -> None:
    """Freeze the base, attach the personalization LoRA (frozen) if any, and add the trainable DPO LoRA."""
    from peft import LoraConfig

    denoiser = backbone.denoiser
    if cfg.lora_rank <= 0:  # full fine-tune with a frozen copy as reference
        denoiser.requires_grad_(True)
        return
    denoiser.requires_grad_(False)
    if cfg.reference_mode == "frozen_adapter":
        load_personalization_lora(backbone, cfg.personalization_lora, cfg.personalization_lora_loader)
    targets = cfg.lora_target_modules or list(backbone.default_lora_targets)
    denoiser.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                    target_modules=targets), adapter_name=DPO_ADAPTER)
    active = [PERSONAL_ADAPTER, DPO_ADAPTER] if cfg.reference_mode == "frozen_adapter" else [DPO_ADAPTER]
    denoiser.set_adapters(active)
    for name, param in denoiser.named_parameters():  # set_adapters made every active adapter trainable
        param.requires_grad_(f".{DPO_ADAPTER}." in name)


def load_personalization_lora(backbone: Backbone, path: str, loader: str = "strict") -> None:
    check_lora_file(path, backbone.family, "personalization_lora", loader)
    backbone.add_lora_adapter(path, PERSONAL_ADAPTER, loader)


def half_dtype(args: FocusDPOConfig) -> torch.dtype:
    """The dtype of frozen weights: bf16/fp16 under mixed precision, else fp32."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32

"""What the Trainer trains: the denoiser wrapped as a plain module, its DPO LoRA, and the frozen base's dtype."""

from __future__ import annotations

from operator import attrgetter

import torch

from .config import FocusDPOConfig, ModelConfig
from .grad_buffer import GradientBuffer
from .models import Backbone, DenoiseInputs
from .reference import DPO_ADAPTER, PERSONAL_ADAPTER, submodules
from .run_checks import check_personalization_lora


class PolicyModel(torch.nn.Module):
    """What the Trainer trains and wraps (DDP/FSDP): the denoiser, called on prepared inputs.

    A plain module without ``.config``: Trainer integrations read ``model.config`` as a transformers
    config, which diffusers models do not have.
    """

    def __init__(self, backbone: Backbone, contiguous_gradients: bool = True):
        """``contiguous_gradients``: keep the trainable gradients as views of one buffer, zeroed in place
        (:mod:`~focusdpo.grad_buffer`); for a LoRA, whose gradients are small. A full fine-tune frees them instead,
        so they do not hold memory through the forward."""
        super().__init__()
        self.denoiser = backbone.denoiser
        self.backbone = [backbone]  # a list: keep the frozen pipeline out of this module's parameters
        self.contiguous_gradients = contiguous_gradients
        self.gradients: GradientBuffer | None = None  # made at the first zero_grad, once the model is placed

    def forward(self, inputs: DenoiseInputs) -> torch.Tensor:
        return self.backbone[0].predict(self.denoiser, inputs)

    def train(self, mode: bool = True) -> "PolicyModel":
        """The Trainer calls ``model.train()`` every step; setting the flag on every submodule (~2 ms on the tiny
        UNet) is skipped when each one already has it. The flags are read live (exact whoever changed them), on a
        module list found once per set of adapters (walking the tree itself cost ~1 ms a step)."""
        flags = map(attrgetter("training"), self.module_list())  # in C: a third faster than a generator
        if self.training != mode or not (all(flags) if mode else not any(flags)):
            super().train(mode)
        return self

    def module_list(self) -> list[torch.nn.Module]:
        """The denoiser's modules, re-found when its adapters change (adding one adds modules): the one cache
        the reference pass also reads its LoRA layers from (:func:`~focusdpo.reference.submodules`)."""
        return submodules(self.denoiser)[0]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        if getattr(self, "_trainable", None) is None:
            self._trainable = [p for p in self.parameters() if p.requires_grad]
        return self._trainable

    def shared_values(self) -> torch.nn.Parameter | None:
        """The trainable values as one parameter for an elementwise optimizer (:meth:`GradientBuffer.share_values`),
        or None where the gradients are not one buffer (a full fine-tune, several devices or dtypes, DTensors)."""
        self.zero_grad()  # makes the buffer
        return None if self.gradients is None else self.gradients.share_values()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Only the trainable parameters (the LoRA) hold gradients: skip the walk over the frozen base. With
        ``contiguous_gradients`` they are zeroed in place in one op whatever ``set_to_none`` says (their memory is
        the LoRA's size, and freeing it each step cost more than the zeroing)."""
        params = self.trainable_parameters()
        if self.contiguous_gradients and (self.gradients is None or not self.gradients.holds(params)):
            self.gradients = GradientBuffer.of(params)
            self.contiguous_gradients = self.gradients is not None  # None: several devices or dtypes, DTensors
        if self.gradients is not None:
            return self.gradients.zero_()
        for param in params:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()

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
    check_personalization_lora(path)
    backbone.add_lora_adapter(path, PERSONAL_ADAPTER, loader)


def half_dtype(args: FocusDPOConfig) -> torch.dtype:
    """The dtype of frozen weights: bf16/fp16 under mixed precision, else fp32."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32

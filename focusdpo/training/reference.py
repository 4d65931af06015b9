"""Reference-model modes: context managers that yield the module to run for the reference forward.

Every mode runs under ``torch.no_grad`` and restores the policy in ``finally``, also after an exception.
peft's ``set_adapters`` re-enables ``requires_grad`` on every adapter it activates, so ``frozen_adapter``
also restores the exact trainable flags it found. ``disable_adapters`` uses diffusers' public switch.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

DPO_ADAPTER = "dpo"

PERSONAL_ADAPTER = "personal"


@contextmanager
def kept_trainable_flags(module: torch.nn.Module):
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


@contextmanager
def disabled_adapters(denoiser: torch.nn.Module, frozen_copy: torch.nn.Module | None = None):
    """Fresh LoRA: the reference is the base model (diffusers' public adapter switch, back on in ``finally``).

    Only the DPO adapter is active in this mode, so switching it back on leaves the trainable flags as they were.
    """
    if not getattr(denoiser, "peft_config", None):
        raise ValueError("reference_mode='disable_adapters' needs a LoRA on the denoiser (lora_rank > 0); a full "
                         "fine-tune (lora_rank: 0) uses reference_mode: frozen_copy")
    with torch.no_grad():
        denoiser.disable_adapters()
        try:
            yield denoiser
        finally:
            denoiser.enable_adapters()


@contextmanager
def frozen_adapter(denoiser: torch.nn.Module, frozen_copy: torch.nn.Module | None = None):
    """Post-training a personalization LoRA: the reference is base + that LoRA, without the DPO LoRA."""
    with kept_trainable_flags(denoiser), torch.no_grad():
        denoiser.set_adapters([PERSONAL_ADAPTER])
        try:
            yield denoiser
        finally:
            denoiser.set_adapters([PERSONAL_ADAPTER, DPO_ADAPTER])


@contextmanager
def frozen_copy_reference(denoiser: torch.nn.Module, frozen_copy: torch.nn.Module | None = None):
    """Full fine-tune: the reference is a frozen copy taken before training."""
    if frozen_copy is None:
        raise ValueError("reference_mode='frozen_copy' needs the frozen copy of the denoiser")
    with torch.no_grad():
        yield frozen_copy


REFERENCE_MODES = {"disable_adapters": disabled_adapters, "frozen_adapter": frozen_adapter,
                   "frozen_copy": frozen_copy_reference}


def reference_model(mode: str, denoiser: torch.nn.Module, frozen_copy: torch.nn.Module | None = None):
    """``with reference_model(mode, denoiser) as ref: ref(...)`` runs the DPO reference."""
    if mode not in REFERENCE_MODES:
        raise ValueError(f"unknown reference_mode {mode!r}; choose one of: {', '.join(REFERENCE_MODES)}")
    return REFERENCE_MODES[mode](denoiser, frozen_copy)


@contextmanager
def reference_in_pipeline(backbone, mode: str, frozen_copy: torch.nn.Module | None = None):
    """The backbone's pipeline with the reference as its denoiser (to sample the reference), restored in ``finally``.

    The policy is remembered before the swap: ``backbone.denoiser`` reads the pipeline, so after the swap it is the
    reference (a frozen copy, in full fine-tunes) and must not be what gets put back.
    """
    policy = backbone.denoiser
    with reference_model(mode, policy, frozen_copy) as ref:
        setattr(backbone.pipeline, backbone.denoiser_name, ref)
        try:
            yield backbone
        finally:
            setattr(backbone.pipeline, backbone.denoiser_name, policy)

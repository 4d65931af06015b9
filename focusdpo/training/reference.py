"""Reference-model modes: context managers that yield the module to run for the reference forward.

Every mode runs under ``torch.no_grad`` and restores the policy in ``finally``, also after an exception.
peft's ``set_adapters`` re-enables ``requires_grad`` on every adapter it activates, so ``frozen_adapter``
also restores the exact trainable flags it found. ``disable_adapters`` uses diffusers' public switch.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

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


def adapter_layers(denoiser: torch.nn.Module) -> list[BaseTunerLayer]:
    """The denoiser's peft adapter layers. The trainer finds them once, after its adapters are added: diffusers'
    ``disable_adapters`` walks every module to find them on each call, twice a step."""
    layers = [module for module in denoiser.modules() if isinstance(module, BaseTunerLayer)]
    if not layers:
        raise ValueError("reference_mode='disable_adapters' needs a LoRA on the denoiser (lora_rank > 0); a full "
                         "fine-tune (lora_rank: 0) uses reference_mode: frozen_copy")
    return layers


@contextmanager
def disabled_adapters(denoiser: torch.nn.Module, frozen_copy: torch.nn.Module | None = None,
                      layers: list[BaseTunerLayer] | None = None):
    """Fresh LoRA: the reference is the base model. Each adapter layer's public switch (peft's
    ``enable_adapters``, what diffusers' ``disable_adapters`` calls on every layer) is turned off, and back on in
    ``finally``; ``layers``: :func:`adapter_layers` found once, else now.

    Only the DPO adapter is active in this mode, so switching it back on leaves the trainable flags as they were.
    """
    layers = adapter_layers(denoiser) if layers is None else layers
    with torch.no_grad():
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield denoiser
        finally:
            for layer in layers:
                layer.enable_adapters(True)


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


def reference_model(mode: str, denoiser: torch.nn.Module, frozen_copy: torch.nn.Module | None = None,
                    layers: list[BaseTunerLayer] | None = None):
    """``with reference_model(mode, denoiser) as ref: ref(...)`` runs the DPO reference (``layers``: the adapter
    layers found once, for ``disable_adapters``)."""
    if mode not in REFERENCE_MODES:
        raise ValueError(f"unknown reference_mode {mode!r}; choose one of: {', '.join(REFERENCE_MODES)}")
    if mode == "disable_adapters":
        return disabled_adapters(denoiser, frozen_copy, layers)
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

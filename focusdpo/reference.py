"""Reference-model modes: context managers that yield the module to run for the reference forward.

Every mode runs under ``torch.no_grad`` and restores the policy in ``finally``, also after an exception.
peft's ``set_adapters`` re-enables ``requires_grad`` on every adapter it activates, so ``frozen_adapter``
also restores the exact trainable flags it found. ``disable_adapters`` only flips the LoRA layers' off switch
(:func:`switch_adapters`): the trainable flags are never touched.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer
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


# denoiser → (its adapter names, its submodules, its peft layers). diffusers' disable_adapters / enable_adapters walk
# every submodule on each call (two walks per step, ~16k module visits on the tiny UNet), and so would the policy's
# per-step train-mode check; the modules only change with the adapters.
_SUBMODULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adapter_names(denoiser: torch.nn.Module) -> tuple[str, ...]:
    """The denoiser's adapters: what the cache of its submodules is keyed on (adding an adapter adds modules)."""
    return tuple(getattr(denoiser, "peft_config", {}))


def submodules(denoiser: torch.nn.Module) -> tuple[list[torch.nn.Module], list[BaseTunerLayer]]:
    """Every module of ``denoiser`` (itself included) and its peft adapter layers, found once per set of adapters."""
    adapters = adapter_names(denoiser)
    cached = _SUBMODULES.get(denoiser)
    if cached is None or cached[0] != adapters:
        modules = list(denoiser.modules())
        cached = (adapters, modules, [m for m in modules if isinstance(m, BaseTunerLayer)])
        _SUBMODULES[denoiser] = cached
    return cached[1], cached[2]


def tuner_layers(denoiser: torch.nn.Module) -> list[BaseTunerLayer]:
    """peft's adapter layers in ``denoiser``, found once per set of adapters."""
    layers = submodules(denoiser)[1]
    if not layers:
        raise ValueError("reference_mode='disable_adapters' needs a LoRA on the denoiser (lora_rank > 0); a full "
                         "fine-tune (lora_rank: 0) uses reference_mode: frozen_copy")
    return layers


def switch_adapters(layers: list[BaseTunerLayer], enabled: bool) -> None:
    """Adapters off/on for a ``no_grad`` reference pass, nothing else changed.

    peft's public switch (``BaseTunerLayer.enable_adapters``, what diffusers' ``disable_adapters`` calls per layer)
    also flips ``requires_grad`` on every adapter weight and back, which a ``no_grad`` pass does not need and which
    cost ~1.7 ms a step on the tiny UNet (48 layers, two calls each). For LoRA layers the flag that switch sets
    (``_disable_adapters``, read by the public ``disable_adapters`` property and by ``LoraLayer.forward``) is set
    directly: the one use of a peft private attribute in the project, pinned by tests/test_throughput.py. Other
    layer types take the public switch.
    """
    for layer in layers:
        if isinstance(layer, LoraLayer) and hasattr(layer, "_disable_adapters"):
            layer._disable_adapters = not enabled
        else:
            layer.enable_adapters(enabled)


@contextmanager
def disabled_adapters(denoiser: torch.nn.Module, frozen_copy: torch.nn.Module | None = None):
    """Fresh LoRA: the reference is the base model (adapters off on the peft layers, found once)."""
    layers = tuner_layers(denoiser)
    with torch.no_grad():
        switch_adapters(layers, False)
        try:
            yield denoiser
        finally:
            switch_adapters(layers, True)


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

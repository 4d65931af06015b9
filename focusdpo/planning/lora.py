"""The DPO LoRA as the trainer adds it: which modules it targets, checked against the real denoiser, and its size."""

from __future__ import annotations

import difflib
import inspect
import math
from types import SimpleNamespace

import torch

BACKBONES = {"flux2": ("focusdpo.models.flux", "Flux2Backbone"),
             "flux_kontext": ("focusdpo.models.flux", "FluxKontextBackbone"),
             "sd": ("focusdpo.models.sd", "StableDiffusionBackbone"),
             "sdxl": ("focusdpo.models.sd", "StableDiffusionXLBackbone")}


def backbone_class(family: str):
    import importlib

    module, name = BACKBONES[family]
    return getattr(importlib.import_module(module), name)


def default_targets(family: str, denoiser: torch.nn.Module) -> tuple[str, ...]:
    """The family's ``default_lora_targets``, computed by the backbone's own code for this ``denoiser``.

    FLUX.2's is a property that adds each single block's ``attn.to_out`` by full name: it is evaluated on a
    stand-in holding only the denoiser, so the planner and the trainer cannot disagree about the targets.
    """
    cls = backbone_class(family)
    attribute = inspect.getattr_static(cls, "default_lora_targets")
    if isinstance(attribute, property):
        stand_in = SimpleNamespace(denoiser=denoiser, lora_suffixes=getattr(cls, "lora_suffixes", ()))
        return tuple(attribute.fget(stand_in))
    return tuple(attribute)


def resolve_targets(family: str, denoiser: torch.nn.Module, recipe_targets=()) -> tuple[str, ...]:
    """The recipe's ``lora_target_modules``, or the family's defaults when it lists none (as the trainer does)."""
    return tuple(recipe_targets) or default_targets(family, denoiser)


def matches(name: str, target: str) -> bool:
    """peft's rule for a list of targets: the module's full name is the target or ends with ``.target``."""
    return name == target or name.endswith("." + target)


def targeted_modules(denoiser: torch.nn.Module, targets) -> dict[str, torch.nn.Module]:
    """Every module a LoRA with ``targets`` would wrap, by full name."""
    return {name: module for name, module in denoiser.named_modules()
            if name and any(matches(name, t) for t in targets)}


def check_targets(denoiser: torch.nn.Module, targets) -> None:
    """Refuse a target that names no module, or a module LoRA cannot wrap: peft skips unmatched names silently
    as long as one other target matches, and the run would train fewer layers than the recipe says."""
    names = [name for name, _ in denoiser.named_modules() if name]
    suffixes = sorted({".".join(name.split(".")[-k:]) for name in names for k in (1, 2)})
    for target in targets:
        hits = [module for name, module in denoiser.named_modules() if name and matches(name, target)]
        if not hits:
            close = difflib.get_close_matches(target, suffixes, n=3)
            raise ValueError(f"lora_target_modules entry {target!r} names no module of this "
                             f"{type(denoiser).__name__}; fix the recipe's lora_target_modules"
                             + (f" (did you mean {', '.join(map(repr, close))}?)" if close else
                                " (leave it empty for the family's defaults)"))
        wrong = [type(m).__name__ for m in hits if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        if wrong:
            raise ValueError(f"lora_target_modules entry {target!r} matches {wrong[0]} modules, which LoRA does "
                             "not wrap here; target their Linear projections (e.g. to_q, to_out.0) instead")


def lora_shapes(module: torch.nn.Module, rank: int) -> list[tuple[int, ...]]:
    """Shapes of the A and B matrices peft adds to one layer: ``(r, in)`` and ``(out, r)`` for a Linear,
    ``(r, in, kh, kw)`` and ``(out, r, 1, 1)`` for a convolution."""
    if isinstance(module, torch.nn.Linear):
        return [(rank, module.in_features), (module.out_features, rank)]
    if isinstance(module, torch.nn.Conv2d):
        return [(rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)]
    return []


def lora_parameter_shapes(denoiser: torch.nn.Module, targets, rank: int) -> list[tuple[int, ...]]:
    return [shape for module in targeted_modules(denoiser, targets).values() for shape in lora_shapes(module, rank)]


def lora_parameter_count(denoiser: torch.nn.Module, targets, rank: int) -> int:
    """``Σ r·(in + out)`` over the targeted Linear layers (``r·(in·kh·kw + out)`` for a convolution): what peft
    adds, computed by hand."""
    return sum(math.prod(shape) for shape in lora_parameter_shapes(denoiser, targets, rank))


def add_lora(denoiser: torch.nn.Module, rank: int, alpha: float, targets) -> None:
    """Freeze the base and add the trainable LoRA with peft, as ``focusdpo`` adds the DPO adapter, on the
    denoiser's device. ``rank == 0`` is a full fine-tune: everything stays trainable. Check ``targets`` first
    (:func:`check_targets`): peft only refuses a list of which nothing matches."""
    from peft import LoraConfig

    if rank <= 0:
        denoiser.requires_grad_(True)
        return
    denoiser.requires_grad_(False)
    with torch.device(next(denoiser.parameters()).device):  # on meta, the LoRA is never allocated either
        denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                        target_modules=list(targets)))

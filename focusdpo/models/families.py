"""What each model family is, as plain data: the one table every other module asks (no torch, no diffusers).

A new family adds a row here, its :class:`~focusdpo.models.base.Backbone` adapter and its loader in
``focusdpo.models``; nothing outside ``models/`` names a family. :mod:`focusdpo.config` reads this module (and no
other of ``models/``) to validate ``family`` and the family-specific options before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    denoiser: str  # "unet" or "transformer": the pipeline attribute and the LoRA key prefix
    flow: bool  # flow matching (velocity target, σ in [0, 1]) rather than DDPM noise prediction
    takes_references: bool  # reference images are model inputs (in-context tokens)
    export_format: str  # "kohya" (A1111/ComfyUI/kohya SD keys) or "comfyui" (diffusers FLUX keys, ComfyUI names)
    patchify: int  # loss-grid cells per VAE latent cell side (transformers pack 2x2 latents into one token)


FAMILIES = {
    "sd": Family("unet", flow=False, takes_references=False, export_format="kohya", patchify=1),
    "sdxl": Family("unet", flow=False, takes_references=False, export_format="kohya", patchify=1),
    "flux2": Family("transformer", flow=True, takes_references=True, export_format="comfyui", patchify=2),
    "flux_kontext": Family("transformer", flow=True, takes_references=True, export_format="comfyui", patchify=2),
}
FLOW_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.flow)

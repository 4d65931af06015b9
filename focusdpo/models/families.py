"""What each model family is, and each way of quantizing its frozen base, as plain data: the tables every other
module asks (no torch, no diffusers).

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


@dataclass(frozen=True)
class Quantization:
    """A way to store the frozen base's Linear weights (``ModelConfig.quantize_base``): the loader applies it through
    diffusers' quantization configs, the planner counts its bytes. Other layers (norms, biases, convolutions,
    embeddings) follow the run's precision as without quantization."""

    backend: str  # the package that quantizes (an optional extra: pip install "focusdpo[quantization]")
    needs_cuda: bool  # the backend's kernels (or diffusers' loader for it) need a CUDA device
    bytes_per_weight: float  # per element of a quantized weight, block scales included
    bytes_per_row: int  # per output row of a quantized weight: its per-row scale
    saves_dequantized: bool  # autograd keeps a compute-dtype copy of each weight for backward (the planner traces it)


# torchao's Int8Tensor: int8 values and one scale per row in the dtype it was loaded in (float32); its linear multiplies
# the activations by a copy of the weight in their dtype, which autograd keeps for the input gradient. bitsandbytes'
# LLM.int8: int8 values and one fp32 scale per row. bitsandbytes' NF4 with double quantization (QLoRA): 4 bits per
# weight, an 8-bit absmax per block of 64 and an fp32 constant per 256 blocks. Both bitsandbytes types dequantize
# inside their autograd functions and keep only the packed weight for backward.
QUANTIZATIONS = {
    "int8_weight_only": Quantization("torchao", needs_cuda=False, bytes_per_weight=1.0, bytes_per_row=4,
                                     saves_dequantized=True),
    "int8": Quantization("bitsandbytes", needs_cuda=True, bytes_per_weight=1.0, bytes_per_row=4,
                         saves_dequantized=False),
    "nf4": Quantization("bitsandbytes", needs_cuda=True, bytes_per_weight=0.5 + 1 / 64 + 4 / (64 * 256),
                        bytes_per_row=0, saves_dequantized=False),
}
QUANTIZE_CHOICES = ("none", *QUANTIZATIONS)

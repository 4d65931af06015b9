"""The frozen base quantized (``ModelConfig.quantize_base``): the refusals before anything loads, diffusers' config
for a pretrained folder, torchao's ``quantize_`` for a generator built in code.

Only the denoiser's Linear weights are quantized, before the DPO LoRA is added: peft then wraps each quantized
Linear in its torchao or bitsandbytes LoRA layer, and switching the adapters off (the reference pass) leaves the
quantized base itself. The other layers of a quantized denoiser load in float32, as an unquantized one does, and the
trainer casts them (bf16) and the LoRA (fp32) as usual; quantized weights keep their storage under ``.to(dtype)``.
What each choice is lives in :data:`focusdpo.models.families.QUANTIZATIONS`.
"""

from __future__ import annotations

import importlib

import torch

from focusdpo.errors import ConfigError
from focusdpo.models.families import QUANTIZATIONS, QUANTIZE_CHOICES

INSTALL = 'pip install "focusdpo[quantization]"'

NF4_COMPUTE_DTYPE = torch.bfloat16  # bitsandbytes dequantizes NF4 blocks to this dtype for each matmul


def check_quantization(name: str | None, pretrained: bool) -> None:
    """Refuse, before any weight loads, a quantization this machine or this model cannot do: an unknown name, a
    CUDA-only backend without CUDA, a backend package that is not installed."""
    if not name or name == "none":
        return
    if name not in QUANTIZATIONS:
        raise ConfigError(f"quantize_base={name!r} is not valid; choose one of: {', '.join(QUANTIZE_CHOICES)}")
    spec = QUANTIZATIONS[name]
    if spec.needs_cuda and not torch.cuda.is_available():
        raise ConfigError(f"quantize_base={name!r} uses {spec.backend}, which needs a CUDA GPU, and none is visible "
                          "here: run on a GPU, or use quantize_base: int8_weight_only (torchao, also on CPU)")
    if spec.needs_cuda and not pretrained:
        raise ConfigError(f"quantize_base={name!r} ({spec.backend}) quantizes a checkpoint while diffusers loads it: "
                          "set pretrained_path, or use quantize_base: int8_weight_only for the tiny generator")
    try:
        importlib.import_module(spec.backend)
    except ImportError as error:
        raise ConfigError(f"quantize_base={name!r} needs the {spec.backend} package, which is not installed "
                          f"({error}): {INSTALL}, or set quantize_base: none") from error


def quantization_config(name: str):
    """diffusers' public config of ``name`` for ``from_pretrained(quantization_config=...)``."""
    if name == "int8_weight_only":
        from diffusers import TorchAoConfig
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    from diffusers import BitsAndBytesConfig

    if name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=NF4_COMPUTE_DTYPE)


def pipeline_load_options(name: str | None, denoiser: str) -> dict:
    """Extra ``Pipeline.from_pretrained`` arguments that quantize the ``denoiser`` component alone (diffusers'
    ``PipelineQuantizationConfig``). Its other layers load in float32 like every unquantized component, so the
    trainer casts them (and the LoRA) as without quantization; without a dtype diffusers would pick bf16 (torchao)
    or fp16 (bitsandbytes), and for torchao it logs that only bf16 is supported, which holds for its int4 types,
    not for the int8 weight-only one (its linear computes in the activations' dtype)."""
    if not name or name == "none":
        return {}
    from diffusers import PipelineQuantizationConfig

    return {"quantization_config": PipelineQuantizationConfig(quant_mapping={denoiser: quantization_config(name)}),
            "dtype": torch.float32}


QUANTIZED_TENSOR_PACKAGES = ("torchao", "bitsandbytes")


def is_quantized(param: torch.Tensor) -> bool:
    """A weight stored by a quantization backend (a tensor subclass or parameter class of its package)."""
    return type(param).__module__.startswith(QUANTIZED_TENSOR_PACKAGES)


def quantize_in_place(denoiser: torch.nn.Module, name: str | None) -> None:
    """Quantize a denoiser built in code (the tiny generators) as diffusers' torchao loader does: every Linear
    weight, with torchao's public ``quantize_``, before any LoRA exists. It keeps its dtype (float32 for the tiny
    generators, which train on CPU in float32)."""
    if not name or name == "none":
        return
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(denoiser, Int8WeightOnlyConfig())


def quantized_linears(denoiser: torch.nn.Module) -> list[torch.nn.Linear]:
    """The layers a ``quantize_base`` choice converts: every ``nn.Linear`` of the base denoiser (diffusers' torchao and
    bitsandbytes loaders skip only a model's ``_keep_in_fp32_modules``, which none of the families here has). Once
    peft has added a LoRA, its own ``lora_A``/``lora_B`` Linears are not the base's and are left out."""
    return [module for name, module in denoiser.named_modules()
            if isinstance(module, torch.nn.Linear) and ".lora_" not in f".{name}"]


def cast_unquantized(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """What ``module.to(dtype)`` does to floating-point parameters and buffers, quantized weights left as they are:
    diffusers refuses ``.to(dtype)`` on a model it quantized, whose other layers still follow the run's precision."""
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_floating_point() and not is_quantized(tensor):
                tensor.data = tensor.data.to(dtype)

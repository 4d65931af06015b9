"""Backbone adapters, one per model family, chosen by ``ModelConfig.family``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from focusdpo.models.families import FAMILIES

if TYPE_CHECKING:
    from focusdpo.models.base import Backbone


def _sd():
    from diffusers import StableDiffusionPipeline

    from focusdpo.models.sd import StableDiffusionBackbone
    from focusdpo.models.tiny import tiny_sd_pipeline
    return StableDiffusionBackbone, StableDiffusionPipeline, tiny_sd_pipeline


def _sdxl():
    from diffusers import StableDiffusionXLPipeline

    from focusdpo.models.sd import StableDiffusionXLBackbone
    from focusdpo.models.tiny import tiny_sdxl_pipeline
    return StableDiffusionXLBackbone, StableDiffusionXLPipeline, tiny_sdxl_pipeline


def _flux2():
    from focusdpo.models.flux import Flux2, Flux2Backbone
    from focusdpo.models.tiny_flux import tiny_flux2_pipeline
    return Flux2Backbone, Flux2, tiny_flux2_pipeline


def _flux_kontext():
    from focusdpo.models.flux import Flux, FluxKontextBackbone
    from focusdpo.models.tiny_flux import tiny_flux_kontext_pipeline
    return FluxKontextBackbone, Flux, tiny_flux_kontext_pipeline


# family -> loader of (adapter class, pipeline class, tiny pipeline builder); imported lazily.
FAMILY_LOADERS = {"sd": _sd, "sdxl": _sdxl, "flux2": _flux2, "flux_kontext": _flux_kontext}


def load_backbone(family: str, pretrained_path: str | None = None, tiny_seed: int = 0,
                  quantize_base: str | None = None, **options) -> Backbone:
    """Build the adapter for ``family`` from a local pipeline directory, or a tiny random one if no path; with
    ``quantize_base`` (``ModelConfig.quantize_base``) its denoiser's Linear weights are quantized as they load,
    refused before anything loads where this machine cannot (:mod:`focusdpo.models.quantize`).

    ``options`` go to the adapter (see ``ModelConfig.adapter_options``).
    """
    from focusdpo.models.quantize import check_quantization, pipeline_load_options, quantize_in_place

    if family not in FAMILY_LOADERS:
        raise ValueError(f"unknown model family {family!r}; choose one of: {', '.join(FAMILY_LOADERS)}")
    check_quantization(quantize_base, pretrained=bool(pretrained_path))
    adapter_cls, pipeline_cls, tiny = FAMILY_LOADERS[family]()
    if not pretrained_path:
        pipeline = tiny(tiny_seed)
        quantize_in_place(getattr(pipeline, FAMILIES[family].denoiser), quantize_base)
        return adapter_cls(pipeline, **options)
    path = Path(pretrained_path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"pretrained_path={pretrained_path!r} is not a diffusers pipeline directory "
                                "(no model_index.json); point it at a local `save_pretrained` folder")
    check_family(path, family, pipeline_cls)
    extra = pipeline_load_options(quantize_base, FAMILIES[family].denoiser)
    return adapter_cls(pipeline_cls.from_pretrained(str(path), local_files_only=True, **extra), **options)


def loss_grid(family: str, pretrained_path: str | None, resolution: int) -> tuple[int, int]:
    """The loss grid ``(h, w)`` of a family at ``resolution`` px, read from the VAE config (no weights load)."""
    if not pretrained_path:
        return load_backbone(family).loss_grid(resolution)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.load_config(str(Path(pretrained_path) / "vae"))
    side = resolution // (2 ** (len(vae["block_out_channels"]) - 1)) // FAMILIES[family].patchify
    return side, side


def check_family(path: Path, family: str, pipeline_cls) -> None:
    """Refuse a checkpoint of another family before loading gigabytes of weights."""
    import json

    saved = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
    expected = pipeline_cls.__name__.removesuffix("Pipeline")
    if not saved.startswith(expected) or (family == "sd" and saved.startswith("StableDiffusionXL")):
        raise ValueError(f"{path} holds a {saved} checkpoint but family={family!r} expects {pipeline_cls.__name__}; "
                         "set `family` to match the checkpoint")


__all__ = ["Backbone", "DenoiseInputs", "load_backbone", "loss_grid"]


def resolve_grid(model_cfg, resolution: int) -> tuple[int, int]:
    """:func:`loss_grid` of the recipe's model (its family and pretrained_path)."""
    return loss_grid(model_cfg.family, model_cfg.pretrained_path, resolution)

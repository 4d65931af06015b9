"""Backbone adapters, one per model family, chosen by ``ModelConfig.family``."""

from __future__ import annotations

from pathlib import Path

from .base import Backbone, DenoiseInputs


def _sd():
    from diffusers import StableDiffusionPipeline

    from .sd import StableDiffusionBackbone
    from .tiny import tiny_sd_pipeline
    return StableDiffusionBackbone, StableDiffusionPipeline, tiny_sd_pipeline


def _sdxl():
    from diffusers import StableDiffusionXLPipeline

    from .sd import StableDiffusionXLBackbone
    from .tiny import tiny_sdxl_pipeline
    return StableDiffusionXLBackbone, StableDiffusionXLPipeline, tiny_sdxl_pipeline


# family -> loader of (adapter class, pipeline class, tiny pipeline builder); imported lazily.
FAMILY_LOADERS = {"sd": _sd, "sdxl": _sdxl}


def load_backbone(family: str, pretrained_path: str | None = None, tiny_seed: int = 0) -> Backbone:
    """Build the adapter for ``family`` from a local pipeline directory, or a tiny random one if no path."""
    if family not in FAMILY_LOADERS:
        raise ValueError(f"unknown model family {family!r}; choose one of: {', '.join(FAMILY_LOADERS)}")
    adapter_cls, pipeline_cls, tiny = FAMILY_LOADERS[family]()
    if not pretrained_path:
        return adapter_cls(tiny(tiny_seed))
    path = Path(pretrained_path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"pretrained_path={pretrained_path!r} is not a diffusers pipeline directory "
                                "(no model_index.json); point it at a local `save_pretrained` folder")
    check_family(path, family, pipeline_cls)
    return adapter_cls(pipeline_cls.from_pretrained(str(path), local_files_only=True))


def check_family(path: Path, family: str, pipeline_cls) -> None:
    """Refuse a checkpoint of another family before loading gigabytes of weights."""
    import json

    saved = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
    expected = pipeline_cls.__name__.removesuffix("Pipeline")
    if not saved.startswith(expected) or (family == "sd" and saved.startswith("StableDiffusionXL")):
        raise ValueError(f"{path} holds a {saved} checkpoint but family={family!r} expects {pipeline_cls.__name__}; "
                         "set `family` to match the checkpoint")


__all__ = ["Backbone", "DenoiseInputs", "load_backbone"]

"""Export a trained LoRA for the tools people sample with (A1111, ComfyUI, kohya scripts).

- SD / SDXL: kohya naming (``lora_unet_…​.lora_down/lora_up/alpha``) from diffusers' own
  ``convert_state_dict_to_kohya``, with ``.alpha`` set from the stored LoraConfig: the converter writes
  alpha = rank, which rescales a LoRA trained with ``lora_alpha ≠ rank`` by ``rank / alpha``.
- FLUX.1 / FLUX.2: diffusers 0.42 has converters *into* diffusers for kohya/BFL/XLabs FLUX files but none
  out of it (the BFL layout fuses q/k/v, and in single blocks also the MLP, into one linear, so a LoRA
  on separate projections must be re-packed). ComfyUI maps diffusers-named FLUX keys
  (``transformer.…``) itself but reads the scale only from ``.alpha`` keys, so the export folds
  ``alpha / rank`` into ``lora_B``: the file then means the same to every loader (docs/ecosystem.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from focusdpo.atomic import atomic_write, output_lock
from focusdpo.errors import LoraFileError, OutputError
from focusdpo.models.base import LORA_WEIGHTS_NAME, check_lora_family, lora_denoisers, sort_safetensors_header
from focusdpo.models.families import FAMILIES

EXPORT_NAMES = {"kohya": "lora_kohya.safetensors", "comfyui": "lora_comfyui.safetensors"}


def read_lora(file: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and the stored LoraConfig (keys without the ``unet.``/``transformer.`` prefix) of a LoRA file."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        stored = (f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if not stored:
        raise ValueError(f"{file} carries no LoraConfig metadata ({LORA_ADAPTER_METADATA_KEY}), so its alpha is "
                         "unknown; export LoRAs written by focusdpo or by diffusers' save_lora_weights")
    config = {key.split(".", 1)[-1]: value for key, value in json.loads(stored).items()}
    return tensors, config


def lora_scale(config: dict) -> float:
    """peft's scale of one uniform-rank adapter: ``alpha / r`` (``alpha / √r`` with rsLoRA)."""
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("per-module rank_pattern/alpha_pattern LoRAs have no single alpha; export is for "
                         "uniform-rank LoRAs (what focusdpo trains)")
    rank = config["r"]
    return config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)


def kohya_state_dict(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers/peft UNet LoRA keys → kohya keys, each module's ``.alpha`` = ``scale · rank``."""
    from diffusers.utils import convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya(tensors)
    alpha = lora_scale(config) * config["r"]  # kohya's loaders scale by alpha / rank
    return {key: torch.tensor(alpha, dtype=torch.float32) if key.endswith(".alpha") else value.contiguous()
            for key, value in kohya.items()}


def scale_folded_state_dict(tensors: dict[str, torch.Tensor], config: dict) -> tuple[dict, dict]:
    """The same keys with ``lora_B`` multiplied by the scale, and a LoraConfig with ``lora_alpha = r``."""
    scale = lora_scale(config)
    folded = {key: (value.float() * scale).to(value.dtype) if ".lora_B." in key else value
              for key, value in tensors.items()}
    return folded, {**config, "lora_alpha": config["r"], "use_rslora": False}


def target_is_source(out, source: Path) -> bool:
    return out is not None and Path(out).resolve() == source.resolve()


def kohya_metadata(config: dict, family: str) -> dict[str, str]:
    """What kohya-style tools read from the header: rank, alpha and the base model's version."""
    version = {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0"}.get(family, family)
    return {"ss_network_dim": str(config["r"]), "ss_network_alpha": str(lora_scale(config) * config["r"]),
            "ss_base_model_version": version, "ss_network_module": "networks.lora"}


def export_lora(lora: str | Path, family: str, out: str | Path | None = None) -> Path:
    """Write the loadable export of ``lora`` (a run folder or .safetensors file) for ``family``; returns its path."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors.torch import save_file


    source = Path(lora) / LORA_WEIGHTS_NAME if Path(lora).is_dir() else Path(lora)
    if not source.is_file():
        raise FileNotFoundError(f"no LoRA file at {source}; give a run folder holding {LORA_WEIGHTS_NAME} "
                                "or the .safetensors file itself")
    tensors, config = read_lora(source)
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} has no export; choose one of: {', '.join(FAMILIES)}")
    check_lora_family(tensors, family, source, fix="export it as {fits}")
    if not lora_denoisers(tensors):
        raise LoraFileError(f"{source} is not a diffusers-format LoRA (no key starts with unet. or transformer.): "
                            "export LoRAs written by focusdpo or by diffusers' save_lora_weights")
    if target_is_source(out, source):
        raise OutputError(f"--out {out} is the LoRA being exported: write the export to another file")
    if FAMILIES[family].export_format == "kohya":
        state, metadata, kind = kohya_state_dict(tensors, config), kohya_metadata(config, family), "kohya"
    else:
        state, folded = scale_folded_state_dict(tensors, config)
        prefix = next(iter(tensors)).split(".", 1)[0]
        metadata = {LORA_ADAPTER_METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in folded.items()})}
        kind = "comfyui"
    target = Path(out) if out else source.parent / EXPORT_NAMES[kind]
    with output_lock(target):  # two exports to one file: the second is refused, not interleaved
        atomic_write(target, lambda staging: save_file(state, str(staging), metadata={"format": "pt", **metadata}))
        sort_safetensors_header(target)  # the same LoRA exports to the same bytes
    return target


def family_of_run(lora: Path) -> str | None:
    """The ``family`` recorded in the run's ``config.yaml`` beside the LoRA, if there is one."""
    import yaml

    folder = lora if lora.is_dir() else lora.parent
    config = folder / "config.yaml"
    return yaml.safe_load(config.read_text()).get("family") if config.is_file() else None

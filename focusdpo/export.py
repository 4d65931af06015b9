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

import argparse
import json
import math
import os
from pathlib import Path

import torch

KOHYA_FAMILIES = ("sd", "sdxl")
FLOW_FAMILIES = ("flux2", "flux_kontext")
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


def export_lora(lora: str | Path, family: str, out: str | Path | None = None) -> Path:
    """Write the loadable export of ``lora`` (a run folder or .safetensors file) for ``family``; returns its path."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors.torch import save_file

    from .models.base import LORA_WEIGHTS_NAME

    source = Path(lora) / LORA_WEIGHTS_NAME if Path(lora).is_dir() else Path(lora)
    if not source.is_file():
        raise FileNotFoundError(f"no LoRA file at {source}; give a run folder holding {LORA_WEIGHTS_NAME} "
                                "or the .safetensors file itself")
    tensors, config = read_lora(source)
    if family in KOHYA_FAMILIES:
        state, metadata, kind = kohya_state_dict(tensors, config), {"ss_network_dim": str(config["r"])}, "kohya"
    elif family in FLOW_FAMILIES:
        state, folded = scale_folded_state_dict(tensors, config)
        prefix = next(iter(tensors)).split(".", 1)[0]
        metadata = {LORA_ADAPTER_METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in folded.items()})}
        kind = "comfyui"
    else:
        raise ValueError(f"family={family!r} has no export; choose one of: {', '.join(KOHYA_FAMILIES + FLOW_FAMILIES)}")
    target = Path(out) if out else source.parent / EXPORT_NAMES[kind]
    staging = target.with_name(f".{target.name}.tmp")
    save_file(state, str(staging), metadata={"format": "pt", **metadata})
    os.replace(staging, target)  # atomic: a reader never sees half a file
    return target


def family_of_run(lora: Path) -> str | None:
    """The ``family`` recorded in the run's ``config.yaml`` beside the LoRA, if there is one."""
    import yaml

    folder = lora if lora.is_dir() else lora.parent
    config = folder / "config.yaml"
    return yaml.safe_load(config.read_text()).get("family") if config.is_file() else None


def export_main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="focusdpo export", description=__doc__.split("\n\n")[0])
    parser.add_argument("lora", help="Run folder (holding pytorch_lora_weights.safetensors) or a LoRA file.")
    parser.add_argument("--family", choices=KOHYA_FAMILIES + FLOW_FAMILIES,
                        help="Backbone family; default: `family` from the run's config.yaml.")
    parser.add_argument("--out", help=f"Output file; default: {EXPORT_NAMES['kohya']} (SD/SDXL) or "
                                      f"{EXPORT_NAMES['comfyui']} (FLUX) beside the LoRA.")
    args = parser.parse_args(argv)
    family = args.family or family_of_run(Path(args.lora))
    if family is None:
        parser.error(f"no config.yaml beside {args.lora} names the family: pass --family")
    target = export_lora(args.lora, family, args.out)
    print(f"[focusdpo] {family} LoRA exported to {target}")
    return target

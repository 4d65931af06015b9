"""Real denoiser configurations as named presets, and the frozen components that sit beside them on the device.

A preset holds what ``from_pretrained`` would read from the released checkpoint's ``transformer/config.json`` (or
``unet/config.json``), in diffusers' own keyword arguments, plus what planning a step needs around it: the VAE's
downsampling (pixels per latent cell), the prompt length the denoiser reads, and the frozen text stack and VAE that
stay on the device unless the recipe drops them. Parameter counts are what the config builds to on the ``meta``
device (tests/planning/test_presets.py rebuilds every one of them).

Sources: diffusers' ``scripts/convert_flux2_to_diffusers.py`` (``get_flux2_transformer_config``: FLUX.2 [dev], [klein]
4B/9B), the FLUX.1-dev / Kontext and SD/SDXL ``config.json`` files as published, and the text encoders' configs.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

FLUX2_BASE = {"patch_size": 1, "in_channels": 128, "attention_head_dim": 128, "timestep_guidance_channels": 256,
              "mlp_ratio": 3.0, "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000, "eps": 1e-6}
FLUX1_BASE = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
              "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
              "pooled_projection_dim": 768, "axes_dims_rope": (16, 56, 56)}
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),  # diffusers' (historical) name for the head counts
    "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32}
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 32}
VAE_4_LEVELS = {"down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
                "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2}

# Frozen components: (library, class, config class, config, parameters it builds to on meta).
FROZEN_COMPONENTS = {
    "qwen3-4b": ("transformers", "Qwen3ForCausalLM", "Qwen3Config", {
        "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True}, 4_022_468_096),
    "qwen3-8b": ("transformers", "Qwen3ForCausalLM", "Qwen3Config", {
        "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False}, 8_190_735_360),
    "t5-xxl-encoder": ("transformers", "T5EncoderModel", "T5Config", {
        "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "vocab_size": 32128,
        "feed_forward_proj": "gated-gelu"}, 4_762_310_656),
    "clip-vit-l-text": ("transformers", "CLIPTextModel", "CLIPTextConfig", {
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "vocab_size": 49408, "max_position_embeddings": 77, "projection_dim": 768}, 123_060_480),
    "openclip-bigg-text": ("transformers", "CLIPTextModelWithProjection", "CLIPTextConfig", {
        "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
        "vocab_size": 49408, "max_position_embeddings": 77, "projection_dim": 1280, "hidden_act": "gelu"},
        694_659_840),
    "vae-flux2": ("diffusers", "AutoencoderKLFlux2", None, {}, 84_046_115),
    "vae-flux1": ("diffusers", "AutoencoderKL", None, {
        **VAE_4_LEVELS, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}, 83_819_683),
    "vae-sd": ("diffusers", "AutoencoderKL", None, {**VAE_4_LEVELS, "latent_channels": 4}, 83_653_863),
}


@dataclass(frozen=True)
class Preset:
    """One denoiser as a training run builds it.

    ``text_tokens`` is the prompt length the denoiser reads (FLUX: overridden by the recipe's
    ``max_sequence_length``); ``frozen`` maps each frozen component kept beside the denoiser to its parameter count
    (text encoders are counted only while the recipe keeps them; the VAE always); ``fp32_frozen`` names those that
    stay in float32 under bf16 (the SDXL VAE upcasts: it overflows in half precision).
    """

    name: str
    family: str
    model_class: str
    config: dict
    params: int | None = None
    vae_scale_factor: int = 8
    text_tokens: int = 77
    frozen: dict = field(default_factory=dict)
    fp32_frozen: tuple[str, ...] = ()
    source: str = "preset"

    @property
    def denoiser_name(self) -> str:
        return "unet" if self.model_class.startswith("UNet") else "transformer"


def _frozen(*names: str) -> dict:
    return {name: FROZEN_COMPONENTS[name][-1] for name in names}


PRESETS = {preset.name: preset for preset in (
    Preset("flux2-klein-4b", "flux2", "Flux2Transformer2DModel", dict(
        FLUX2_BASE, num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
        guidance_embeds=False), 3_875_544_576, text_tokens=512, frozen=_frozen("qwen3-4b", "vae-flux2")),
    Preset("flux2-klein-9b", "flux2", "Flux2Transformer2DModel", dict(
        FLUX2_BASE, num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
        guidance_embeds=False), 9_078_581_248, text_tokens=512, frozen=_frozen("qwen3-8b", "vae-flux2")),
    Preset("flux2-dev", "flux2", "Flux2Transformer2DModel", dict(
        FLUX2_BASE, num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360,
        guidance_embeds=True), 32_223_281_152, text_tokens=512, frozen=_frozen("vae-flux2")),
    Preset("flux1-dev", "flux_kontext", "FluxTransformer2DModel", dict(FLUX1_BASE, guidance_embeds=True),
           11_901_408_320, text_tokens=512, frozen=_frozen("t5-xxl-encoder", "clip-vit-l-text", "vae-flux1")),
    Preset("flux1-kontext", "flux_kontext", "FluxTransformer2DModel", dict(FLUX1_BASE, guidance_embeds=True),
           11_901_408_320, text_tokens=512, frozen=_frozen("t5-xxl-encoder", "clip-vit-l-text", "vae-flux1")),
    Preset("sdxl", "sdxl", "UNet2DConditionModel", SDXL_UNET, 2_567_463_684,
           frozen=_frozen("clip-vit-l-text", "openclip-bigg-text", "vae-sd"), fp32_frozen=("vae-sd",)),
    Preset("sd15", "sd", "UNet2DConditionModel", SD15_UNET, 859_520_964, frozen=_frozen("clip-vit-l-text", "vae-sd")),
)}
# The preset a recipe of each family plans with when its checkpoint folder is not on this machine.
FAMILY_PRESETS = {"flux2": "flux2-klein-4b", "flux_kontext": "flux1-kontext", "sd": "sd15", "sdxl": "sdxl"}
# A checkpoint folder name that names another preset of its family (e.g. models/FLUX.1-dev → flux1-dev).
NAME_HINTS = (("klein-base-9b", "flux2-klein-9b"), ("klein-9b", "flux2-klein-9b"), ("flux.2-dev", "flux2-dev"),
              ("flux.1-dev", "flux1-dev"), ("kontext", "flux1-kontext"))


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name raises and lists the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_for(family: str, pretrained_path: str | None, recipe_dir: Path | None = None) -> Preset:
    """The denoiser a recipe trains: its local checkpoint's config when the folder is here, the family's preset
    for a checkpoint that is not (``NAME_HINTS`` picks a sibling preset by folder name), and the tiny random
    generator the trainer builds when the recipe names no checkpoint."""
    if family not in FAMILY_PRESETS:
        raise ValueError(f"unknown model family {family!r}; choose one of: {', '.join(FAMILY_PRESETS)}")
    if not pretrained_path:
        return tiny_preset(family)
    folder = local_folder(pretrained_path, recipe_dir)
    if folder is not None:
        return local_preset(folder, family)
    lowered = Path(pretrained_path).name.lower()
    hinted = next((name for hint, name in NAME_HINTS if hint in lowered), None)
    preset = PRESETS.get(hinted) if hinted else None
    return preset if preset is not None and preset.family == family else PRESETS[FAMILY_PRESETS[family]]


def local_folder(pretrained_path: str, recipe_dir: Path | None) -> Path | None:
    """The checkpoint folder if it is on this machine: as given (relative to the working directory), else
    relative to the recipe's repository (recipes/ sits one level below it)."""
    candidates = [Path(pretrained_path)]
    if recipe_dir is not None:
        candidates.append(recipe_dir.parent / pretrained_path)
    return next((path for path in candidates if (path / "model_index.json").is_file()), None)


def local_preset(folder: Path, family: str) -> Preset:
    """A preset from a local diffusers folder: the denoiser's ``config.json`` (weights are never read), the VAE's
    downsampling, and each frozen component's parameter count from its config, built on ``meta``."""
    index = json.loads((folder / "model_index.json").read_text())
    denoiser = "unet" if "unet" in index else "transformer"
    config = json.loads((folder / denoiser / "config.json").read_text())
    model_class = config.pop("_class_name", index[denoiser][1])
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    vae = json.loads((folder / "vae" / "config.json").read_text())
    frozen = {name: count_component(folder / name, *index[name]) for name in index
              if (name.startswith("text_encoder") or name == "vae") and isinstance(index[name], list)
              and index[name][0] is not None and (folder / name / "config.json").is_file()}
    fp32 = ("vae",) if vae.get("force_upcast") and family == "sdxl" else ()
    return Preset(folder.name, family, model_class, config, vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
                  text_tokens=77 if denoiser == "unet" else 512, frozen=frozen, fp32_frozen=fp32,
                  source=f"local config {folder / denoiser / 'config.json'}")


def count_component(folder: Path, library: str, class_name: str) -> int:
    """Parameters of a saved component, built from its ``config.json`` on the ``meta`` device (no weights)."""
    import importlib

    import torch

    cls = getattr(importlib.import_module(library), class_name)
    with torch.device("meta"):
        if library == "transformers":
            from transformers import AutoConfig

            module = cls._from_config(AutoConfig.from_pretrained(str(folder)))
        else:
            module = cls.from_config(cls.load_config(str(folder)))
    return sum(p.numel() for p in module.parameters())


TINY_BUILDERS = {"sd": ("focusdpo.models.tiny", "tiny_sd_pipeline"),
                 "sdxl": ("focusdpo.models.tiny", "tiny_sdxl_pipeline"),
                 "flux2": ("focusdpo.models.tiny_flux", "tiny_flux2_pipeline"),
                 "flux_kontext": ("focusdpo.models.tiny_flux", "tiny_flux_kontext_pipeline")}


@functools.cache
def tiny_preset(family: str) -> Preset:
    """The tiny random pipeline a recipe without ``pretrained_path`` trains, read from its builder run on ``meta``."""
    import importlib

    import torch

    module, builder = TINY_BUILDERS[family]
    with torch.device("meta"):
        pipeline = getattr(importlib.import_module(module), builder)(0)
    name = "unet" if hasattr(pipeline, "unet") else "transformer"
    denoiser = getattr(pipeline, name)
    config = {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")}
    tokens = getattr(pipeline.tokenizer, "model_max_length", 77) if name == "unet" else 512
    return Preset(f"tiny-{family}", family, type(denoiser).__name__, config,
                  sum(p.numel() for p in denoiser.parameters()), vae_scale_factor=pipeline.vae_scale_factor,
                  text_tokens=min(tokens, 512), source=f"{module}.{builder}")


def build_on_meta(preset: Preset):
    """The denoiser of ``preset`` on the ``meta`` device: real shapes, no weights, no memory."""
    import diffusers
    import torch

    cls = getattr(diffusers, preset.model_class)
    with torch.device("meta"):
        return cls.from_config(dict(preset.config))


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())

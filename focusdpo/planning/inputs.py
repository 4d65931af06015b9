"""Denoiser inputs of one training step, shaped as ``focusdpo.models`` builds them (values are never read).

Created inside a ``FakeTensorMode``, they carry shapes, dtypes and storage identity but hold no memory. Shapes, for
``N`` denoiser rows (``2B`` for DPO's ``[w; l]``, ``B`` for SFT):

- FLUX.2 / FLUX.1 Kontext: image tokens ``(N, L + K·l, C)`` with ``L = (res/p)²`` target tokens, ``l`` per reference
  (``p`` = VAE factor × 2×2 packing = 16 px for the released models), text ``(N, T, D_text)`` with
  ``T = max_sequence_length``, position ids ``(L + K·l, 4 or 3)`` from the backbones' own id builders, ``(T, 4 or 3)``;
- SD / SDXL: latents ``(N, 4, res/8, res/8)``, text ``(N, 77, D_cross)``, SDXL's pooled text and size ids.

The prediction the loss reads is on the loss grid ``(N, C, h, w)``: the first ``L`` output tokens for FLUX.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from focusdpo.planning.lora import backbone_class
from focusdpo.planning.presets import Preset
from focusdpo.planning.settings import StepSettings


@dataclass
class StepInputs:
    """One prepared batch: the denoiser call's kwargs, the loss target, the focus weights (``None`` for SFT), and
    how to read the loss-grid prediction ``(N, C, h, w)`` out of the denoiser's output."""

    kwargs: dict
    target: torch.Tensor
    weights: torch.Tensor | None
    to_grid: Callable[[torch.Tensor], torch.Tensor]
    tokens: dict


def token_side(preset: Preset, pixels: int) -> int:
    """Tokens per side for ``pixels``: FLUX packs 2×2 latent cells per token, UNets read the latent grid."""
    pack = preset.vae_scale_factor * (1 if preset.denoiser_name == "unet" else 2)
    if pixels % pack:
        raise ValueError(f"{pixels} px is not a multiple of {pack} (VAE downsampling × packing): choose a resolution "
                         f"(or reference_size) divisible by {pack}")
    return pixels // pack


def build_inputs(preset: Preset, config, settings: StepSettings, rows: int, dtype: torch.dtype) -> StepInputs:
    """The step's inputs for ``rows`` denoiser rows; ``config`` is the built denoiser's config."""
    builder = {"Flux2Transformer2DModel": flux2_inputs, "FluxTransformer2DModel": flux1_inputs,
               "UNet2DConditionModel": unet_inputs}.get(preset.model_class)
    if builder is None:
        raise ValueError(f"planning knows Flux2Transformer2DModel, FluxTransformer2DModel and UNet2DConditionModel, "
                         f"not {preset.model_class}; plan with a preset of one of them (--preset)")
    return builder(preset, config, settings, rows, dtype)


def loss_tensors(rows: int, channels: int, side: int, settings: StepSettings):
    """The regression target ``(N, C, h, w)`` and focus weights ``(N, h, w)`` (float32, as the trainer keeps them)."""
    target = torch.empty(rows, channels, side, side)
    weights = None if settings.objective == "sft" else torch.empty(rows, side, side)
    return target, weights


def token_grid(tokens: torch.Tensor, target_tokens: int, side: int) -> torch.Tensor:
    """Target tokens ``(N, L, C)`` of the output → the loss grid ``(N, C, h, w)``."""
    return tokens[:, :target_tokens].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def flow_geometry(preset: Preset, settings: StepSettings) -> dict:
    side = token_side(preset, settings.resolution)
    ref_side = token_side(preset, settings.reference_size or settings.resolution)
    return {"side": side, "ref_side": ref_side, "target": side * side,
            "references": settings.references * ref_side * ref_side, "text": settings.max_sequence_length}


PIPELINES = {"flux2": "Flux2Pipeline", "flux_kontext": "FluxKontextPipeline"}


def image_ids(settings: StepSettings, side: int, ref_side: int) -> torch.Tensor:
    """Position ids ``(L + K·l, D)`` of the target and the references, made by the family backbone's own
    ``target_ids`` / ``reference_ids``: they run on a stand-in that holds the pipeline class (its id helpers are
    static methods), so the planner uses the trainer's ids rather than a copy of them."""
    import diffusers

    backbone = backbone_class(settings.family)
    stand_in = SimpleNamespace(pipeline=getattr(diffusers, PIPELINES[settings.family]),
                               device=torch.get_default_device(), reference_id_scheme=settings.reference_ids)
    ids = backbone.target_ids(stand_in, side, side)
    if settings.references:
        refs = backbone.reference_ids(stand_in, [(ref_side, ref_side)] * settings.references, side, side)
        ids = torch.cat([ids, refs.to(ids)])
    return ids


def flux2_inputs(preset, config, settings, rows, dtype) -> StepInputs:
    """FLUX.2 / [klein]: 4-axis ids; text ids ``(T, 4)`` as ``_prepare_text_ids`` makes them (int64)."""
    geo = flow_geometry(preset, settings)
    kwargs = {"hidden_states": torch.empty(rows, geo["target"] + geo["references"], config.in_channels, dtype=dtype),
              "encoder_hidden_states": torch.empty(rows, geo["text"], config.joint_attention_dim, dtype=dtype),
              "timestep": torch.empty(rows, dtype=dtype), "img_ids": image_ids(settings, geo["side"], geo["ref_side"]),
              "txt_ids": torch.zeros(geo["text"], 4, dtype=torch.long), "return_dict": False,
              "guidance": torch.empty(rows, dtype=dtype) if config.guidance_embeds else None}
    return flow_step(kwargs, config, settings, rows, geo)


def flux1_inputs(preset, config, settings, rows, dtype) -> StepInputs:
    """FLUX.1 / Kontext: 3-axis float ids, CLIP's pooled projection, guidance for the guidance-distilled models."""
    geo = flow_geometry(preset, settings)
    kwargs = {"hidden_states": torch.empty(rows, geo["target"] + geo["references"], config.in_channels, dtype=dtype),
              "encoder_hidden_states": torch.empty(rows, geo["text"], config.joint_attention_dim, dtype=dtype),
              "pooled_projections": torch.empty(rows, config.pooled_projection_dim, dtype=dtype),
              "timestep": torch.empty(rows, dtype=dtype), "img_ids": image_ids(settings, geo["side"], geo["ref_side"]),
              "txt_ids": torch.zeros(geo["text"], 3), "return_dict": False,
              "guidance": torch.empty(rows, dtype=dtype) if config.guidance_embeds else None}
    return flow_step(kwargs, config, settings, rows, geo)


def flow_step(kwargs: dict, config, settings: StepSettings, rows: int, geo: dict) -> StepInputs:
    channels = config.out_channels or config.in_channels
    target, weights = loss_tensors(rows, channels, geo["side"], settings)
    tokens = {k: geo[k] for k in ("target", "references", "text")}
    return StepInputs(kwargs, target, weights, lambda out: token_grid(out[0], geo["target"], geo["side"]), tokens)


def unet_inputs(preset, config, settings, rows, dtype) -> StepInputs:
    side = token_side(preset, settings.resolution)
    kwargs = {"sample": torch.empty(rows, config.in_channels, side, side, dtype=dtype),
              "timestep": torch.zeros(rows, dtype=torch.long), "return_dict": False,
              "encoder_hidden_states": torch.empty(rows, preset.text_tokens, config.cross_attention_dim, dtype=dtype)}
    if config.addition_embed_type == "text_time":  # SDXL: pooled text + (original size, crop, target size) ids
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(rows, pooled, dtype=dtype),
                                       "time_ids": torch.empty(rows, 6, dtype=dtype)}
    target, weights = loss_tensors(rows, config.out_channels, side, settings)
    tokens = {"target": side * side, "references": 0, "text": preset.text_tokens}
    return StepInputs(kwargs, target, weights, lambda out: out[0], tokens)


def randomise(inputs: StepInputs) -> None:
    """Fill the float inputs of a real (not fake) batch in place: ``torch.empty`` leaves garbage, whose NaNs and
    denormals change timings. Used by the benchmarks that run the planned step for real."""
    tensors = [inputs.target, inputs.weights, *inputs.kwargs.values(),
               *(inputs.kwargs.get("added_cond_kwargs") or {}).values()]
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            tensor.uniform_(0.1, 1.0)

"""A real-size step traced on fake tensors: every real recipe, its LoRA, FLOPs and memory, in seconds."""

import functools
import resource
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from focusdpo.planning.lora import add_lora, check_targets, default_targets, lora_parameter_count
from focusdpo.planning.presets import build_on_meta, get_preset, preset_for
from focusdpo.planning.settings import read_settings
from focusdpo.planning.trace import trace_step

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
REAL_RECIPES = ("flux2_klein_multiref", "flux_kontext_lora", "flux1_personalization_lora", "mosaic_sft_flux",
                "focusdpo_mosaic_flux2")
GIB = 2 ** 30


def recipe(name: str, **overrides):
    return read_settings(RECIPES / f"{name}.yaml", **overrides)


RSS_GROWTH: dict[str, int] = {}


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@functools.cache
def traced(name: str, checkpointing: bool | None = None, **overrides):
    """One pair per device; checkpointing as the recipe sets it unless given. Records how much the process's peak
    resident memory grew while tracing (a real klein 4B alone would add 7 GiB of bf16 weights)."""
    before = max_rss()
    trace = trace_step(recipe(name, per_device_train_batch_size=1, **overrides), checkpointing=checkpointing)
    RSS_GROWTH[name] = max(RSS_GROWTH.get(name, 0), max_rss() - before)
    return trace


def traced_preset(preset, checkpointing: bool, full_depth: bool):
    settings = recipe("flux2_klein_multiref", per_device_train_batch_size=1, resolution=256, max_references=1)
    return trace_step(settings, preset, checkpointing=checkpointing, full_depth=full_depth)


@pytest.mark.parametrize("name", REAL_RECIPES)
def test_every_real_recipe_traces_at_real_size(name):
    settings = recipe(name)
    trace = traced(name)
    preset = preset_for(settings.family, settings.pretrained_path)
    assert trace.base_params == preset.params  # the released model, not a toy
    assert trace.flops["policy_forward"] > 1e13 and trace.flops["backward"] > trace.flops["policy_forward"] / 2
    assert (trace.flops["reference_forward"] > 0) == (settings.objective != "sft")
    assert 0 < trace.saved_bytes <= trace.peak_activation_bytes
    assert trace.lora_layers > 0 and trace.weight_dtype == "bfloat16"
    check_targets(build_on_meta(preset), trace.lora_targets)  # every target names a real Linear layer
    assert RSS_GROWTH[name] < GIB  # shapes only: no weight, activation or LoRA was allocated


def test_klein_step_matches_the_geometry_the_trainer_builds():
    trace = traced("flux2_klein_multiref")
    # 512 px / 16 px per token = 32×32 target tokens; six references of the same size; 512 text tokens.
    assert trace.tokens == {"target": 1024, "references": 6 * 1024, "text": 512}
    assert trace.rows == 2  # [w; l] of one pair


def test_checkpointing_trades_memory_for_recomputation():
    assert recipe("flux2_klein_multiref").activation_checkpointing
    on, off = traced("flux2_klein_multiref"), traced("flux2_klein_multiref", False)
    assert on.peak_activation_bytes < off.peak_activation_bytes / 5
    recompute = on.flops["backward"] - off.flops["backward"]
    assert 0.9 * on.flops["policy_forward"] < recompute <= on.flops["policy_forward"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_depth_probes_extrapolate_to_the_whole_model_exactly(checkpointing):
    """Klein's widths with 3 double and 5 single blocks: the three shallow probes predict the whole trace. (The
    released depths agree as exactly; tracing them whole here would only take longer.)"""
    preset = get_preset("flux2-klein-4b")
    preset = replace(preset, config={**preset.config, "num_layers": 3, "num_single_layers": 5})
    probes = traced_preset(preset, checkpointing, full_depth=False)
    whole = traced_preset(preset, checkpointing, full_depth=True)
    assert whole.full_depth and not probes.full_depth
    assert probes.flops == whole.flops
    assert probes.saved_bytes == pytest.approx(whole.saved_bytes, rel=1e-3)
    assert probes.peak_activation_bytes == pytest.approx(whole.peak_activation_bytes, rel=1e-2)


def test_klein_lora_parameter_count_by_hand():
    """r·(in + out) per targeted layer, klein 4B (width 3072, MLP 3·3072 SwiGLU), rank 16."""
    r, d = 16, 3072
    double = 8 * r * (d + d)  # to_q/k/v, to_out.0 and their add_* / to_add_out twins
    single = r * (d + 3 * d + 2 * 3 * d) + r * (d + 3 * d + d)  # fused qkv+mlp in; attn+mlp out
    denoiser = build_on_meta(get_preset("flux2-klein-4b"))
    targets = default_targets("flux2", denoiser)
    assert lora_parameter_count(denoiser, targets, r) == 5 * double + 20 * single == 18_677_760
    add_lora(denoiser, r, r, targets)
    assert sum(p.numel() for p in denoiser.parameters() if p.requires_grad) == 18_677_760


def test_unet_lora_count_is_the_sum_over_targeted_linear_layers():
    denoiser = build_on_meta(get_preset("sd15"))
    targets = default_targets("sd", denoiser)
    by_hand = sum(4 * (m.in_features + m.out_features) for name, m in denoiser.named_modules()
                  if isinstance(m, torch.nn.Linear)
                  and (name.split(".")[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0")))
    add_lora(denoiser, 4, 4, targets)
    assert sum(p.numel() for p in denoiser.parameters() if p.requires_grad) == by_hand


def test_a_bogus_lora_target_fails_and_names_the_fix():
    with pytest.raises(ValueError, match="'to_qq'.*did you mean 'to_q'"):
        trace_step(recipe("flux2_klein_multiref", lora_target_modules=("to_qq",)))
    # peft alone would accept this list (one entry matches) and train fewer layers than the recipe says
    with pytest.raises(ValueError, match="'not_a_layer'"):
        check_targets(build_on_meta(get_preset("flux2-klein-4b")), ("to_q", "not_a_layer"))


def test_a_target_that_is_not_a_linear_layer_is_refused():
    with pytest.raises(ValueError, match="ModuleList"):
        check_targets(build_on_meta(get_preset("flux2-klein-4b")), ("to_out",))


def test_a_fp32_recipe_traces_fp32_weights_and_sft_has_no_reference_pass():
    settings = replace(recipe("mosaic_sft_flux", per_device_train_batch_size=1), bf16=False, resolution=32,
                       pretrained_path=None)  # the tiny FLUX.1 Kontext generator: 32 px = 8×8 tokens
    trace = trace_step(settings)
    assert trace.preset == "tiny-flux_kontext" and trace.tokens["target"] == 64
    assert trace.weight_dtype == "float32" and trace.flops["reference_forward"] == 0 and trace.rows == 1

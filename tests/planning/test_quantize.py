"""The planner with a quantized frozen base (``quantize_base``): the weights at the quantized size by hand, torchao's
dequantized copies traced (held against a real torchao step on CPU), and quantizing named among the changes that
make a recipe fit."""

import importlib.util

import pytest
import torch

from focusdpo.models.families import QUANTIZATIONS
from focusdpo.planning.memory import GIB, denoiser_weight_bytes, memory_split
from focusdpo.planning.presets import tiny_preset
from focusdpo.planning.settings import StepSettings, read_settings
from focusdpo.planning.trace import run_step, storage_key, trace_step

from conftest import REPO

TINY = REPO / "recipes" / "tiny_cpu.yaml"


def test_quantized_weights_by_hand():
    trace = {"base_params": 1000, "quantized_params": 800, "quantized_rows": 40}
    lora = StepSettings(family="sd", lora_rank=4, bf16=True)
    assert denoiser_weight_bytes(trace, lora) == 2000  # bf16, 2 bytes each
    # int8: 1 byte per Linear weight + one fp32 scale per row; the other 200 parameters in bf16
    assert denoiser_weight_bytes(trace, StepSettings(family="sd", lora_rank=4, bf16=True,
                                                     quantize_base="int8_weight_only")) == 800 + 40 * 4 + 200 * 2
    assert denoiser_weight_bytes(trace, StepSettings(family="sd", lora_rank=4, bf16=True,
                                                     quantize_base="int8")) == 800 + 40 * 4 + 200 * 2
    # nf4, double quantization: 4 bits + an 8-bit absmax per 64 weights + an fp32 constant per 64 · 256 weights
    nf4 = 800 * 0.5 + 800 / 64 + 800 * 4 / (64 * 256)
    assert denoiser_weight_bytes(trace, StepSettings(family="sd", lora_rank=4, bf16=True,
                                                     quantize_base="nf4")) == int(nf4 + 200 * 2)
    assert QUANTIZATIONS["nf4"].bytes_per_weight == pytest.approx(0.515869, abs=1e-6)


def test_an_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="quantize_base='fp8' is not valid; choose one of: none, int8_weight_only"):
        StepSettings(family="sd", quantize_base="fp8")


def test_the_tiny_unet_counts_every_linear_weight():
    trace = trace_step(read_settings(TINY, quantize_base="nf4"), checkpointing=False).to_dict()
    denoiser = tiny_unet_with_lora(lora=False)
    linears = [m for m in denoiser.modules() if isinstance(m, torch.nn.Linear)]
    assert trace["quantized_params"] == sum(m.in_features * m.out_features for m in linears) == 565_248
    assert trace["quantized_rows"] == sum(m.out_features for m in linears)
    settings = read_settings(TINY, quantize_base="nf4")
    split = memory_split(trace, tiny_preset("sd"), settings, settings.per_device_train_batch_size)
    rest = trace["base_params"] - trace["quantized_params"]
    assert split["denoiser weights"] == int(rest * 4 + 565_248 * QUANTIZATIONS["nf4"].bytes_per_weight)


def tiny_unet_with_lora(lora: bool = True, quantize: bool = False):
    import diffusers

    from focusdpo.planning.lora import add_lora, resolve_targets

    preset = tiny_preset("sd")
    torch.manual_seed(0)
    denoiser = getattr(diffusers, preset.model_class).from_config(dict(preset.config))
    if quantize:  # before the LoRA, as the loader does
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(denoiser, Int8WeightOnlyConfig())
    if lora:
        add_lora(denoiser, 4, 4, resolve_targets("sd", denoiser))
    return denoiser.train()


def parameter_storages(module: torch.nn.Module) -> set:
    """Storages of the parameters and buffers, the tensors inside torchao's weights included (its scales)."""
    tensors = [*module.buffers()]
    for param in module.parameters():
        inner = param.__tensor_flatten__()[0] if hasattr(param, "__tensor_flatten__") else None
        tensors += [getattr(param, name) for name in inner if getattr(param, name) is not None] if inner else [param]
    return {storage_key(t) for t in tensors}


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                    reason='a real torchao step needs torchao: pip install "focusdpo[quantization]"')
def test_traced_dequantized_copies_match_a_real_torchao_step():
    from focusdpo.planning.inputs import build_inputs, randomise

    settings = read_settings(TINY, quantize_base="int8_weight_only")
    planned = trace_step(settings, checkpointing=False).to_dict()
    plain = trace_step(read_settings(TINY), checkpointing=False).to_dict()
    denoiser = tiny_unet_with_lora(quantize=True)
    inputs = build_inputs(tiny_preset("sd"), denoiser.config, settings, 2 * settings.per_device_train_batch_size,
                          torch.float32)
    randomise(inputs)
    saved = run_step(denoiser, inputs, settings, ignored=parameter_storages(denoiser))
    assert planned["saved_bytes"] == sum(saved.values())
    assert planned["saved_bytes"] > plain["saved_bytes"]  # the copies torchao keeps for backward


def test_a_recipe_that_fits_no_card_is_told_to_quantize_its_base(tmp_path):
    from focusdpo.planning.report import plan_recipe

    recipe = tmp_path / "klein_no_checkpointing.yaml"
    text = (REPO / "recipes" / "flux2_klein_multiref.yaml").read_text()
    recipe.write_text(text.replace("activation_checkpointing: true", "activation_checkpointing: false"))
    plan = plan_recipe(recipe, batch=1, preset="flux2-dev")
    assert not plan["fits_any_card"]
    changes = {s["change"]: s["total_gib"] for s in plan["suggestions"]}
    memory = plan["memory"]["no checkpointing"]
    trace = plan["traces"]["no checkpointing"]
    nf4 = (trace["base_params"] - trace["quantized_params"]) * 2 + trace["quantized_params"] * 0.515869
    assert changes["quantize_base: nf4"] == pytest.approx((memory["total"] - memory["denoiser weights"] + nf4) / GIB,
                                                         abs=0.06)

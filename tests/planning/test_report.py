"""Memory split, card fits, the changes that would make a recipe fit, the printed plan and its command."""

import json
from pathlib import Path

import pytest

from focusdpo.errors import ConfigError

from focusdpo.planning import cli
from focusdpo.planning import report as report_module
from focusdpo.planning.memory import (
    CARDS,
    FRAGMENTATION,
    GIB,
    card_fits,
    memory_split,
    mosaic_bytes,
    optimizer_bytes,
    optimizer_bytes_per_param,
)
from focusdpo.planning.presets import get_preset
from focusdpo.planning.report import format_plan, plan_settings, token_scale
from focusdpo.planning.settings import StepSettings, read_settings

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def fake_trace(activations: float, checkpointing: bool = False, pairs: int = 1) -> dict:
    """A trace dict as ``StepTrace.to_dict`` gives it, with round numbers to check by hand."""
    return {"pairs": pairs, "rows": 2 * pairs, "references": 3, "checkpointing": checkpointing,
            "tokens": {"target": 1024, "references": 3 * 1024, "text": 512}, "base_params": 12 * 10 ** 9,
            "trainable_params": 25 * 10 ** 6, "trainable_factored": 10 ** 6, "lora_layers": 266,
            "lora_targets": ["to_q"], "weight_dtype": "bfloat16", "saved_bytes": int(activations * 0.9),
            "peak_activation_bytes": int(activations), "input_bytes": 0, "seconds": 0.1, "full_depth": False,
            "quantized_params": 11 * 10 ** 9, "quantized_rows": 10 ** 6,
            "preset": "flux1-kontext", "model_class": "FluxTransformer2DModel", "source": "preset",
            "flops": {"policy_forward": 1e14, "reference_forward": 1e14, "backward": 2e14, "total": 4e14}}


KONTEXT = StepSettings(family="flux_kontext", pretrained_path="models/FLUX.1-Kontext-dev", resolution=512,
                       max_references=3, lora_rank=16, lora_alpha=16, per_device_train_batch_size=1, bf16=True)


def test_optimizer_state_per_parameter():
    assert optimizer_bytes_per_param("adamw_torch_fused") == 8  # two fp32 moments
    assert optimizer_bytes_per_param("adamw_bnb_8bit") == optimizer_bytes_per_param("paged_adamw_8bit") == 2
    assert optimizer_bytes_per_param("sgd") == 0 and optimizer_bytes_per_param("lion_32bit") == 4
    assert optimizer_bytes("adafactor", trainable=10 ** 6, factored=3000) == 12000  # row + column vectors


def test_memory_split_by_hand():
    split = memory_split(fake_trace(10 * GIB), get_preset("flux1-kontext"), KONTEXT, pairs=1)
    assert split["denoiser weights"] == 12 * 10 ** 9 * 2  # bf16 base
    assert split["trainable + grads + optimizer"] == 25 * 10 ** 6 * (4 + 4 + 8)  # fp32 LoRA, grads, AdamW
    assert split["text encoders + VAE"] == (4_762_310_656 + 123_060_480 + 83_819_683) * 2
    assert split["activations"] == 10 * GIB and split["allocator margin"] == int(FRAGMENTATION * 10 * GIB)
    assert split["total"] == sum(v for k, v in split.items() if k != "total")
    doubled = memory_split(fake_trace(10 * GIB), get_preset("flux1-kontext"), KONTEXT, pairs=2)
    assert doubled["activations"] == 20 * GIB  # linear in the pairs per device


def test_drop_text_encoders_frees_them_but_not_the_vae():
    kept = memory_split(fake_trace(GIB), get_preset("flux1-kontext"), KONTEXT, 1)["text encoders + VAE"]
    dropped = StepSettings(**{**KONTEXT.__dict__, "drop_text_encoders": True})
    assert memory_split(fake_trace(GIB), get_preset("flux1-kontext"), dropped, 1)["text encoders + VAE"] == \
        83_819_683 * 2 < kept


def test_mosaic_capture_by_hand():
    settings = StepSettings(family="flux2", lambda_sca=0.1, bf16=True)
    config = {"num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24, "attention_head_dim": 128}
    tokens = {"target": 1024, "references": 6144, "text": 512}
    kept = 5 * 2 * (6144 + 1024) * 24 * 128 * 2  # 5 double blocks, 2 winners, bf16 q rows + target keys
    maps = 2 * 6144 * 1024 * 4 * (1 + 24)  # averaged map + one block's per-head softmax, fp32
    assert mosaic_bytes(config, settings, tokens, pairs=2) == kept + maps


def test_largest_batch_per_card():
    preset = get_preset("flux1-kontext")
    fits = card_fits(fake_trace(10 * GIB), preset, KONTEXT, pairs=1)
    fixed = memory_split(fake_trace(0), preset, KONTEXT, 1)["total"]
    per_pair = 10 * GIB * (1 + FRAGMENTATION)
    for card, fit in zip(CARDS, fits, strict=True):
        assert fit["max_batch"] == max(0, int((card.usable - fixed) // per_pair))
    assert [f["card"] for f in fits] == ["24 GB", "48 GB", "80 GB", "141 GB"]


def test_activations_scale_with_tokens():
    trace = fake_trace(GIB)
    assert token_scale(trace) == 1
    assert token_scale(trace, references=1) == pytest.approx((1024 + 1024 + 512) / (1024 + 3072 + 512))


def test_a_recipe_that_fits_no_card_says_which_changes_would(monkeypatch):
    traces = {False: fake_trace(400 * GIB), True: fake_trace(30 * GIB, checkpointing=True)}

    class Traced:
        def __init__(self, trace):
            self.trace = trace

        def to_dict(self):
            return self.trace

    monkeypatch.setattr(report_module, "trace_step", lambda s, p, pairs, on: Traced(traces[on]))
    plan = plan_settings(KONTEXT, get_preset("flux1-kontext"))
    assert not plan["fits_any_card"]
    changes = {s["change"]: s for s in plan["suggestions"]}
    assert changes["activation_checkpointing: true"]["fits"] == "80 GB"
    assert changes["optim: adamw_8bit"]["fits"] is None
    assert "all of the above" in changes and "max_references: 1" in changes and "lora_rank: 8" in changes
    # nf4 alone: 12e9 bf16 weights (24e9 bytes) become 1e9 in bf16 + 11e9 Linear weights at 0.515869 bytes
    no_checkpointing = plan["memory"]["no checkpointing"]["total"]
    nf4 = no_checkpointing - 24 * 10 ** 9 + 2 * 10 ** 9 + 11 * 10 ** 9 * (0.5 + 1 / 64 + 4 / 64 / 256)
    assert changes["quantize_base: nf4"]["total_gib"] == pytest.approx(nf4 / GIB, abs=0.06)
    text = format_plan(plan)
    assert "does NOT fit any listed card even at batch 1" in text
    assert "activation_checkpointing: true" in text and "estimates" in text


def test_plan_of_the_tiny_recipe_prints_every_section(capsys, tmp_path):
    assert cli.main(["--config", str(RECIPES / "tiny_cpu.yaml"), "--batch", "1", "--json",
                     str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    for section in ("focusdpo plan:", "TFLOPs", "memory (GiB)", "activations", "cards", "141 GB", "note:"):
        assert section in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["pairs"] == 1 and plan["model"]["preset"] == "tiny-sd" and plan["fits_any_card"]
    assert plan["memory"]["no checkpointing"]["activations"] > plan["memory"]["checkpointing"]["activations"]
    assert out.strip() == format_plan(plan).strip()


def test_settings_come_from_the_recipe_with_trainer_defaults():
    settings = read_settings(RECIPES / "flux2_klein_multiref.yaml")
    assert (settings.family, settings.resolution, settings.max_references, settings.lora_rank) == \
        ("flux2", 512, 6, 32)
    assert settings.bf16 and settings.activation_checkpointing and settings.optim == "adamw_torch_fused"
    assert settings.keeps_text_encoders  # drop_text_encoders is commented out in the recipe
    assert read_settings(RECIPES / "mosaic_sft_flux.yaml").samples_per_pair == 1


def test_cli_refuses_a_missing_recipe_and_a_zero_batch():
    with pytest.raises(FileNotFoundError, match="recipe YAML"):
        cli.main(["--config", "recipes/nope.yaml"])
    with pytest.raises(ConfigError, match="--batch 0: give at least 1 pair per device"):
        cli.main(["--config", str(RECIPES / "tiny_cpu.yaml"), "--batch", "0"])

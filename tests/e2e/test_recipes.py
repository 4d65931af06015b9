"""Every FLUX recipe runs 2 steps end to end through ``accelerate launch`` on CPU.

The recipes name real checkpoints, data and DINOv2 weights; the test swaps in the tiny in-process
generator, toy pairs and a 2-block random DINOv2, and keeps everything else (LoRA targets, flow
density, reference ids, bf16 with fp32 LoRA, gradient checkpointing) on the same code path.
"""

import json
import math

import pytest

from focusdpo.models import load_backbone
from focusdpo.training.policy import add_dpo_lora
from focusdpo.config.training import ModelConfig

from conftest import REPO, accelerate_launch

pytestmark = pytest.mark.e2e

TINY = ["--pretrained_path", "", "--dataset", "toy", "--toy_num_pairs", "8", "--resolution", "32",
        "--reference_size", "32", "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--save_steps", "100", "--sample_steps", "2",
        "--dino_model", "vit_small_patch14_dinov2", "--dino_weights", "", "--dino_random_weights", "true",
        "--dino_depth", "2", "--dino_image_size", "56", "--use_cpu", "true", "--warmup_steps", "0"]


def personalization_lora(folder):
    """A trained-looking FLUX.1 LoRA in diffusers format, standing in for a released UNO-style LoRA."""
    backbone = load_backbone("flux_kontext")
    add_dpo_lora(backbone, ModelConfig(family="flux_kontext", lora_rank=4, lora_alpha=4))
    for name, param in backbone.denoiser.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    backbone.save_lora(folder, "dpo")
    return str(folder)


@pytest.mark.parametrize("recipe, port", [("flux2_klein_multiref", 29521), ("flux_kontext_lora", 29522),
                                          ("flux1_personalization_lora", 29523)])
def test_recipe_runs_two_steps_from_ln2(recipe, port, tmp_path):
    extra = ["--personalization_lora", personalization_lora(tmp_path / "uno")] if "personalization" in recipe else []
    out = tmp_path / "run"
    accelerate_launch(["-m", "focusdpo.train", "--config", str(REPO / "recipes" / f"{recipe}.yaml"),
                       "--output_dir", str(out), *TINY, *extra], port=port)
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logs[0]["step"] == 1 and logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "samples_before_after.png").is_file()
    if "personalization" in recipe:  # the fused UNO + DPO LoRA loads on the base model alone
        from focusdpo.models.tiny_flux import tiny_flux_kontext_pipeline

        pipe = tiny_flux_kontext_pipeline(0)
        pipe.load_lora_weights(str(out / "fused"))
        assert any("lora_A" in name for name, _ in pipe.transformer.named_parameters())

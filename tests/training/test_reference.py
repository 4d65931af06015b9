"""Reference modes: the reference is bit-identical through training and restored after exceptions."""

import pytest
import torch
from peft import LoraConfig

from focusdpo.config.training import ModelConfig
from focusdpo.models import load_backbone
from focusdpo.training.policy import add_dpo_lora
from focusdpo.training.reference import disabled_adapters, frozen_adapter, reference_model

from conftest import REPO


def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 900]), torch.randn(2, 5, 32, generator=g)


def run(module):
    x, t, text = unet_inputs()
    return module(x, t, text).sample


def train_steps(unet, steps=3):
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0)
    for _ in range(steps):
        run(unet).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def lora_backbone(mode="disable_adapters", personalization=None):
    backbone = load_backbone("sd")
    add_dpo_lora(backbone, ModelConfig(reference_mode=mode, personalization_lora=personalization, lora_rank=4))
    return backbone


def test_disable_adapters_reference_is_the_base_and_stays_bit_identical():
    backbone = lora_backbone()
    unet = backbone.denoiser
    with torch.no_grad():
        with disabled_adapters(unet) as ref:
            before = run(ref)
    base = load_backbone("sd").denoiser
    assert torch.equal(before, run(base))
    train_steps(unet)
    with disabled_adapters(unet) as ref:
        after = run(ref)
    assert torch.equal(before, after)
    assert not torch.equal(run(unet), after)  # the policy moved, the reference did not


def test_adapters_and_trainable_flags_restored_after_an_exception():
    unet = lora_backbone().denoiser
    train_steps(unet, 1)
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    policy = run(unet)
    with pytest.raises(RuntimeError, match="boom"):
        with reference_model("disable_adapters", unet):
            raise RuntimeError("boom")
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    assert torch.equal(run(unet), policy)


def make_personalization_lora(path):
    """A 'released' personalization LoRA: a trained-looking adapter saved in diffusers format."""
    backbone = load_backbone("sd")
    backbone.denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"],
                                             init_lora_weights=False))  # B != 0: changes outputs
    backbone.save_lora(path)
    return backbone


def test_frozen_adapter_reference_is_base_plus_personalization(tmp_path):
    personal = make_personalization_lora(tmp_path)
    expected = run(personal.denoiser)
    backbone = lora_backbone("frozen_adapter", str(tmp_path))
    unet = backbone.denoiser
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".dpo." in n for n in trainable)
    with frozen_adapter(unet) as ref:
        before = run(ref)
    torch.testing.assert_close(before, expected, rtol=0, atol=1e-6)
    train_steps(unet)
    with frozen_adapter(unet) as ref:
        assert torch.equal(run(ref), before)
    assert [n for n, p in unet.named_parameters() if p.requires_grad] == trainable


def test_frozen_copy_reference_for_full_fine_tuning():
    import copy

    from focusdpo.training.reference import frozen_copy_reference

    unet = load_backbone("sd").denoiser
    frozen = copy.deepcopy(unet).requires_grad_(False)
    with frozen_copy_reference(unet, frozen) as ref:
        before = run(ref)
    train_steps(unet, 1)
    with frozen_copy_reference(unet, frozen) as ref:
        assert torch.equal(run(ref), before)
    assert not torch.equal(run(unet), before)


def test_sampling_the_reference_puts_the_policy_back_in_the_pipeline():
    """A full fine-tune's reference is a frozen copy: after sampling it, the pipeline holds the policy again."""
    import copy

    from focusdpo.training.reference import reference_in_pipeline

    backbone = load_backbone("sd")
    policy = backbone.denoiser
    frozen = copy.deepcopy(policy).requires_grad_(False)
    with reference_in_pipeline(backbone, "frozen_copy", frozen):
        assert backbone.pipeline.unet is frozen
    assert backbone.pipeline.unet is policy and backbone.denoiser is policy


def test_a_lora_for_another_model_is_refused_naming_its_keys(tmp_path):
    make_personalization_lora(tmp_path)  # an SD UNet LoRA...
    flux = load_backbone("flux_kontext")  # ...offered to a FLUX transformer
    with pytest.raises(ValueError, match=r"does not fit this flux_kontext transformer: \d+ of \d+ keys name no "
                                         r"module, e.g. \['unet.down_blocks"):
        flux.add_lora_adapter(tmp_path, "personal")


@pytest.mark.e2e
def test_fused_personalization_and_dpo_lora_reproduces_the_trained_policy(tmp_path):
    from focusdpo.commands.train import main
    from focusdpo.models.tiny import tiny_sd_pipeline

    make_personalization_lora(tmp_path / "uno")
    out = tmp_path / "run"
    trainer = main(["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "--output_dir", str(out), "--max_steps",
                    "3", "--toy_num_pairs", "6", "--reference_mode", "frozen_adapter", "--personalization_lora",
                    str(tmp_path / "uno"), "--save_fused_lora", "true", "--lora_alpha", "8",
                    "--sample_every_run", "false"])
    policy = run(trainer.backbone.denoiser.eval())
    for folder, adapters in ((out / "fused", 1), (out, 2)):  # fused alone; or personalization + DPO files
        pipe = tiny_sd_pipeline(seed=0)
        if adapters == 2:
            pipe.load_lora_weights(str(tmp_path / "uno"), adapter_name="uno")
        pipe.load_lora_weights(str(folder), adapter_name="dpo")
        if adapters == 2:
            pipe.set_adapters(["uno", "dpo"])
        with torch.no_grad():
            torch.testing.assert_close(run(pipe.unet), policy, rtol=0, atol=1e-5)

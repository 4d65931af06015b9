"""The frozen base quantized (``quantize_base``): refusals before anything loads, and on CPU torchao's int8
weight-only base under peft's LoRA: it trains the LoRA, the quantized base stays as it was and is what the
reference pass runs."""

import importlib.util
import sys

import pytest
import torch

from focusdpo.config.recipe import parse_config
from focusdpo.config.training import ModelConfig
from focusdpo.errors import ConfigError
from focusdpo.models import load_backbone
from focusdpo.models.quantize import quantized_linears

from conftest import QUICK, tiny_argv

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason='quantize_base: int8_weight_only needs torchao: pip install '
                                          '"focusdpo[quantization]" (torchao==0.18.0, CPU and CUDA)')


def test_the_config_checks_the_choice_and_what_it_needs():
    with pytest.raises(ConfigError, match="quantize_base='int4' is not valid.*none, int8_weight_only, int8, nf4"):
        ModelConfig(quantize_base="int4")
    with pytest.raises(ConfigError, match="lora_rank: 0 trains every base weight"):
        ModelConfig(quantize_base="int8_weight_only", lora_rank=0, reference_mode="frozen_copy")
    with pytest.raises(ConfigError, match="set pretrained_path.*int8_weight_only"):
        ModelConfig(quantize_base="nf4")
    assert ModelConfig(quantize_base="int8_weight_only").adapter_options(1) == {"quantize_base": "int8_weight_only"}
    assert ModelConfig(family="flux2", quantize_base="int8_weight_only").adapter_options(1)["quantize_base"]
    assert "quantize_base" not in ModelConfig(family="flux2").adapter_options(1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without CUDA")
@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_bitsandbytes_without_cuda_is_refused_before_loading(name, tmp_path):
    # the folder does not exist: the refusal comes before the loader looks for it
    with pytest.raises(ConfigError, match=f"quantize_base='{name}' uses bitsandbytes, which needs a CUDA GPU.*"
                                          "int8_weight_only"):
        load_backbone("flux2", str(tmp_path / "nowhere"), quantize_base=name)


def test_a_missing_backend_is_refused_before_loading(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torchao", None)  # what Python does for a package that is not installed
    with pytest.raises(ConfigError, match=r'needs the torchao package.*pip install "focusdpo\[quantization\]"'):
        load_backbone("sd", str(tmp_path / "nowhere"), quantize_base="int8_weight_only")


@needs_torchao
@pytest.mark.parametrize("family", ["flux2", "flux_kontext"])
def test_every_linear_of_a_tiny_transformer_is_quantized_before_its_lora(family):
    from peft import LoraConfig
    from torchao.utils import TorchAOBaseTensor

    backbone = load_backbone(family, quantize_base="int8_weight_only")
    denoiser = backbone.denoiser
    layers = quantized_linears(denoiser)
    assert layers and all(isinstance(m.weight, TorchAOBaseTensor) for m in layers)
    denoiser.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=list(backbone.default_lora_targets)))
    assert quantized_linears(denoiser) == layers  # the LoRA's own Linears are not the base's
    wrapped = [m for m in denoiser.modules() if type(m).__name__ == "TorchaoLoraLinear"]
    assert wrapped and backbone.dtype == torch.float32  # the tiny generators quantize in float32


@needs_torchao
def test_tiny_int8_base_trains_the_lora_and_stays_the_reference(tmp_path):
    from focusdpo.training.reference import reference_model
    from focusdpo.training.trainer import build_trainer

    trainer = build_trainer(*parse_config(tiny_argv(tmp_path, *QUICK, "--quantize_base", "int8_weight_only")))
    denoiser = trainer.backbone.denoiser
    lora = {n: p.detach().clone() for n, p in denoiser.named_parameters() if p.requires_grad}
    assert lora and all(".dpo." in n for n in lora)
    assert any(type(m).__name__ == "TorchaoLoraLinear" for m in denoiser.modules())
    trainer.train()
    assert all(not torch.equal(p, lora[n]) for n, p in denoiser.named_parameters() if n in lora)

    base = load_backbone("sd", quantize_base="int8_weight_only").denoiser  # the same seed: the run's start
    for trained, fresh in zip(quantized_linears(denoiser), quantized_linears(base), strict=True):
        assert torch.equal(trained.weight.qdata, fresh.weight.qdata)
        assert torch.equal(trained.weight.scale, fresh.weight.scale)
        assert trained.weight.dtype == fresh.weight.dtype == torch.float32
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([500, 20]), torch.randn(2, 7, 32)
    with torch.no_grad():
        with reference_model("disable_adapters", denoiser, layers=trainer.adapter_layers) as ref:
            reference = ref(x, t, text).sample
        policy, quantized_base = denoiser(x, t, text).sample, base(x, t, text).sample
    torch.testing.assert_close(reference, quantized_base, rtol=0, atol=0)
    assert not torch.allclose(policy, reference)


@needs_torchao
def test_a_pretrained_folder_quantizes_through_diffusers_and_trains_in_bf16(tmp_path):
    from diffusers import TorchAoConfig
    from torchao.utils import TorchAOBaseTensor

    from focusdpo.models.tiny import tiny_sd_pipeline
    from focusdpo.training.trainer import build_trainer

    tiny_sd_pipeline(seed=0).save_pretrained(tmp_path / "sd")
    argv = tiny_argv(tmp_path / "run", *QUICK, "--quantize_base", "int8_weight_only", "--pretrained_path",
                     str(tmp_path / "sd"), "--bf16", "true", "--use_cpu", "true")
    trainer = build_trainer(*parse_config(argv))
    denoiser = trainer.backbone.denoiser
    assert isinstance(denoiser.hf_quantizer.quantization_config, TorchAoConfig)
    assert all(isinstance(m.weight, TorchAOBaseTensor) for m in quantized_linears(denoiser))
    # diffusers refuses .to(dtype) on a model it quantized: the rest is cast around the quantized weights
    assert trainer.backbone.dtype == torch.bfloat16 and trainer.backbone.vae_dtype == torch.bfloat16
    lora = {n: p.detach().clone() for n, p in denoiser.named_parameters() if p.requires_grad}
    assert {p.dtype for p in lora.values()} == {torch.float32}
    trainer.train()
    assert all(not torch.equal(p, lora[n]) for n, p in denoiser.named_parameters() if n in lora)
    fresh = load_backbone("sd", str(tmp_path / "sd"), quantize_base="int8_weight_only").denoiser
    for trained, loaded in zip(quantized_linears(denoiser), quantized_linears(fresh), strict=True):
        assert torch.equal(trained.weight.qdata, loaded.weight.qdata)

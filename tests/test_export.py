"""LoRA export: kohya files A1111/ComfyUI read and diffusers files any loader reads reproduce the trained LoRA;
exports to the wrong family or onto their own source are refused."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from focusdpo.commands import main as cli
from focusdpo.config.training import ModelConfig
from focusdpo.errors import LoraFileError, OutputError
from focusdpo.export import export_lora, read_lora
from focusdpo.models import load_backbone
from focusdpo.models.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline
from focusdpo.models.tiny_flux import tiny_flux2_pipeline, tiny_flux_kontext_pipeline
from focusdpo.training.policy import add_dpo_lora

TINY_PIPELINES = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, "flux2": tiny_flux2_pipeline,
                  "flux_kontext": tiny_flux_kontext_pipeline}


def trained_lora(family, folder, rank=4, alpha=16.0):
    """A tiny backbone whose DPO LoRA (alpha ≠ rank) has non-zero B, saved in diffusers format."""
    backbone = load_backbone(family)
    add_dpo_lora(backbone, ModelConfig(family=family, lora_rank=rank, lora_alpha=alpha))
    generator = torch.Generator().manual_seed(0)
    for name, param in backbone.denoiser.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    backbone.save_lora(folder, "dpo")
    return backbone


def lora_module_outputs(denoiser, x_of):
    """Outputs of every LoRA-carrying linear layer on a fixed input: what the LoRA changes, module by module."""
    return {name: module(x_of(module)) for name, module in denoiser.named_modules()
            if hasattr(module, "lora_A") and isinstance(getattr(module, "base_layer", None), torch.nn.Linear)}


def fixed_input(module):
    return torch.ones(1, module.base_layer.in_features) * 0.1


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_kohya_export_reproduces_the_trained_unet_with_alpha_not_rank(family, tmp_path):
    trained = trained_lora(family, tmp_path).denoiser.eval()
    exported = export_lora(tmp_path, family)
    keys = load_file(str(exported))
    assert all(k.startswith("lora_unet_") for k in keys)
    assert {v.item() for k, v in keys.items() if k.endswith(".alpha")} == {16.0}
    pipe = TINY_PIPELINES[family](0)
    pipe.load_lora_weights(str(exported))  # diffusers' kohya reader, as A1111/ComfyUI read the file
    assert_same_lora_effect(pipe.unet, trained)


def assert_same_lora_effect(loaded, trained):
    """Every LoRA layer of ``loaded`` gives ``trained``'s output on the same input (base + scaled B·A)."""
    with torch.no_grad():
        got, expected = (lora_module_outputs(m.eval(), fixed_input) for m in (loaded, trained))
    assert got.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)


def test_diffusers_converter_alone_rescales_a_lora_trained_with_alpha_not_rank(tmp_path):
    """Why export sets .alpha: diffusers' converter writes alpha = rank (a 4× weaker LoRA here)."""
    from diffusers.utils import convert_state_dict_to_kohya

    trained = trained_lora("sd", tmp_path).denoiser.eval()
    tensors, _ = read_lora(tmp_path / "pytorch_lora_weights.safetensors")
    naive = {k: v.contiguous() for k, v in convert_state_dict_to_kohya(tensors).items()}
    save_file(naive, str(tmp_path / "naive.safetensors"))
    pipe = tiny_sd_pipeline(0)
    pipe.load_lora_weights(str(tmp_path), weight_name="naive.safetensors")
    x, t, text = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 7, 32)
    with torch.no_grad():
        assert not torch.allclose(pipe.unet(x, t, text).sample, trained(x, t, text).sample, atol=1e-4)


@pytest.mark.parametrize("family", ["flux_kontext", "flux2"])
def test_flux_export_folds_alpha_so_any_loader_reproduces_the_lora(family, tmp_path):
    trained = trained_lora(family, tmp_path).denoiser.eval()
    exported = export_lora(tmp_path, family)
    tensors, config = read_lora(exported)
    assert config["lora_alpha"] == config["r"] == 4
    assert all(k.startswith("transformer.") for k in tensors)
    # A loader that ignores alpha (ComfyUI without .alpha keys: scale 1) computes B·A from the file.
    for name, module in trained.named_modules():
        if hasattr(module, "lora_A"):
            a, b = tensors[f"transformer.{name}.lora_A.weight"], tensors[f"transformer.{name}.lora_B.weight"]
            expected = module.scaling["dpo"] * module.lora_B["dpo"].weight @ module.lora_A["dpo"].weight
            torch.testing.assert_close(b @ a, expected.detach(), rtol=1e-5, atol=1e-7)
    pipe = TINY_PIPELINES[family](0)
    pipe.load_lora_weights(str(exported))
    assert_same_lora_effect(pipe.transformer, trained)


def test_export_command_reads_the_family_from_the_run_config(tmp_path):
    trained_lora("sd", tmp_path)
    (tmp_path / "config.yaml").write_text("family: sd\n")
    cli(["export", str(tmp_path), "--out", str(tmp_path / "mine.safetensors")])
    assert any(k.startswith("lora_unet_") for k in load_file(str(tmp_path / "mine.safetensors")))
    save_file({"unet.x.lora_A.weight": torch.zeros(1, 1)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="no LoraConfig metadata"):
        export_lora(tmp_path / "bare.safetensors", "sd")


def test_kohya_export_writes_the_metadata_kohya_tools_read(tmp_path):
    trained_lora("sdxl", tmp_path, rank=4, alpha=16.0)
    with safe_open(str(export_lora(tmp_path, "sdxl")), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_dim"] == "4" and float(metadata["ss_network_alpha"]) == 16.0
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"


def test_an_export_for_another_family_or_onto_its_own_source_is_refused(tmp_path, capsys):
    trained_lora("sd", tmp_path)
    with pytest.raises(LoraFileError, match="holds unet LoRA weights, not the transformer weights of family 'flux2'"):
        export_lora(tmp_path, "flux2")
    (tmp_path / "config.yaml").write_text("family: sd\n")
    with pytest.raises(SystemExit) as exit_code:  # the command: one line, exit 2
        cli(["export", str(tmp_path), "--family", "flux_kontext"])
    assert exit_code.value.code == 2 and "config.yaml says family 'sd'" in capsys.readouterr().err
    source = tmp_path / "pytorch_lora_weights.safetensors"
    before = source.read_bytes()
    with pytest.raises(OutputError, match="is the LoRA being exported"):
        export_lora(tmp_path, "sd", source)
    assert source.read_bytes() == before
    trained_lora("flux2", tmp_path / "flux")
    with pytest.raises(LoraFileError, match="holds transformer LoRA weights.*export it as flux2 or flux_kontext"):
        export_lora(tmp_path / "flux", "sd")

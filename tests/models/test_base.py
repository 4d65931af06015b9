"""What every backbone does: placement of its parts."""

import pytest
import torch

from conftest import lora_file


@pytest.mark.parametrize("family", ["sd", "flux2"])
def test_offloaded_text_encoders_stay_on_the_cpu(family):
    from focusdpo.models import load_backbone

    backbone = load_backbone(family)
    backbone.offload_text_encoders = True
    backbone.to("meta")  # stands in for an accelerator: only placement is checked here
    devices = {name: next(m.parameters()).device.type for name, m in backbone.pipeline.components.items()
               if isinstance(m, torch.nn.Module)}
    assert {d for n, d in devices.items() if n.startswith("text_encoder")} == {"cpu"}
    assert {d for n, d in devices.items() if not n.startswith("text_encoder")} == {"meta"}
    assert backbone.text_device.type == "cpu"


def test_a_lora_is_checked_by_its_header_and_keys_before_any_model_loads(tmp_path):
    from focusdpo.errors import LoraFileError
    from focusdpo.models.base import LORA_WEIGHTS_NAME, check_lora_file

    (tmp_path / "run").mkdir()
    check_lora_file(lora_file(tmp_path / "run" / LORA_WEIGHTS_NAME), "sd", "loras")  # fits: a run folder's file
    check_lora_file(tmp_path / "run", "sdxl", "loras")
    flux = lora_file(tmp_path / "flux.safetensors", "transformer")
    with pytest.raises(LoraFileError, match=r"personalization_lora: .*flux.safetensors holds transformer LoRA weights, "
                                            r"not the unet weights of family 'sd'.* for flux2 or flux_kontext"):
        check_lora_file(flux, "sd", "personalization_lora")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(flux.read_bytes()[:-10])
    with pytest.raises(LoraFileError, match=r"dpo_lora: .*cut.safetensors cannot be read \(.*\): .*download or copy"):
        check_lora_file(cut, "flux2", "dpo_lora")
    with pytest.raises(LoraFileError, match=r"loras: '.*gone' does not exist; give a LoRA folder"):
        check_lora_file(tmp_path / "gone", "sd", "loras")
    with pytest.raises(LoraFileError, match=rf"loras: .* holds no {LORA_WEIGHTS_NAME}"):
        check_lora_file(tmp_path, "sd", "loras")


def test_a_lora_for_another_model_of_the_family_is_refused_from_the_base_models_config(tmp_path):
    """SD and SDXL LoRAs share their keys' family (``unet.…``); only the base model's modules tell them apart. The
    base folder holds nothing but the UNet's config.json: the check builds no weights."""
    from peft import LoraConfig

    from focusdpo.errors import LoraFileError
    from focusdpo.models import load_backbone
    from focusdpo.models.base import check_lora_file

    for family in ("sd", "sdxl"):
        backbone = load_backbone(family)
        backbone.denoiser.add_adapter(LoraConfig(r=2, target_modules=["to_k"]))
        backbone.save_lora(tmp_path / f"{family}_lora")
        backbone.denoiser.save_config(tmp_path / family / "unet")
    check_lora_file(tmp_path / "sd_lora", "sd", "personalization_lora", pretrained_path=tmp_path / "sd")
    check_lora_file(tmp_path / "sdxl_lora", "sdxl", "personalization_lora", pretrained_path=tmp_path / "sdxl")
    misfit = (r"personalization_lora: .*sdxl_lora.* does not fit the unet of .*sd: \d+ of its LoRA weights "
              r".*attn2.to_k.lora_A.weight \[2, 64\] vs module \[64, 32\].*SDXL vs SD 1.5")
    with pytest.raises(LoraFileError, match=misfit):
        check_lora_file(tmp_path / "sdxl_lora", "sd", "personalization_lora", pretrained_path=tmp_path / "sd")
    with pytest.raises(LoraFileError, match=r"first: unet.blocks.0.to_q.lora_A.weight \[2, 8\] vs no such module"):
        check_lora_file(lora_file(tmp_path / "odd.safetensors"), "sd", "loras", pretrained_path=tmp_path / "sd")

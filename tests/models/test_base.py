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

"""What every backbone does: placement of its parts."""

import pytest
import torch


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

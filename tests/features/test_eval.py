"""The evaluation protocols' feature extractors."""

import pytest
import torch


def test_dino_v1_protocol_takes_the_normalised_cls_of_a_centre_crop():
    import timm

    from focusdpo.features.eval import DINO_V1_MODEL, dino_v1_transform, load_dino_v1

    x = torch.rand(2, 3, 300, 400)
    assert tuple(dino_v1_transform()(x).shape) == (2, 3, 224, 224)
    model = timm.create_model(DINO_V1_MODEL, pretrained=False, num_classes=0, depth=1)
    embed = load_dino_v1(None, model=model)
    out = embed(x)
    assert out.shape == (2, 384) and torch.allclose(out.norm(dim=-1), torch.ones(2))
    with torch.no_grad():
        expected = model(dino_v1_transform()(x))  # timm's own head: CLS after the final norm
    assert torch.allclose(out, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="dino_v1_weights"):
        load_dino_v1("no/such/file.pth")

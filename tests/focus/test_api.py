"""The public focus-weight API gives the trainer's weights, checks its inputs, and the README snippet runs."""

import dataclasses
import re

import pytest
import torch

from focusdpo import compute_focus_weights, iter_static_maps
from focusdpo.data.collate import PairCollator
from focusdpo.focus.maps import focus_weights
from focusdpo.losses import patch_error
from focusdpo.focus.mapper import FocusMapper
from focusdpo.config.recipe import parse_config
from focusdpo.training.trainer import build_trainer

from conftest import REPO


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    out = tmp_path_factory.mktemp("api")
    return build_trainer(*parse_config(["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "--toy_num_pairs", "4",
                                        "--output_dir", str(out), "--report_to", "none"]))


@pytest.fixture(scope="module")
def batch(trainer):
    return PairCollator(trainer.data_config.resolution)([trainer.train_dataset[i] for i in range(3)])


def api_inputs(batch):
    pixels = (batch["pixel_values"] + 1) / 2
    pairs = len(batch["pair_ids"])
    return pixels[:pairs], pixels[pairs:], batch["references"]


def test_weights_equal_the_trainers_on_the_same_batch(trainer, batch):
    prepared = trainer.backbone.prepare(batch, torch.Generator().manual_seed(3))
    expected = trainer.focus_weights(batch, prepared, None)
    grid = prepared.target.shape[-2:]
    pairs = len(batch["pair_ids"])
    winners, losers, references = api_inputs(batch)
    got = compute_focus_weights(winners, losers, references, grid, trainer.focus_config, trainer.focus_mapper,
                                masks=batch["reference_masks"], prior_masks=batch["prior_mask"],
                                timesteps=prepared.model_kwargs["timestep"][:pairs],
                                scheduler=trainer.backbone.noise_scheduler)
    assert got.shape == (2 * pairs, *grid)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, torch.ones_like(got))  # focus is on: the test compares real weights
    # The extractor alone (no mapper) and σ directly give the same weights.
    same = compute_focus_weights(winners, losers, references, grid, trainer.focus_config, trainer.focus_mapper.model,
                                 masks=batch["reference_masks"], prior_masks=batch["prior_mask"],
                                 sigmas=prepared.noise_level)
    assert torch.allclose(same, expected, atol=1e-6)


def test_reference_error_confidence_equals_the_trainers(trainer, batch):
    prepared = trainer.backbone.prepare(batch, torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref_pred = trainer.backbone.predict(trainer.backbone.denoiser, prepared)
    correspondence = trainer.focus_weights(batch, prepared, ref_pred)
    config, mapper = trainer.focus_config, trainer.focus_mapper
    ungated = dataclasses.replace(config, confidence_source="reference_error")
    trainer.focus_config, trainer.focus_mapper = ungated, FocusMapper(ungated, model=mapper.model)
    try:
        expected = trainer.focus_weights(batch, prepared, ref_pred)
    finally:
        trainer.focus_config, trainer.focus_mapper = config, mapper
    winners, losers, references = api_inputs(batch)
    kwargs = dict(masks=batch["reference_masks"], prior_masks=batch["prior_mask"], sigmas=prepared.noise_level)
    grid = prepared.target.shape[-2:]
    got = compute_focus_weights(winners, losers, references, grid, ungated, trainer.focus_mapper.model,
                                reference_error=patch_error(ref_pred, prepared.target), **kwargs)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(expected, correspondence, atol=1e-3)  # the gate changed the weights
    with pytest.raises(ValueError, match=r"reference_error needs reference_error=\(6, .*patch_error"):
        compute_focus_weights(winners, losers, references, grid, ungated, trainer.focus_mapper.model, **kwargs)


def test_precomputed_maps_give_the_trainers_static_maps(trainer, batch):
    winners, losers, references = api_inputs(batch)
    pairs = [{"winner": w, "loser": l, "references": r, "masks": m, "prior_mask": p} for w, l, r, m, p in
             zip(winners, losers, references, batch["reference_masks"], batch["prior_mask"])]
    grid = trainer.backbone.loss_grid(trainer.data_config.resolution)
    maps = list(iter_static_maps(iter(pairs), grid, trainer.focus_config, trainer.focus_mapper, batch_size=2))
    assert len(maps) == 3 and all(m.dtype == torch.float16 and m.shape == (2, 2, *grid) for m in maps)
    stacked = torch.stack(maps).float()
    expected = trainer.focus_mapper.batch_maps(batch, tuple(grid))
    assert torch.allclose(torch.cat([stacked[:, 0], stacked[:, 1]]), expected, atol=2e-3)  # float16
    u = torch.full((6,), 0.7)
    cfg = trainer.focus_config
    assert torch.allclose(focus_weights(torch.cat([stacked[:, 0], stacked[:, 1]]), u, cfg.lambda_structure,
                                        cfg.lambda_detail), focus_weights(expected, u, cfg.lambda_structure,
                                                                          cfg.lambda_detail), atol=5e-3)


def test_wrong_inputs_are_named(trainer, batch):
    winners, losers, references = api_inputs(batch)
    grid, cfg, mapper = (4, 4), trainer.focus_config, trainer.focus_mapper
    with pytest.raises(ValueError, match=r"winners must be in \[0, 1\].*\(pixel_values \+ 1\) / 2"):
        compute_focus_weights(winners * 2 - 1, losers, references, grid, cfg, mapper, sigmas=torch.rand(3))
    with pytest.raises(ValueError, match="either sigmas .* or timesteps"):
        compute_focus_weights(winners, losers, references, grid, cfg, mapper)
    with pytest.raises(ValueError, match="no alphas_cumprod"):
        compute_focus_weights(winners, losers, references, grid, cfg, mapper, timesteps=[1, 2, 3], scheduler=object())
    with pytest.raises(ValueError, match=r"one noise level per pair \(3\) or per image \(6\), got 2"):
        compute_focus_weights(winners, losers, references, grid, cfg, mapper, sigmas=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"references must have one entry per pair \(3\), got 2"):
        compute_focus_weights(winners, losers, references[:2], grid, cfg, mapper, sigmas=torch.rand(3))
    with pytest.raises(ValueError, match=r"pair 0 lacks \['loser'\]"):
        list(iter_static_maps([{"winner": winners[0], "references": references[0]}], grid, cfg, mapper))


def test_readme_snippets_run_as_written():
    """The loss snippet, then the subject-wise one that continues it."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Use the loss in your own trainer", 1)[1]
    image, subject = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
    scope = {}
    exec(compile(image, "README.md", "exec"), scope)
    assert scope["weights"].shape == (4, 8, 8)
    assert torch.allclose(scope["weights"].mean(dim=(1, 2)), torch.ones(4))
    assert torch.isfinite(scope["loss"])
    exec(compile(subject, "README.md", "exec"), scope)
    assert scope["masks"].shape == (4, 2, 8, 8)
    assert torch.isfinite(scope["subject_loss"]) and scope["subject_metrics"]["subject/labelled"] == 1

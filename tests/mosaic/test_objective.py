"""MOSAIC objectives: correspondence targets and points, batching, the SFT and DPO objectives at toy size."""

import json
import math

import pytest
import torch

from focusdpo.config.recipe import parse_config
from focusdpo.config.training import LossConfig
from focusdpo.errors import ConfigError, PairDataError
from focusdpo.models import load_backbone
from focusdpo.mosaic.objective import (build_targets, check_points, import_semalign, md_weight, pad_points,
                                       points_from_matches)
from focusdpo.training.trainer import build_trainer

from conftest import REPO, md_of, sca_of


def test_a_batch_with_different_point_counts_equals_samples_computed_separately():
    torch.manual_seed(0)
    points = [torch.tensor([[0, 1, 3], [1, 0, 5], [1, 2, 0]]),
              torch.tensor([[0, 0, 1], [0, 3, 2], [1, 1, 4], [2, 2, 6], [2, 0, 7]])]
    counts, target_tokens, ref_tokens = [2, 3], 8, 4
    for rows in ("matched", "all"):
        batch = build_targets(points, counts, target_tokens, ref_tokens, rows)
        attn = torch.rand(2, batch.plan.rows.shape[1], target_tokens).softmax(-1)
        alone = []
        for i in range(2):
            one = build_targets(points[i:i + 1], counts[i:i + 1], target_tokens, ref_tokens, rows)
            a = attn[i:i + 1, : one.plan.rows.shape[1]]
            assert torch.equal(one.plan.rows, batch.plan.rows[i:i + 1, : one.plan.rows.shape[1]])
            alone.append(torch.stack([losses(a, one) for losses in (sca_of, md_of)]))
        together = torch.stack([sca_of(attn, batch), md_of(attn, batch)])
        torch.testing.assert_close(together, torch.stack(alone).mean(0))


def test_md_warm_up_starts_then_ramps():
    cfg = LossConfig(lambda_md=0.6, md_start_step=10, md_ramp_steps=4)
    assert [md_weight(cfg, s) for s in (0, 9, 10, 11, 13, 100)] == pytest.approx([0, 0, 0.15, 0.3, 0.6, 0.6])


# ---- correspondence targets ------------------------------------------------------------------------------------------
def test_semalign_points_are_scaled_to_the_token_grids():
    ref_yx = [torch.tensor([[0, 0], [63, 63], [62, 62]]), torch.tensor([[32, 16]])]
    tgt_yx = [torch.tensor([[8, 40], [63, 0], [62, 1]]), torch.tensor([[0, 63]])]
    points = import_semalign(ref_yx, tgt_yx, target_grid=(8, 8), reference_grid=(4, 4))
    # 64 → 8: (8, 40) → row 1, col 5; (63, 0) and (62, 1) both land in token (7, 0) against ref token (3, 3): once.
    assert points.tolist() == [[0, 0, 13], [0, 15, 56], [1, 9, 7]]


@pytest.mark.parametrize("points, message", [
    ([[0, 0, 64]], "outside the target token grid"),
    ([[0, 16, 0]], "outside the reference token grid"),
    ([[2, 0, 0]], "reference index 2 but the pair has 2 references"),
    ([[0, 0, 5], [1, 3, 5]], "target token 5 is matched by two references"),
])
def test_bad_points_are_refused_with_the_reason(points, message):
    with pytest.raises(PairDataError, match=message):
        check_points(torch.tensor(points), num_references=2, target_tokens=64, reference_tokens=16, pair_id="p7")


def test_one_reference_may_match_one_target_token_from_several_of_its_tokens():
    check_points(torch.tensor([[0, 0, 5], [0, 3, 5]]), 1, 64, 16)


def test_matches_become_rows_per_reference():
    matches = [torch.tensor([[1, 2]]), torch.zeros(0, 2, dtype=torch.long), torch.tensor([[0, 7], [3, 1]])]
    assert points_from_matches(matches).tolist() == [[0, 1, 2], [2, 0, 7], [2, 3, 1]]


def test_padded_points_are_masked():
    padded, valid = pad_points([torch.ones(2, 3, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long)])
    assert padded.shape == (2, 2, 3) and valid.tolist() == [[True, True], [False, False]]


# ---- objectives and recipes at toy size ------------------------------------------------------------------------------
TOY = ["--pretrained_path", "", "--dataset", "toy", "--toy_num_pairs", "4", "--resolution", "32",
       "--reference_size", "16", "--max_steps", "2", "--per_device_train_batch_size", "2",
       "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--save_steps", "100",
       "--sample_every_run", "false", "--dino_model", "vit_small_patch14_dinov2", "--dino_weights", "",
       "--dino_random_weights", "true", "--dino_depth", "2", "--dino_image_size", "56", "--use_cpu", "true",
       "--warmup_steps", "0", "--bf16", "false", "--md_start_step", "0", "--md_ramp_steps", "2"]


@pytest.mark.e2e
@pytest.mark.parametrize("recipe", ["mosaic_sft_flux", "focusdpo_mosaic_flux2"])
def test_mosaic_recipes_train_two_steps_at_toy_size(recipe, tmp_path):
    argv = ["--config", str(REPO / "recipes" / f"{recipe}.yaml"), "--output_dir", str(tmp_path), *TOY]
    trainer = build_trainer(*parse_config(argv))
    trainer.train()
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][:2]
    assert all(math.isfinite(log["mosaic/sca"]) and log["mosaic/md"] <= 0 for log in logs)
    cfg = trainer.loss_config
    first = logs[0]
    aux = cfg.lambda_sca * first["mosaic/sca"] + md_weight(cfg, 0) * first["mosaic/md"]
    base = first["mse/policy_w"] if cfg.objective == "sft" else math.log(2)  # DPO starts at ln 2
    assert first["loss"] == pytest.approx(base + aux, rel=1e-4)


@pytest.mark.e2e
def test_sft_without_mosaic_losses_trains_on_winners(tmp_path):
    argv = ["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "--output_dir", str(tmp_path), *TOY[:-4],
            "--objective", "sft", "--lambda_structure", "0", "--lambda_detail", "0"]
    trainer = build_trainer(*parse_config(argv))
    trainer.train()
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(first["mse/policy_w"], rel=1e-5) and "mosaic/sca" not in first


def test_precomputed_points_equal_on_the_fly_ones_and_a_stale_key_is_refused():
    from focusdpo.config.focus import FocusConfig
    from focusdpo.data.load import load_pairs
    from focusdpo.mosaic.objective import MosaicCollator, MosaicObjective, precompute_points

    focus = FocusConfig(dino_random_weights=True, dino_depth=2, dino_image_size=56)
    pairs = load_pairs("toy", "auto", 2, 32)
    cached = precompute_points(pairs, focus, (8, 8), (4, 4), 32)
    batch = MosaicCollator(32)([cached[0], cached[1]])
    backbone = load_backbone("flux2", max_references=6, reference_size=16)
    objective = MosaicObjective(backbone.denoiser, "flux2", LossConfig(lambda_sca=0.1), focus)
    stored = objective.batch_points(batch, 2, (8, 8), (4, 4))
    del batch["mosaic_points"]
    live = objective.batch_points(batch, 2, (8, 8), (4, 4))
    assert all(torch.equal(a, b) for a, b in zip(stored, live)) and sum(len(p) for p in live) > 0
    batch = MosaicCollator(32)([cached[0]])
    with pytest.raises(ValueError, match="cached MOSAIC points were made as"):
        objective.batch_points(batch, 1, (16, 16), (4, 4))


def test_winner_inputs_predict_what_the_full_batch_predicts_for_the_winners():
    from focusdpo.mosaic.objective import winner_inputs

    backbone = load_backbone("flux2", max_references=3, reference_size=16)
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, "prompts": ["a", "b"],
             "pair_ids": ["0", "1"], "references": [torch.rand(1, 3, 16, 16), torch.rand(3, 3, 16, 16)]}
    prepared = backbone.prepare(batch, torch.Generator().manual_seed(0))  # mixed K: padded and masked
    winners = winner_inputs(prepared)
    with torch.no_grad():
        full, half = backbone.predict(backbone.denoiser, prepared), backbone.predict(backbone.denoiser, winners)
    assert half.shape[0] == 2 and torch.equal(winners.target, prepared.target[:2])
    torch.testing.assert_close(half, full[:2], rtol=1e-5, atol=1e-6)


def test_sft_refuses_focus_weights_instead_of_ignoring_them(tmp_path):
    argv = ["--config", str(REPO / "recipes" / "mosaic_sft_flux.yaml"), "--output_dir", str(tmp_path), *TOY,
            "--lambda_structure", "1.0"]
    with pytest.raises(ConfigError, match="objective: sft trains on the winners"):
        build_trainer(*parse_config(argv))


@pytest.mark.e2e
def test_correspond_command_writes_points_the_trainer_accepts(tmp_path):
    from focusdpo.commands import main

    out = tmp_path / "pairs"
    main(["correspond", "--out", str(out), "--config", str(REPO / "recipes" / "focusdpo_mosaic_flux2.yaml"),
          *TOY, "--device", "cpu"])
    argv = ["--config", str(REPO / "recipes" / "focusdpo_mosaic_flux2.yaml"), "--output_dir", str(tmp_path / "run"),
            *TOY, "--dataset", str(out), "--max_steps", "1"]
    trainer = build_trainer(*parse_config(argv))
    assert "mosaic_points" in trainer.train_dataset.column_names
    trainer.train()
    assert trainer.mosaic.cache == {}  # every point came from the dataset, none was computed

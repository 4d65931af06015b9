"""MOSAIC: SCA / MD losses, reference→target attention capture, correspondence targets, objectives, recipes."""

import json
import math

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from focusdpo.mosaic.attention import AttentionCapture, CapturePlan
from focusdpo.errors import ConfigError
from focusdpo.config.training import LossConfig
from focusdpo.config.recipe import parse_config
from focusdpo.errors import PairDataError
from focusdpo.losses import md_loss, sca_loss
from focusdpo.models import load_backbone
from focusdpo.mosaic.objective import (build_targets, check_points, import_semalign, md_weight, pad_points,
                                       points_from_matches)
from focusdpo.training.trainer import build_trainer

from conftest import REPO

# ---- losses against hand-computed values --------------------------------------------------------------------------
ATTN = torch.tensor([[[0.8, 0.2], [0.5, 0.5], [0.1, 0.9]]])  # (S=1, R=3, L=2)


def test_sca_is_mean_over_references_of_mean_nll():
    rows, targets, refs = torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, 1]]), torch.tensor([[0, 0, 1]])
    loss = sca_loss(ATTN, rows, targets, refs, torch.ones(1, 3, dtype=torch.bool), 2)
    ref0 = (-math.log(0.8) - math.log(0.5)) / 2  # reference 0: two points
    ref1 = -math.log(0.9)  # reference 1: one point (not outweighed by reference 0's two)
    assert loss.item() == pytest.approx((ref0 + ref1) / 2, rel=1e-6)


@pytest.mark.parametrize("divergence", ["jsd", "sym_kl"])
def test_md_is_minus_divergence_of_per_reference_mean_attention(divergence):
    attn = torch.tensor([[[0.8, 0.2], [0.6, 0.4], [0.1, 0.9]]])  # reference 0: rows 0, 1 → p = (0.7, 0.3)
    loss = md_loss(attn, torch.tensor([[0, 0, 1]]), torch.ones(1, 3, dtype=torch.bool), 2, divergence)
    p, q = (0.7, 0.3), (0.1, 0.9)
    if divergence == "jsd":
        m = (0.4, 0.6)
        expected = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m)) + 0.5 * sum(b * math.log(b / c)
                                                                                    for b, c in zip(q, m))
    else:
        expected = sum(a * math.log(a / b) + b * math.log(b / a) for a, b in zip(p, q))
    assert loss.item() == pytest.approx(-expected, rel=1e-5)


def test_md_is_exactly_zero_for_one_reference():
    attn = torch.rand(2, 4, 6).softmax(-1).requires_grad_()
    loss = md_loss(attn, torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool), 1)
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph
    assert attn.grad.abs().sum() == 0


def test_md_decreases_when_references_attend_to_disjoint_regions():
    overlap = torch.full((1, 2, 4), 0.25)
    disjoint = torch.tensor([[[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]])
    refs, valid = torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool)
    for divergence in ("jsd", "sym_kl"):
        same = md_loss(overlap, refs, valid, 2, divergence)
        apart = md_loss(disjoint, refs, valid, 2, divergence)
        assert same.item() == pytest.approx(0.0, abs=1e-7) and apart < same - 0.5
    assert md_loss(disjoint, refs, valid, 2, "jsd").item() == pytest.approx(-math.log(2), rel=1e-5)  # JSD's max


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


def sca_of(attn, t):
    return sca_loss(attn, t.point_rows, t.point_targets, t.point_refs, t.point_valid, t.num_references)


def md_of(attn, t):
    return md_loss(attn, t.row_refs, t.row_valid, t.num_references, "jsd")


def test_md_warm_up_starts_then_ramps():
    cfg = LossConfig(lambda_md=0.6, md_start_step=10, md_ramp_steps=4)
    assert [md_weight(cfg, s) for s in (0, 9, 10, 11, 13, 100)] == pytest.approx([0, 0, 0.15, 0.3, 0.6, 0.6])


# ---- correspondence targets ---------------------------------------------------------------------------------------
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


# ---- attention capture on tiny FLUX.2 and Kontext transformers ----------------------------------------------------
def tiny_batch(backbone, refs: int, ref_size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch = {"pixel_values": torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, "prompts": ["a red cup", "two dogs"],
             "pair_ids": ["0", "1"], "references": [torch.rand(refs, 3, ref_size, ref_size, generator=g)] * 2}
    return backbone.prepare(batch, torch.Generator().manual_seed(seed))


def direct_attention(attn, kw: dict) -> torch.Tensor:
    """Full ``softmax(QKᵀ/√d)`` ``(N, H, T, T)`` from the block's own projections, norms and RoPE."""
    hidden, encoder, rope = kw["hidden_states"], kw.get("encoder_hidden_states"), kw["image_rotary_emb"]
    dim = attn.head_dim
    if hasattr(attn, "to_qkv_mlp_proj"):  # FLUX.2 single-stream: fused q/k/v + MLP input
        q, k, _ = attn.to_qkv_mlp_proj(hidden)[..., : 3 * attn.inner_dim].chunk(3, dim=-1)
    else:
        q, k = attn.to_q(hidden), attn.to_k(hidden)
    q, k = attn.norm_q(q.unflatten(-1, (-1, dim))), attn.norm_k(k.unflatten(-1, (-1, dim)))
    if encoder is not None:
        q = torch.cat([attn.norm_added_q(attn.add_q_proj(encoder).unflatten(-1, (-1, dim))), q], dim=1)
        k = torch.cat([attn.norm_added_k(attn.add_k_proj(encoder).unflatten(-1, (-1, dim))), k], dim=1)
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    return (torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(dim)).softmax(-1)


@pytest.mark.parametrize("family", ["flux2", "flux_kontext"])
def test_captured_attention_is_the_blocks_own_softmax_and_leaves_the_output_unchanged(family):
    backbone = load_backbone(family, max_references=2)
    den = backbone.denoiser
    prepared = tiny_batch(backbone, refs=2)
    with torch.no_grad():
        plain = backbone.predict(den, prepared)
    target, image = 64, 64 + 2 * 64
    plan = CapturePlan(torch.tensor([[64, 100, 130], [191, 64, 65]]), target, image)
    blocks = [den.transformer_blocks[0].attn, den.single_transformer_blocks[0].attn]
    inputs = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, kw: inputs.__setitem__(m, kw), with_kwargs=True) for b in blocks]
    for index, block in enumerate(blocks):
        capture = AttentionCapture(den, [index])
        with torch.no_grad():
            with capture.recording(plan):
                captured = backbone.predict(den, prepared)
            got = capture.attention(plan)
        capture.remove()
        assert torch.equal(captured, plain)  # capture on == capture off, bit for bit
        with torch.no_grad():
            full = direct_attention(block, inputs[block])[:2]  # the winners
        offset = full.shape[-1] - image
        rows = plan.rows + offset
        picked = torch.stack([full[s][:, rows[s]][..., offset:offset + target] for s in range(2)])
        expected = (picked / picked.sum(-1, keepdim=True)).mean(1)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    for hook in hooks:
        hook.remove()


def test_blocks_are_selected_by_name_or_index_and_averaged():
    backbone = load_backbone("flux2", max_references=1)
    prepared = tiny_batch(backbone, refs=1)
    plan = CapturePlan(torch.tensor([[64, 70], [80, 127]]), 64, 128)
    per_block = []
    for blocks in ([0], [1], "all"):
        capture = AttentionCapture(backbone.denoiser, blocks)
        with torch.no_grad(), capture.recording(plan):
            backbone.predict(backbone.denoiser, prepared)
        per_block.append(capture.attention(plan))
        capture.remove()
    torch.testing.assert_close(per_block[2], (per_block[0] + per_block[1]) / 2)
    assert not torch.allclose(per_block[0], per_block[1])
    with pytest.raises(ConfigError, match=r"indices must lie in \[0, 2\)"):
        AttentionCapture(backbone.denoiser, [2])


def test_capture_is_refused_on_a_unet():
    backbone = load_backbone("sd")
    with pytest.raises(ConfigError, match="UNet2DConditionModel has no reference tokens"):
        AttentionCapture(backbone.denoiser)
    from focusdpo.config.focus import FocusConfig
    from focusdpo.mosaic.objective import MosaicObjective

    with pytest.raises(ConfigError, match="family='sd'"):
        MosaicObjective(backbone.denoiser, "sd", LossConfig(lambda_sca=0.1), FocusConfig())


def test_sca_decreases_when_trained_on_fixed_correspondences_with_checkpointing():
    torch.manual_seed(0)
    backbone = load_backbone("flux2", max_references=2, reference_size=16)
    den = backbone.denoiser.requires_grad_(True)
    den.enable_gradient_checkpointing()  # the recipes train this way: gradients must still reach the blocks
    den.train()
    prepared = tiny_batch(backbone, refs=2, ref_size=16)
    points = [torch.tensor([[0, 0, 9], [0, 5, 20], [1, 3, 40], [1, 15, 63]]), torch.tensor([[1, 2, 0], [0, 7, 33]])]
    t = build_targets(points, [2, 2], 64, 16)
    capture = AttentionCapture(den, "all")
    optimizer = torch.optim.Adam(den.parameters(), lr=3e-3)
    history = []
    for _ in range(6):
        with capture.recording(t.plan):
            backbone.predict(den, prepared)
        loss = sca_of(capture.attention(t.plan), t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < history[0] - 0.1, history


@pytest.mark.parametrize("refs", [4, 6])
def test_four_and_six_references_run(refs):
    backbone = load_backbone("flux2", max_references=refs, reference_size=16)
    prepared = tiny_batch(backbone, refs=refs, ref_size=16)
    points = [torch.stack([torch.full((3,), k), torch.arange(3) + k, torch.arange(3) + 3 * k], 1) for k in range(refs)]
    t = build_targets([torch.cat(points)] * 2, [refs, refs], 64, 16, "all")
    assert t.plan.rows.shape == (2, refs * 16) and t.plan.image_tokens == 64 + refs * 16
    capture = AttentionCapture(backbone.denoiser, "all")
    with torch.no_grad(), capture.recording(t.plan):
        backbone.predict(backbone.denoiser, prepared)
    attn = capture.attention(t.plan)
    assert attn.shape == (2, refs * 16, 64) and torch.isfinite(sca_of(attn, t)) and md_of(attn, t) < 0


def test_padded_points_are_masked():
    padded, valid = pad_points([torch.ones(2, 3, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long)])
    assert padded.shape == (2, 2, 3) and valid.tolist() == [[True, True], [False, False]]


# ---- config, objectives and recipes at toy size -------------------------------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("objective", "ppo", "objective='ppo' is not valid"), ("md_divergence", "kl", "md_divergence='kl'"),
    ("md_rows", "some", "md_rows='some'"), ("attention_blocks", "first", "attention_blocks='first'"),
    ("lambda_sca", -1.0, "lambda_sca=-1.0"),
])
def test_bad_mosaic_settings_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        LossConfig(**{field: value})


TOY = ["--pretrained_path", "", "--dataset", "toy", "--toy_num_pairs", "4", "--resolution", "32",
       "--reference_size", "16", "--max_steps", "2", "--per_device_train_batch_size", "2",
       "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--save_steps", "100",
       "--sample_every_run", "false", "--dino_model", "vit_small_patch14_dinov2", "--dino_weights", "",
       "--dino_random_weights", "true", "--dino_depth", "2", "--dino_image_size", "56", "--use_cpu", "true",
       "--warmup_steps", "0", "--bf16", "false", "--md_start_step", "0", "--md_ramp_steps", "2"]


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


def test_an_attention_backend_set_after_installing_reaches_the_wrapped_processor():
    backbone = load_backbone("flux2")
    AttentionCapture(backbone.denoiser, "all")
    backbone.denoiser.set_attention_backend("native")
    assert backbone.denoiser.transformer_blocks[0].attn.processor.inner._attention_backend.value == "native"


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

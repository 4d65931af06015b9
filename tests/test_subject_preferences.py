"""Subject-wise preferences (preference_unit: subject): hand-computed losses, the plain-DPO limit, masks, refusals,
and the unit in training (step-0 loss, cached masks = masks made on the fly)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import focusdpo.training.trainer
from focusdpo.commands import main as cli
from focusdpo.config.recipe import parse_config
from focusdpo.data.load import load_pairs
from focusdpo.errors import ConfigError, PairDataError
from focusdpo.focus.maps import subject_masks
from focusdpo.losses import (diffusion_dpo_loss, subject_dpo_loss, subject_errors, subject_labels,
                             weighted_error)
from focusdpo.training.trainer import build_trainer

from conftest import REPO

TINY = ["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "--toy_num_pairs", "4", "--max_steps", "2",
        "--logging_steps", "1", "--save_steps", "100", "--sample_every_run", "false", "--report_to", "none",
        "--preference_unit", "subject"]


def test_subject_errors_by_hand():
    pred = torch.tensor([[[[2.0, 1.0]]]])  # (1, 1, 1, 2): patch errors 4 and 1 against a zero target
    masks = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # subject 0 = patch 0, subject 1 = patch 1
    assert subject_errors(pred, torch.zeros_like(pred), masks).tolist() == [[2.0, 0.5]]  # / 2 patches
    weights = torch.tensor([[[3.0, 1.0]]])
    assert subject_errors(pred, torch.zeros_like(pred), masks, weights).tolist() == [[3.0, 0.25]]  # 3·4/4, 1·1/4


def test_masks_that_partition_the_image_add_up_to_the_image_error():
    pred, target, weights = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5), torch.rand(4, 5, 5)
    masks = F.one_hot(torch.randint(0, 3, (4, 5, 5)), 3).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(subject_errors(pred, target, masks, weights).sum(1),
                               weighted_error(pred, target, weights))


def test_two_subjects_whose_labels_disagree_by_hand():
    """Subject 0 is better in the chosen image, subject 1 in the rejected one; the policy lowered the winner's
    error on both, so subject 0 agrees with its label (inside 0.5) and subject 1 does not (inside −1)."""
    policy = torch.tensor([[0.1, 0.1], [0.2, 0.3]], requires_grad=True)  # [w; l] x 2 subjects
    reference = torch.full((2, 2), 0.2)
    labels = subject_labels(torch.tensor([[[0.9, 0.2], [0.1, 0.8]]]))
    assert labels.tolist() == [[1.0, -1.0]]
    loss, metrics = subject_dpo_loss(policy, reference, labels, beta=10.0)
    expected = (-F.logsigmoid(torch.tensor(0.5)) - F.logsigmoid(torch.tensor(-1.0))) / 2
    torch.testing.assert_close(loss, expected)
    assert metrics["subject/accuracy"] == 0.5 and metrics["subject/label_disagrees"] == 0.5
    torch.testing.assert_close(metrics["subject/margin"], torch.tensor(-0.25))
    loss.backward()
    # lower loss: subject 0's winner error goes down, subject 1's winner error goes up (its loser is the better one)
    assert policy.grad[0, 0] > 0 and policy.grad[0, 1] < 0
    assert policy.grad[1, 0] < 0 and policy.grad[1, 1] > 0


def test_the_whole_image_term_adds_omega_times_the_image_loss():
    policy, reference = torch.rand(2, 2), torch.rand(2, 2)
    labels, image_inside = torch.tensor([[1.0, 0.0]]), torch.tensor([0.3])
    plain, _ = subject_dpo_loss(policy, reference, labels, 10.0)
    both, _ = subject_dpo_loss(policy, reference, labels, 10.0, image_inside=image_inside, image_weight=0.5)
    torch.testing.assert_close(both, plain - 0.5 * F.logsigmoid(image_inside)[0])


def test_one_subject_with_a_full_mask_and_no_image_term_is_plain_diffusion_dpo():
    pred, ref_pred, target = torch.randn(3, 6, 4, 8, 8).unbind()
    weights = torch.rand(6, 8, 8) + 0.1
    masks = torch.ones(6, 1, 8, 8)
    labels = subject_labels(torch.tensor([[[0.9], [0.1]]] * 3))
    subject, _ = subject_dpo_loss(subject_errors(pred, target, masks, weights),
                                  subject_errors(ref_pred, target, masks, weights), labels, 5000.0)
    image, _ = diffusion_dpo_loss(weighted_error(pred, target, weights), weighted_error(ref_pred, target, weights),
                                  5000.0)
    torch.testing.assert_close(subject, image)


def test_labels_leave_out_ties_within_the_margin_and_missing_subjects():
    scores = torch.tensor([[[0.9, 0.5, math.nan], [0.5, 0.55, math.nan]]])
    assert subject_labels(scores, margin=0.1).tolist() == [[1.0, 0.0, 0.0]]
    assert subject_labels(scores).tolist() == [[1.0, -1.0, 0.0]]


def test_a_pair_without_labelled_subjects_keeps_only_the_image_term():
    loss, metrics = subject_dpo_loss(torch.rand(2, 2), torch.rand(2, 2), torch.zeros(1, 2), 10.0,
                                     image_inside=torch.tensor([0.0]), image_weight=1.0)
    torch.testing.assert_close(loss, torch.tensor(math.log(2)))
    assert metrics["subject/labelled"] == 0 and torch.isfinite(metrics["subject/accuracy"])


def test_subject_masks_split_the_subject_ness_between_the_references():
    sims, subject = torch.rand(2, 3, 4, 4), torch.rand(2, 4, 4)
    masks = subject_masks(sims, subject, temperature=0.05)
    torch.testing.assert_close(masks.sum(1), subject)
    assert (masks.argmax(1) == sims.argmax(1)).all()


@pytest.mark.parametrize("argv, message", [
    (["--preference_unit", "patch"], "preference_unit='patch' is not valid; choose one of: image, subject"),
    (["--preference_unit", "subject", "--sdpo_mu", "0.1"], "without the SDPO safeguard"),
    (["--preference_unit", "subject", "--subject_margin", "-1"], "subject_margin=-1.0 must be a finite number >= 0"),
])
def test_bad_subject_settings_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), *argv])


def saved_pairs(tmp_path, edit):
    """The toy pairs with ``edit(rows)`` applied, saved as a pair folder."""
    from datasets import Dataset, Features

    pairs = load_pairs("toy", toy_num_pairs=4, resolution=32)
    rows = edit([pairs[i] for i in range(len(pairs))])
    features = Features({k: v for k, v in pairs.features.items() if k in rows[0]})
    Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "pairs"))
    return str(tmp_path / "pairs")


@pytest.mark.parametrize("edit, message", [
    (lambda rows: [{**r, "subject_scores": [s[:-1] for s in r["subject_scores"]]} if i == 2 else r
                   for i, r in enumerate(rows)], r"pair toy-00002: subject_scores must be two rows .* of \d finite"),
    (lambda rows: [{**r, "subject_scores": [[math.nan] * len(r["references"])] * 2} if i == 1 else r
                   for i, r in enumerate(rows)], r"pair toy-00001: subject_scores must be"),
    (lambda rows: [{**r, "references": [], "reference_masks": [], "subject_scores": [[], []]} if i == 3 else r
                   for i, r in enumerate(rows)], "pair toy-00003 has no references: preference_unit: subject"),
    (lambda rows: [{k: v for k, v in r.items() if k != "subject_scores"} for r in rows], "needs per-subject scores"),
])
def test_bad_subject_data_is_refused_before_the_model_loads(edit, message, tmp_path, monkeypatch):
    monkeypatch.setattr(focusdpo.training.trainer, "load_backbone", None)  # a model load would raise TypeError
    dataset = saved_pairs(tmp_path, edit)
    with pytest.raises(PairDataError, match=message):
        build_trainer(*parse_config([*TINY, "--dataset", dataset, "--output_dir", str(tmp_path / "run")]))


def test_a_focus_cache_without_subject_masks_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    image_unit = [a for a in TINY if a not in ("--preference_unit", "subject")]
    cli(["focus", "--out", str(tmp_path / "cached"), "--device", "cpu", *image_unit])
    monkeypatch.setattr(focusdpo.training.trainer, "load_backbone", None)
    with pytest.raises(PairDataError, match="re-run `focusdpo focus` with this recipe"):
        build_trainer(*parse_config([*TINY, "--dataset", str(tmp_path / "cached"), "--output_dir", str(tmp_path)]))


def test_jsonl_pairs_carry_subject_scores_and_a_wrong_count_names_the_line(tmp_path):
    from PIL import Image

    for name in ("w.png", "l.png", "a.png", "b.png"):
        Image.new("RGB", (16, 16), "red").save(tmp_path / name)
    good = {"prompt": "a dog and a cat", "chosen": "w.png", "rejected": "l.png", "references": ["a.png", "b.png"],
            "subject_scores": [[0.9, 0.2], [0.1, 0.8]]}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(good) + "\n")
    torch.testing.assert_close(torch.tensor(load_pairs(str(tmp_path))["subject_scores"]),
                               torch.tensor([[[0.9, 0.2], [0.1, 0.8]]]))
    (tmp_path / "pairs.jsonl").write_text(json.dumps({**good, "subject_scores": [[0.9], [0.1]]}) + "\n")
    with pytest.raises(PairDataError, match="pairs.jsonl line 1: subject_scores must be .* per reference \\(2\\)"):
        load_pairs(str(tmp_path))


def step_losses(out):
    return [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


@pytest.mark.e2e
def test_the_subject_unit_trains_from_ln2_and_cached_masks_equal_masks_made_on_the_fly(tmp_path):
    """Step 0: every subject's Δ is 0, so each labelled subject costs ln 2 and the image term ω·ln 2."""
    live = build_trainer(*parse_config([*TINY, "--output_dir", str(tmp_path / "live")]))
    live.train()
    omega = live.loss_config.subject_image_weight
    losses = step_losses(tmp_path / "live")
    assert losses[0] == pytest.approx(math.log(2) * (1 + omega), abs=1e-5)
    assert losses[1] != pytest.approx(losses[0], abs=1e-6)
    cli(["focus", "--out", str(tmp_path / "cached"), "--device", "cpu", *TINY])
    assert "subject_masks" in load_pairs(str(tmp_path / "cached")).column_names
    cached = build_trainer(*parse_config([*TINY, "--dataset", str(tmp_path / "cached"),
                                          "--output_dir", str(tmp_path / "run")]))
    cached.train()
    assert step_losses(tmp_path / "run") == pytest.approx(losses, rel=1e-3)

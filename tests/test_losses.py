"""Hand-computed values for the pure loss functions."""

import math

import pytest
import torch
import torch.nn.functional as F

from focusdpo.losses import (adapted_beta, diffusion_dpo_loss, dpo_inside, error_output_gradient, md_loss,
                             preference_loss, sca_loss, scale_loser_gradient, sdpo_loser_scale, subject_dpo_loss,
                             subject_errors, subject_labels, weighted_error)


def vanilla_diffusion_dpo(model_pred, ref_pred, target, beta):
    """Independent re-implementation of the Diffusion-DPO reference code (Wallace et al.)."""
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    inside_term = -1 * beta * 0.5 * (model_diff - ref_diff)
    return -1 * F.logsigmoid(inside_term).mean()


def test_weighted_error_hand_value():
    pred = torch.zeros(1, 2, 1, 2)
    target = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # position 0: (1+9)/2 = 5, position 1: (4+0)/2 = 2
    assert weighted_error(pred, target).item() == pytest.approx(3.5)
    weights = torch.tensor([[[3.0, 1.0]]])
    assert weighted_error(pred, target, weights).item() == pytest.approx((3 * 5 + 2) / 4)


def test_weighted_error_rejects_wrong_grid():
    with pytest.raises(ValueError, match="do not match the loss grid"):
        weighted_error(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 4))


def test_loss_is_ln2_when_policy_equals_reference():
    err = torch.rand(8)
    loss, metrics = diffusion_dpo_loss(err, err.clone(), beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["rewards/margins"].item() == 0


def test_all_ones_weights_equal_vanilla_diffusion_dpo():
    g = torch.Generator().manual_seed(0)
    pred, ref, target = (torch.randn(6, 4, 8, 8, generator=g) for _ in range(3))
    ones = torch.ones(6, 8, 8)
    ours, _ = diffusion_dpo_loss(weighted_error(pred, target, ones), weighted_error(ref, target, ones), beta=2.0)
    assert torch.allclose(ours, vanilla_diffusion_dpo(pred, ref, target, beta=2.0), rtol=1e-6, atol=0)


def test_swapping_winner_and_loser_flips_inside():
    policy, ref = torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([1.5, 2.0, 2.0, 4.0])
    swap = lambda x: torch.cat(x.chunk(2)[::-1])  # noqa: E731
    inside = dpo_inside(policy, ref, beta=10.0)
    assert torch.equal(dpo_inside(swap(policy), swap(ref), beta=10.0), -inside)


def test_no_overflow_at_huge_beta():
    policy, ref = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])  # inside = -0.5e5 * (-1 - 1) = 1e5
    loss, _ = diffusion_dpo_loss(policy, ref, beta=1e5)
    assert loss.item() == 0.0 and torch.isfinite(loss)
    loss, _ = diffusion_dpo_loss(ref, policy, beta=1e5)  # inside = -1e5 -> loss = 1e5
    assert loss.item() == pytest.approx(1e5)


# Two pairs with inside = [2, -1] (beta = 4: Δ = [-1, 0.5]).
POLICY = torch.tensor([0.0, 0.5, 1.0, 0.0])


REF = torch.zeros(4)
INSIDE = [2.0, -1.0]


def sig(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("loss_type, expected", [
    ("sigmoid", [-math.log(sig(2)), -math.log(sig(-1))]),
    ("hinge", [0.0, 2.0]),
    ("ipo", [(0.5 - 1 / 8) ** 2, (-0.25 - 1 / 8) ** 2]),
])
def test_loss_types_hand_computed(loss_type, expected):
    inside = dpo_inside(POLICY, REF, beta=4.0)
    assert inside.tolist() == INSIDE
    assert preference_loss(inside, 4.0, loss_type).tolist() == pytest.approx(expected)
    loss, _ = diffusion_dpo_loss(POLICY, REF, 4.0, loss_type)
    assert loss.item() == pytest.approx(sum(expected) / 2)


def test_robust_and_label_smoothing_hand_computed():
    inside, eps = torch.tensor(INSIDE), 0.1
    robust = [(-(1 - eps) * math.log(sig(x)) + eps * math.log(sig(-x))) / (1 - 2 * eps) for x in INSIDE]
    assert preference_loss(inside, 4.0, "robust", eps).tolist() == pytest.approx(robust)
    cdpo = [-(1 - eps) * math.log(sig(x)) - eps * math.log(sig(-x)) for x in INSIDE]
    assert preference_loss(inside, 4.0, "sigmoid", eps).tolist() == pytest.approx(cdpo)


def test_metrics_follow_trl_names_and_values():
    _, metrics = diffusion_dpo_loss(POLICY, REF, 4.0)
    assert metrics["rewards/chosen"].item() == pytest.approx(-2 * (0.0 + 0.5) / 2)
    assert metrics["rewards/rejected"].item() == pytest.approx(-2 * (1.0 + 0.0) / 2)
    assert metrics["rewards/margins"].item() == pytest.approx(sum(INSIDE) / 2)
    assert metrics["rewards/accuracies"].item() == 0.5
    assert {"mse/policy_w", "mse/policy_l", "mse/ref_w", "mse/ref_l"} <= set(metrics)


def test_dpo_health_metrics_by_hand():
    """The share of pairs with a negative margin, and the sigmoid loss's gradient factor σ(−inside)."""
    _, metrics = diffusion_dpo_loss(POLICY, REF, 4.0)
    assert metrics["dpo/negative_margin_share"].item() == sum(x < 0 for x in INSIDE) / len(INSIDE)
    assert metrics["dpo/gradient_factor"].item() == pytest.approx(sum(sig(-x) for x in INSIDE) / len(INSIDE))


# ---- automatic β: log β ← clamp(log β + rate·(g − target)) ---------------------------------------------------------
DOUBLING = math.log(2) / 0.2  # a rate at which g − target = ±0.2 doubles or halves β


@pytest.mark.parametrize("factor, low, high, expected", [
    (0.5, 10.0, 1e5, 2000.0),  # pairs not separated (g = 0.5 > 0.3): β doubles
    (0.1, 10.0, 1e5, 500.0),  # saturated pairs (g = 0.1 < 0.3): β halves
    (0.5, 10.0, 1500.0, 1500.0),  # clamped at beta_max
    (0.1, 800.0, 1e5, 800.0),  # clamped at beta_min
    (0.3, 10.0, 1e5, 1000.0),  # at the target: unchanged, exactly
])
def test_adapted_beta_by_hand(factor, low, high, expected):
    assert adapted_beta(1000.0, factor, 0.3, DOUBLING, low, high) == pytest.approx(expected, rel=1e-12)


def test_adapted_beta_steps_are_relative_and_exact_at_the_fixed_point():
    # rate 0.05, g − target = 0.2: ×e^0.01 whatever β's scale
    assert adapted_beta(5000.0, 0.5, 0.3, 0.05, 1.0, 1e9) / 5000.0 == pytest.approx(math.exp(0.01), rel=1e-12)
    assert adapted_beta(100.0, 0.5, 0.3, 0.05, 1.0, 1e9) / 100.0 == pytest.approx(math.exp(0.01), rel=1e-12)
    assert adapted_beta(1234.5, 0.25, 0.25, 0.05, 1.0, 1e9) == 1234.5


def test_unknown_loss_type_lists_choices():
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo, robust"):
        preference_loss(torch.zeros(1), 1.0, "kto")


# ---- pair weights and soft labels ------------------------------------------------------------------------------------
WEIGHTED_POLICY = torch.tensor([0.0, 1.0, 0.5, 0.0])  # [w0, w1; l0, l1]
WEIGHTED_REF = torch.tensor([0.5, 0.0, 0.0, 1.0])


def test_pair_weights_and_soft_labels_by_hand():
    # inside = −½·β·[(pw − rw) − (pl − rl)] with β = 2: pair 0: −(−0.5 − 0.5) = 1; pair 1: −(1 + 1) = −2
    weight, pref = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.75])
    loss, _ = diffusion_dpo_loss(WEIGHTED_POLICY, WEIGHTED_REF, 2.0, pair_weight=weight, preference=pref)
    expected = (2.0 * -math.log(1 / (1 + math.exp(-1.0))) + 0.5 * -math.log(1 / (1 + math.exp(1.0)))) / 2
    assert loss.item() == pytest.approx(expected)
    plain, _ = diffusion_dpo_loss(WEIGHTED_POLICY, WEIGHTED_REF, 2.0)
    assert torch.equal(diffusion_dpo_loss(WEIGHTED_POLICY, WEIGHTED_REF, 2.0, pair_weight=torch.ones(2),
                                          preference=torch.ones(2))[0], plain)


def test_preference_one_half_gives_no_gradient():
    pol = WEIGHTED_POLICY.clone().requires_grad_(True)
    loss, _ = diffusion_dpo_loss(pol, WEIGHTED_REF, 2.0, preference=torch.tensor([0.5, 0.5]))
    assert loss.item() == pytest.approx(math.log(2))
    assert torch.equal(torch.autograd.grad(loss, pol)[0], torch.zeros(4))


# ---- winner-preserving safeguard (Diffusion-SDPO) --------------------------------------------------------------------
def test_error_output_gradient_matches_autograd():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 3, 2, 5, generator=g, requires_grad=True), torch.randn(4, 3, 2, 5, generator=g)
    for weights in (None, torch.rand(4, 2, 5, generator=g)):
        (grad,) = torch.autograd.grad(weighted_error(pred, target, weights).sum(), pred)
        torch.testing.assert_close(error_output_gradient(pred, target, weights), grad)


def test_sdpo_loser_scale_by_hand():
    # One value per sample (C = h = w = 1): g = 2·(pred − target).
    pred = torch.tensor([1.0, 1.0, 1.0, 3.0, -1.0, 0.5]).view(6, 1, 1, 1)  # winners 0..2, losers 3..5
    target = torch.zeros(6, 1, 1, 1)
    # pair 0: g_w = 2, g_l = 6, dot 12 > 0: λ = 0.9·4/12 = 0.3; pair 1: dot < 0: 1; pair 2: 0.9·4/2 > 1: 1
    scale = sdpo_loser_scale(pred, target, None, mu=0.1)
    torch.testing.assert_close(scale, torch.tensor([0.3, 1.0, 1.0]))


def test_safeguard_changes_gradients_only_and_off_is_bit_identical():
    pol, ref = torch.tensor([0.3, 0.2, 0.5, 0.1], requires_grad=True), torch.tensor([0.3, 0.2, 0.4, 0.3])
    plain, _ = diffusion_dpo_loss(pol, ref, 10.0)
    guarded, _ = diffusion_dpo_loss(scale_loser_gradient(pol, torch.tensor([0.5, 1.0])), ref, 10.0)
    assert torch.equal(plain, guarded)  # the forward loss is unchanged
    (g_plain,) = torch.autograd.grad(plain, pol)
    (g_guarded,) = torch.autograd.grad(guarded, pol)
    torch.testing.assert_close(g_guarded, g_plain * torch.tensor([1.0, 1.0, 0.5, 1.0]), rtol=0, atol=0)
    ones, _ = diffusion_dpo_loss(scale_loser_gradient(pol, torch.ones(2)), ref, 10.0)
    assert torch.equal(torch.autograd.grad(ones, pol)[0], g_plain)


def test_safeguard_keeps_the_winner_error_from_rising_after_an_sgd_step():
    # A shared parameter θ predicts both images (pred = θ + offset): the loser's gradient points along the
    # winner's and is larger, so plain DPO's step raises the winner's error.
    theta0 = torch.tensor([[[[0.0, 0.0]]]])
    offsets = torch.tensor([[[[0.0, 0.0]]], [[[0.0, 0.0]]]])
    target = torch.tensor([[[[-1.0, 0.0]]], [[[-3.0, 0.5]]]])  # [winner; loser]
    ref_err = weighted_error(theta0 + offsets, target).detach()

    def winner_error_after_step(mu):
        theta = theta0.clone().requires_grad_(True)
        pred = theta + offsets
        err = weighted_error(pred, target)
        if mu is not None:
            err = scale_loser_gradient(err, sdpo_loser_scale(pred, target, None, mu))
        loss, _ = diffusion_dpo_loss(err, ref_err, beta=1.0)
        loss.backward()
        with torch.no_grad():
            return weighted_error(theta - 1e-3 * theta.grad + offsets, target)[0].item()

    before = weighted_error(theta0 + offsets, target)[0].item()
    assert winner_error_after_step(None) > before  # the failure users report
    assert winner_error_after_step(0.1) < before  # first order: the winner's error falls (margin μ)
    assert winner_error_after_step(0.0) <= before + 1e-8


# ---- subject-wise preferences (preference_unit: subject) -------------------------------------------------------------
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


# ---- MOSAIC: SCA and MD against hand-computed values -----------------------------------------------------------------
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

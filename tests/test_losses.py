"""Hand-computed values for the pure loss functions."""

import math

import pytest
import torch
import torch.nn.functional as F

from focusdpo.losses import diffusion_dpo_loss, dpo_inside, preference_loss, weighted_error


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


def test_unknown_loss_type_lists_choices():
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo, robust"):
        preference_loss(torch.zeros(1), 1.0, "kto")

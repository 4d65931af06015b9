"""Focus-weighted Diffusion-DPO losses: pure tensor functions.

Batch convention: every per-sample tensor is stacked ``[winners; losers]`` on dim 0, so a batch of
``B`` pairs has ``N = 2B`` rows. Winner ``i`` and loser ``i`` share noise and timestep.

The loss follows the Diffusion-DPO paper (Wallace et al., 2023) and its reference code::

    e(x)   = Σ_q W_q · mean_c (pred_q − target_q)² / Σ_q W_q          (per-sample error)
    inside = −½·β·[(e_θ(w) − e_ref(w)) − (e_θ(l) − e_ref(l))]
    sigmoid: loss = −log σ(inside)

β is on the Diffusion-DPO scale (≈5000 for ε-prediction SD; flow models need their own, 100–2000).
With ``W ≡ 1`` the error is the plain per-sample MSE, i.e. vanilla Diffusion-DPO.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a ``[w; l]`` tensor of shape ``(2B, ...)`` into ``(w, l)``, each ``(B, ...)``."""
    if x.shape[0] % 2:
        raise ValueError(f"expected a [winners; losers] batch with an even first dim, got {tuple(x.shape)}")
    return x.chunk(2, dim=0)


def weighted_error(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample focus-weighted squared error.

    Args:
        pred, target: ``(N, C, h, w)``: prediction and regression target on the loss grid.
        weights: ``(N, h, w)`` non-negative focus weights, or ``None`` for uniform weights.

    Returns:
        ``(N,)`` float32: ``Σ_q W_q · mean_c (pred − target)²_q / Σ_q W_q``.
    """
    # fp32 before the β-scaled difference: bf16 errors lose the tiny policy/reference gaps.
    sq = (pred.float() - target.float()).pow(2).mean(dim=1)  # (N, h, w)
    if weights is None:
        return sq.flatten(1).mean(dim=1)
    if weights.shape != sq.shape:
        raise ValueError(f"focus weights {tuple(weights.shape)} do not match the loss grid {tuple(sq.shape)}")
    w = weights.float().flatten(1)
    return (w * sq.flatten(1)).sum(dim=1) / w.sum(dim=1).clamp_min(1e-12)


def dpo_inside(policy_err: torch.Tensor, ref_err: torch.Tensor, beta: float) -> torch.Tensor:
    """``inside = −½·β·[(e_θ(w) − e_ref(w)) − (e_θ(l) − e_ref(l))]``.

    Args:
        policy_err, ref_err: ``(2B,)`` per-sample errors, ``[w; l]``.

    Returns:
        ``(B,)`` the implicit reward margin (positive: the policy prefers the winner).
    """
    pol_w, pol_l = split_pairs(policy_err.float())
    ref_w, ref_l = split_pairs(ref_err.float())
    return -0.5 * beta * ((pol_w - ref_w) - (pol_l - ref_l))


def preference_loss(inside: torch.Tensor, beta: float, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair loss from ``inside`` (``(B,)`` → ``(B,)``); every variant shares the same ``inside``.

    - ``sigmoid``: ``−(1−ε)·log σ(inside) − ε·log σ(−inside)`` (ε = label_smoothing, cDPO; 0 = DPO).
    - ``hinge``: ``relu(1 − inside)`` (SLiC).
    - ``ipo``: ``(inside/β − 1/(2β))²``: IPO's squared loss on the unscaled log-ratio ``inside/β``.
    - ``robust``: ``(−(1−ε)·log σ(inside) + ε·log σ(−inside)) / (1 − 2ε)`` (rDPO, unbiased under
      label noise ε).
    """
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(inside) - eps * F.logsigmoid(-inside)
    if loss_type == "hinge":
        return torch.relu(1 - inside)
    if loss_type == "ipo":
        return (inside / beta - 1 / (2 * beta)).pow(2)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(inside) + eps * F.logsigmoid(-inside)) / (1 - 2 * eps)
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of: {', '.join(LOSS_TYPES)}")


def diffusion_dpo_loss(policy_err: torch.Tensor, ref_err: torch.Tensor, beta: float,
                       loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                       pair_weight: torch.Tensor | None = None, preference: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO loss and TRL-named metrics from per-sample errors.

    Args:
        policy_err, ref_err: ``(2B,)`` errors ``[w; l]`` from :func:`weighted_error`.
        pair_weight: ``(B,)`` optional per-pair loss weights (VideoDPO-style; ``None`` = all ones).
        preference: ``(B,)`` optional soft labels p in [0.5, 1] (SmPO-style): ``inside`` is scaled by
            ``2p − 1``, so p = 1 is a hard label and p = 0.5 gives no gradient.

    Returns:
        ``(loss, metrics)``: scalar mean loss; metrics are detached scalars named as TRL names them
        (``rewards/chosen`` is the implicit reward ``−½·β·(e_θ(w) − e_ref(w))``).
    """
    inside = dpo_inside(policy_err, ref_err, beta)
    if preference is not None:
        inside = inside * (2 * preference.to(inside) - 1)
    per_pair = preference_loss(inside, beta, loss_type, label_smoothing)
    if pair_weight is not None:
        per_pair = per_pair * pair_weight.to(per_pair)
    loss = per_pair.mean()
    pol_w, pol_l = split_pairs(policy_err.detach().float())
    ref_w, ref_l = split_pairs(ref_err.detach().float())
    chosen, rejected = -0.5 * beta * (pol_w - ref_w), -0.5 * beta * (pol_l - ref_l)
    metrics = {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "mse/policy_w": pol_w.mean(), "mse/policy_l": pol_l.mean(),
        "mse/ref_w": ref_w.mean(), "mse/ref_l": ref_l.mean(),
        "mse/winner_drift": (pol_w - ref_w).mean(),
    }
    return loss, metrics


# ---- winner-preserving safeguard (Diffusion-SDPO, arXiv 2511.03317) ------------------------------------------
def error_output_gradient(pred: torch.Tensor, target: torch.Tensor,
                          weights: torch.Tensor | None = None) -> torch.Tensor:
    """``∂e/∂pred`` of :func:`weighted_error`, analytically (no backward through the model).

    Args:
        pred, target: ``(N, C, h, w)``; weights: ``(N, h, w)`` or ``None``.

    Returns:
        ``(N, C, h, w)`` float32: ``2·(pred − target)·W_q / (C·Σ_q W_q)``.
    """
    diff = pred.detach().float() - target.float()
    if weights is None:
        return diff * (2.0 / diff[0].numel())  # mean over C·h·w
    w = weights.float()
    return diff * (2 * w / (diff.shape[1] * w.flatten(1).sum(1).clamp_min(1e-12).view(-1, 1, 1)))[:, None]


def sdpo_loser_scale(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None,
                     mu: float) -> torch.Tensor:
    """Per-pair λ that keeps the winner's error from rising (first order, in output space).

    ``λ = clamp((1 − μ)·‖g_w‖² / ⟨g_l, g_w⟩, 0, 1)`` where ``⟨g_l, g_w⟩ > 0``, else 1; ``g_w``, ``g_l`` are the
    output-space gradients of the winner's and loser's errors.

    Args:
        pred, target: ``(2B, C, h, w)`` ``[w; l]``; weights: ``(2B, h, w)`` or ``None``; mu: μ in [0, 1).

    Returns:
        ``(B,)`` float32, detached.
    """
    g_w, g_l = split_pairs(error_output_gradient(pred, target, weights).flatten(1))
    dot = (g_w * g_l).sum(1)
    ratio = (1 - mu) * g_w.pow(2).sum(1) / torch.where(dot > 0, dot, torch.ones_like(dot))
    return torch.where(dot > 0, ratio.clamp(0, 1), torch.ones_like(dot))


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` in backward."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad * scale, None


def scale_loser_gradient(policy_err: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(2B,)`` errors ``[w; l]`` with the same values and the losers' gradients multiplied by ``scale`` ``(B,)``."""
    pol_w, pol_l = split_pairs(policy_err)
    return torch.cat([pol_w, _ScaleGradient.apply(pol_l, scale.detach().to(pol_l))])

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

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a ``[w; l]`` tensor of shape ``(2B, ...)`` into ``(w, l)``, each ``(B, ...)``."""
    if x.shape[0] % 2:
        raise ValueError(f"expected a [winners; losers] batch with an even first dim, got {tuple(x.shape)}")
    return x.chunk(2, dim=0)


def masked_mean(values: torch.Tensor, present: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """Mean of ``values`` where ``present`` over ``dim``; 0 where nothing is present (not NaN)."""
    keep = present.float()
    return (values * keep).sum(dim) / keep.sum(dim).clamp_min(1)


def patch_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(N, C, h, w)`` prediction and target → ``(N, h, w)`` float32 squared error, mean over channels."""
    # fp32 before the β-scaled difference: bf16 errors lose the tiny policy/reference gaps.
    return (pred.float() - target.float()).pow(2).mean(dim=1)


def weighted_error(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample focus-weighted squared error.

    Args:
        pred, target: ``(N, C, h, w)``: prediction and regression target on the loss grid.
        weights: ``(N, h, w)`` non-negative focus weights, or ``None`` for uniform weights.

    Returns:
        ``(N,)`` float32: ``Σ_q W_q · mean_c (pred − target)²_q / Σ_q W_q``.
    """
    sq = patch_error(pred, target)
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
        # DPO health: the share of pairs the policy currently gets the wrong way round, and σ(−inside), the factor
        # the sigmoid loss scales each pair's gradient by (0.5 at step 0; near 1 when the preference is lost)
        "dpo/negative_margin_share": (inside.detach() < 0).float().mean(),
        "dpo/gradient_factor": torch.sigmoid(-inside.detach()).mean(),
    }
    return loss, metrics


# ---- automatic β (beta_target_gradient_factor) ------------------------------------------------------------------
def adapted_beta(beta: float, gradient_factor: float, target: float, rate: float, low: float, high: float) -> float:
    """One step of the automatic β: ``log β ← clamp(log β + rate·(g − target), log low, log high)``.

    g is a step's mean sigmoid gradient factor σ(−inside) (``dpo/gradient_factor``): 0.5 for a pair with zero margin,
    near 0 for a pair far on the right side. A small g means the pairs are saturated: |inside| is large, each pair's
    gradient vanishes, and the loss can keep falling by blowing up the winner's and the loser's errors together (the
    collapse reported on FLUX.2 [klein]); a smaller β shrinks |inside| and gives the pairs their gradient back. A g
    near 0.5 means the pairs are not separated yet, and a larger β sharpens them. g = target is the fixed point. The
    step is taken on log β, a relative change, because β's scale differs by orders of magnitude between families.

    Args:
        beta: the current β (> 0, Diffusion-DPO scale). gradient_factor: g in (0, 1), dimensionless.
        target: the g to hold, in (0, 0.5). rate: change of log β per unit of (g − target), per update.
        low, high: the clamp of β, 0 < low ≤ high.

    Returns:
        The next β, a Python float in [low, high] (exactly ``beta`` when g = target).
    """
    return min(max(beta * math.exp(rate * (gradient_factor - target)), low), high)


# ---- subject-wise preferences (DESIGN.md, "Subject-wise preferences") -------------------------------------------
def subject_errors(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-subject focus-weighted errors ``e_k(y) = Σ_q M_k(q)·W(q)·err(q) / Σ_q W(q)``.

    Normalised by the whole image's weight, so masks that partition the image add up to :func:`weighted_error` and
    β keeps its meaning.

    Args:
        pred, target: ``(N, C, h, w)``; masks: ``(N, K, h, w)`` soft subject masks in [0, 1] (each image its own:
            subjects move between samples); weights: ``(N, h, w)`` focus weights or ``None`` (uniform).

    Returns:
        ``(N, K)`` float32.
    """
    sq = patch_error(pred, target).flatten(1)
    w = torch.ones_like(sq) if weights is None else weights.float().flatten(1)
    if masks.shape[0] != sq.shape[0] or masks.shape[-2:] != pred.shape[-2:]:
        raise ValueError(f"subject masks {tuple(masks.shape)} do not match the loss grid {tuple(pred.shape)}")
    return (masks.float().flatten(2) * (w * sq)[:, None]).sum(-1) / w.sum(1, keepdim=True).clamp_min(1e-12)


def subject_labels(scores: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """``d_k``: +1 where subject k is better in the chosen image, −1 where it is better in the rejected one, 0 where
    the scores differ by at most ``margin`` or are missing (NaN: padding for pairs with fewer subjects).

    Args:
        scores: ``(B, 2, K)`` per-subject scores, ``[chosen, rejected]``.

    Returns:
        ``(B, K)`` float32 in {−1, 0, +1}.
    """
    diff = (scores[:, 0] - scores[:, 1]).float()
    keep = torch.isfinite(diff) & (diff.abs() > margin)
    return torch.where(keep, torch.sign(diff), torch.zeros_like(diff))


def subject_dpo_loss(policy_err: torch.Tensor, ref_err: torch.Tensor, labels: torch.Tensor, beta: float,
                     loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                     image_inside: torch.Tensor | None = None, image_weight: float = 0.0,
                     pair_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``loss = mean_k ℓ(−½·β·d_k·Δ_k) + ω·ℓ(inside_image)`` per pair, then the mean over pairs.

    ``Δ_k = [e_k^θ(w) − e_k^ref(w)] − [e_k^θ(l) − e_k^ref(l)]``; the mean runs over the pair's labelled subjects
    (``d_k ≠ 0``; a pair with none keeps only the whole-image term). With one subject, a full mask, ``d = +1`` and
    ω = 0 this is :func:`diffusion_dpo_loss`.

    Args:
        policy_err, ref_err: ``(2B, K)`` from :func:`subject_errors`, ``[w; l]``.
        labels: ``(B, K)`` from :func:`subject_labels`.
        image_inside: ``(B,)`` the whole-image ``inside`` (:func:`dpo_inside`), needed when ``image_weight > 0``.

    Returns:
        ``(loss, metrics)``: ``subject/accuracy`` and ``subject/margin`` over labelled subjects, ``subject/labelled``
        (their share), ``subject/label_disagrees`` (the share of labelled subjects whose label is the image label's
        opposite: the rejected image holds the better subject).
    """
    pol_w, pol_l = split_pairs(policy_err.float())
    ref_w, ref_l = split_pairs(ref_err.float())
    inside = -0.5 * beta * labels * ((pol_w - ref_w) - (pol_l - ref_l))
    labelled = labels != 0
    per_pair = masked_mean(preference_loss(inside, beta, loss_type, label_smoothing), labelled, dim=1)
    if image_weight > 0:
        per_pair = per_pair + image_weight * preference_loss(image_inside, beta, loss_type, label_smoothing)
    if pair_weight is not None:
        per_pair = per_pair * pair_weight.to(per_pair)
    inside = inside.detach()
    metrics = {"subject/accuracy": masked_mean((inside > 0).float(), labelled, (0, 1)),
               "subject/margin": masked_mean(inside, labelled, (0, 1)),
               "subject/labelled": labelled.float().mean(),
               "subject/label_disagrees": masked_mean((labels < 0).float(), labelled, (0, 1))}
    return per_pair.mean(), metrics


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


# ---- MOSAIC auxiliary losses on reference→target attention (arXiv 2509.01977) ----------------------------------
# Shapes: S samples, R captured reference query rows, L target tokens, P correspondence points, K references.
MD_DIVERGENCES = ("jsd", "sym_kl")

ATTENTION_EPS = 1e-8  # floor for log-probabilities: a softmax underflows to 0 in far corners of a large grid


def per_reference_mean(values: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor, num_references: int):
    """Mean of ``values`` ``(S, P)`` per (sample, reference): ``(S, K)`` means and ``(S, K)`` counts."""
    keep = valid.float()
    sums = values.new_zeros(values.shape[0], num_references).scatter_add(1, reference, values * keep)
    counts = keep.new_zeros(values.shape[0], num_references).scatter_add(1, reference, keep)
    return sums / counts.clamp_min(1), counts


def sca_loss(attention: torch.Tensor, point_rows: torch.Tensor, point_targets: torch.Tensor,
             point_refs: torch.Tensor, valid: torch.Tensor, num_references: int) -> torch.Tensor:
    """Semantic-correspondence attention loss (MOSAIC Eq. 10).

    Args:
        attention: ``(S, R, L)`` averaged reference→target attention (rows sum to 1 over L).
        point_rows: ``(S, P)`` long, the row of ``attention`` holding point p's reference token.
        point_targets: ``(S, P)`` long, the matched target token of point p.
        point_refs: ``(S, P)`` long, the reference k ∈ [0, K) of point p.
        valid: ``(S, P)`` bool; padded points are False.

    Returns:
        Scalar: per sample, the mean over references (with points) of the mean ``−log A[row_p, target_p]`` over
        their points; then the mean over samples with points (0 if none has any).
    """
    rows = attention.gather(1, point_rows[..., None].expand(-1, -1, attention.shape[-1]))  # (S, P, L)
    picked = rows.gather(2, point_targets[..., None])[..., 0]
    nll = -picked.clamp_min(ATTENTION_EPS).log()
    per_ref, counts = per_reference_mean(nll, point_refs, valid, num_references)
    per_sample = masked_mean(per_ref, counts > 0, dim=1)
    return masked_mean(per_sample, (counts > 0).any(1), dim=0)


def pairwise_divergence(p: torch.Tensor, divergence: str = "jsd") -> torch.Tensor:
    """``(S, K, L)`` distributions → ``(S, K, K)`` divergences: ``jsd`` (Jensen–Shannon, MOSAIC's code) or
    ``sym_kl`` (``KL(p_i‖p_j) + KL(p_j‖p_i)``, the paper)."""
    log_p = p.clamp_min(ATTENTION_EPS).log()
    pi, pj, log_pi, log_pj = p[:, :, None], p[:, None], log_p[:, :, None], log_p[:, None]
    if divergence == "jsd":
        log_m = ((pi + pj) / 2).clamp_min(ATTENTION_EPS).log()
        return 0.5 * ((pi * (log_pi - log_m)).sum(-1) + (pj * (log_pj - log_m)).sum(-1))
    if divergence == "sym_kl":
        return ((pi - pj) * (log_pi - log_pj)).sum(-1)
    raise ValueError(f"unknown md_divergence {divergence!r}; choose one of: {', '.join(MD_DIVERGENCES)}")


def md_loss(attention: torch.Tensor, row_refs: torch.Tensor, row_valid: torch.Tensor, num_references: int,
            divergence: str = "jsd") -> torch.Tensor:
    """Multi-reference disentanglement loss (MOSAIC Eqs. 11–14).

    Args:
        attention: ``(S, R, L)`` averaged reference→target attention.
        row_refs: ``(S, R)`` long, the reference each row belongs to; row_valid: ``(S, R)`` bool.

    Returns:
        Scalar: per sample, reference k's attention distribution ``p_k`` is the mean of its valid rows; the loss is
        minus the mean divergence over pairs ``i < j`` of references present, averaged over samples with at least
        two references. Exactly 0 when no sample has two.
    """
    keep = row_valid.float()[..., None]
    index = row_refs[..., None].expand(-1, -1, attention.shape[-1])
    sums = attention.new_zeros(attention.shape[0], num_references, attention.shape[-1])
    sums = sums.scatter_add(1, index, attention * keep)
    counts = keep[..., 0].new_zeros(attention.shape[0], num_references).scatter_add(1, row_refs, keep[..., 0])
    dist = sums / counts.clamp_min(1)[..., None]
    present = counts > 0
    upper = torch.ones(num_references, num_references, dtype=torch.bool, device=attention.device).triu(1)
    pairs = present[:, :, None] & present[:, None] & upper  # (S, K, K)
    div = pairwise_divergence(dist, divergence).flatten(1)
    per_sample = masked_mean(div, pairs.flatten(1), dim=1)
    return -masked_mean(per_sample, pairs.flatten(1).any(1), dim=0)

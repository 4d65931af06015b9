"""Focus weights W(q, u) of focus-weighted Diffusion-DPO (docs/design.md, "Focus weights").

Everything that does not depend on the timestep is computed once per pair by
:func:`static_focus_maps`, as two channels on the loss (latent) grid, for both targets stacked
``[winners; losers]``:

* channel 0, structure: ``conf · Δ``
* channel 1, detail:    ``conf · α_a · D · S`` (α scales the detail term only: a flat reference has little
  detail to learn, but a swapped flat subject is exactly the structure error to catch)

Each training step then only runs :func:`focus_weights`:
``W = 1 + λ_s·g(u)·structure + λ_d·(1 − g(u))·detail``, rescaled to mean 1 per image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from focusdpo.config.focus import FocusConfig
from focusdpo.features.correspondence import assign_subjects, confidence, masks_to_grid, similarity_maps

GRAY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)``, radius 3σ; σ = 0 is a no-op.

    Edges are replicated (reflect padding fails on images smaller than the kernel).
    """
    if sigma <= 0:
        return images
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).repeat(images.shape[1], 1, 1, 1)  # (C, 1, 1, k), depthwise
    pad = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(pad, kernel, groups=images.shape[1])
    return F.conv2d(out, kernel.transpose(-1, -2), groups=images.shape[1])


def complexity_map(images: torch.Tensor, grid: tuple[int, int], bins: int = 32, sigma: float = 1.0) -> torch.Tensor:
    """Information density D(q): local Shannon entropy per cell of the ``(h, w)`` grid.

    Args:
        images: ``(B, 3, H, W)`` float in [0, 1]; ``H >= h`` and ``W >= w``.
        grid: ``(h, w)``; cell ``(i, j)`` holds the pixels with ``y·h // H == i`` and ``x·w // W == j``.

    Returns:
        ``(B, h, w)`` float32 in [0, 1]: entropy of the ``bins``-bin grey-level histogram of the
        blurred image in each cell, divided by ``log(bins)``.
    """
    B, _, H, W = images.shape
    h, w = grid
    if H < h or W < w:
        raise ValueError(f"image of {H}x{W} px has fewer pixels than the {h}x{w} grid has cells")
    gray = (images.float() * images.new_tensor(GRAY, dtype=torch.float32).view(1, 3, 1, 1)).sum(1, keepdim=True)
    # The blur removes pixel noise (JPEG, sensor) so that entropy reflects texture, not grain.
    level = (gaussian_blur(gray, sigma)[:, 0] * bins).long().clamp(0, bins - 1)  # (B, H, W)
    rows = torch.arange(H, device=images.device) * h // H
    cols = torch.arange(W, device=images.device) * w // W
    cell = rows[:, None] * w + cols[None, :]  # (H, W) index of each pixel's cell
    index = (cell * bins + level).flatten(1)
    ones = torch.ones_like(index, dtype=torch.float32)
    counts = torch.zeros(B, h * w * bins, device=images.device).scatter_add_(1, index, ones)
    p = counts.view(B, h * w, bins)
    p = p / p.sum(-1, keepdim=True)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)  # 0·log 0 = 0
    return (entropy / math.log(bins)).clamp(0, 1).view(B, h, w)


def reference_complexity(ref_images: torch.Tensor, ref_masks: torch.Tensor | None, bins: int = 32,
                         sigma: float = 1.0, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-reference complexity α_k: mean entropy over the reference's foreground, mean 1 over K.

    Args:
        ref_images: ``(B, K, 3, H, W)`` in [0, 1].
        ref_masks: ``(B, K, hm, wm)`` masks of any resolution (pooled to the entropy grid), or ``None``.
        grid: entropy cells; default the mask's grid, else 14-px cells (the DINOv2 patch).

    Returns:
        ``(B, K)``; all ones when every reference is flat (nothing to tell them apart).
    """
    B, K, _, H, W = ref_images.shape
    if grid is None:
        grid = tuple(ref_masks.shape[-2:]) if ref_masks is not None else (max(1, H // 14), max(1, W // 14))
    ent = complexity_map(ref_images.flatten(0, 1), grid, bins, sigma).view(B, K, *grid)
    fg = torch.ones_like(ent) if ref_masks is None else masks_to_grid(ref_masks, grid).float()
    mean = (ent * fg).flatten(2).sum(-1) / fg.flatten(2).sum(-1).clamp_min(1)
    norm = mean.mean(dim=1, keepdim=True)
    return torch.where(norm > 0, mean / norm.clamp_min(1e-12), torch.ones_like(mean))


def subject_map(sims: torch.Tensor, threshold: float, temperature: float) -> torch.Tensor:
    """Soft subject-ness S(q) = sigmoid((max_k s_k − threshold) / temperature): ``(B, K, h, w)`` -> ``(B, h, w)``."""
    return torch.sigmoid((sims.amax(dim=1) - threshold) / temperature)


def subject_masks(sims: torch.Tensor, subject: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft subject masks ``M_k(q) = S(q)·softmax_k(s_k(q) / temperature)``: ``(B, K, h, w)`` scores and ``(B, h, w)``
    subject-ness -> ``(B, K, h, w)``, summing over k to S(q) (the background keeps 1 − S)."""
    return subject[:, None] * torch.softmax(sims / temperature, dim=1)


def misalignment_map(sims_w: torch.Tensor, sims_l: torch.Tensor, assignment: torch.Tensor,
                     prior_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Δ(q) = max(prior, relu(s^w_a − s^l_a)) for spatially aligned pairs.

    Args:
        sims_w, sims_l: ``(B, K, h, w)`` scores of winner and loser; assignment: ``(B, h, w)`` long.
        prior_mask: ``(B, h, w)`` in [0, 1] (e.g. the disrupted region), or ``None``.

    Returns:
        ``(B, h, w)``: where the loser matches its assigned reference worse than the winner does.
    """
    a = assignment[:, None]
    delta = (sims_w.gather(1, a) - sims_l.gather(1, a))[:, 0].relu()
    return delta if prior_mask is None else torch.maximum(prior_mask.to(delta.dtype), delta)


def _resize(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(N, h, w)`` -> ``(N, *grid)``: area when shrinking (averages), bilinear when growing (smooth)."""
    if tuple(maps.shape[-2:]) == tuple(grid):
        return maps
    shrink = grid[0] <= maps.shape[-2] and grid[1] <= maps.shape[-1]
    mode = dict(mode="area") if shrink else dict(mode="bilinear", align_corners=False)
    return F.interpolate(maps[:, None].float(), size=tuple(grid), **mode)[:, 0]


def area_resize(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(N, H, W)`` -> ``(N, *grid)`` by area: each cell is the mean of the pixels it covers."""
    return F.adaptive_avg_pool2d(maps[:, None].float(), tuple(grid))[:, 0]


def _alignment(aligned, prior_mask, batch: int, mode: str, device) -> torch.Tensor:
    """``(B,)`` bool: which pairs use the misalignment map. 'auto' adds pairs with a non-empty prior."""
    if mode != "auto":
        return torch.full((batch,), mode == "aligned", device=device)
    flags = torch.as_tensor(aligned, device=device).bool().expand(batch)
    if prior_mask is not None:
        flags = flags | (prior_mask.flatten(1) > 0).any(1)
    return flags


def focus_parts(feats_w, feats_l, ref_feats, ref_masks, images_w, images_l, ref_images, grid,
                cfg: FocusConfig, prior_mask=None, aligned: bool | torch.Tensor = False) -> dict[str, torch.Tensor]:
    """All static maps of a batch of pairs, on the loss grid, for inspection and PNG panels.

    Args:
        feats_w, feats_l: ``(B, C, hd, wd)`` DINOv2 features of winners and losers.
        ref_feats: ``(B, K, C, hr, wr)``; ref_masks: ``(B, K, hr, wr)`` bool or ``None``.
        images_w, images_l: ``(B, 3, H, W)`` in [0, 1]; ref_images: ``(B, K, 3, Hr, Wr)``.
        grid: the loss grid ``(h, w)`` (latent positions, after any patchify).
        prior_mask: ``(B, hp, wp)`` in [0, 1] of any resolution, or ``None``.
        aligned: bool or ``(B,)`` bool: spatially aligned pairs (see ``cfg.pair_alignment``).

    Returns:
        dict of ``[w; l]``-stacked tensors: ``static`` ``(2B, 2, h, w)``; ``assignment`` (long,
        nearest), ``confidence``, ``subject``, ``complexity``, ``delta`` each ``(2B, h, w)``; ``masks``
        ``(2B, K, h, w)`` (:func:`subject_masks`).
    """
    B = feats_w.shape[0]
    sims = torch.cat([similarity_maps(f, ref_feats, ref_masks, cfg.top_n) for f in (feats_w, feats_l)])
    assign = assign_subjects(sims)  # (2B, hd, wd)
    conf = (confidence(sims, cfg.confidence_scale) if cfg.confidence_source == "correspondence"
            else torch.ones_like(sims[:, 0]))  # reference_error gates per step (focus_weights); none: no gate
    subject = subject_map(sims, cfg.subject_threshold, cfg.subject_temperature)
    alpha = torch.ones(B, ref_feats.shape[1], device=sims.device)
    if cfg.reference_complexity:
        alpha = reference_complexity(ref_images, ref_masks, cfg.entropy_bins, cfg.entropy_sigma,
                                     grid=tuple(ref_feats.shape[-2:]))
    alpha_a = alpha.repeat(2, 1).gather(1, assign.flatten(1)).view_as(conf)
    # Aligned pairs share one Δ (where the loser fails the winner's reference); others use S.
    gap = misalignment_map(sims[:B], sims[B:], assign[:B]).repeat(2, 1, 1)
    is_aligned = _alignment(aligned, prior_mask, B, cfg.pair_alignment, sims.device).repeat(2)[:, None, None]
    # Products on the DINO grid, one resize each: resizing factors separately would blur edges twice. The prior
    # goes straight to the loss grid by area (through the coarser DINO grid a one-cell prior would smear away);
    # conf·max(prior, gap) = max(conf·prior, conf·gap) as conf >= 0.
    structure = _resize(conf * torch.where(is_aligned, gap, subject), grid)
    delta = _resize(torch.where(is_aligned, gap, subject), grid)
    if prior_mask is not None:
        prior = area_resize(prior_mask.float(), grid).repeat(2, 1, 1) * is_aligned
        structure = torch.maximum(structure, _resize(conf, grid) * prior)
        delta = torch.maximum(delta, prior)
    complexity = complexity_map(torch.cat([images_w, images_l]), grid, cfg.entropy_bins, cfg.entropy_sigma)
    static = torch.stack([structure, _resize(conf * alpha_a * subject, grid) * complexity], dim=1)
    nearest = F.interpolate(assign[:, None].float(), size=tuple(grid), mode="nearest")[:, 0].long()
    masks = _resize(subject_masks(sims, subject, cfg.mask_temperature).flatten(0, 1), grid).unflatten(0, sims.shape[:2])
    return dict(static=static, assignment=nearest, confidence=_resize(conf, grid), subject=_resize(subject, grid),
                complexity=complexity, delta=delta, masks=masks)


def static_focus_maps(feats_w, feats_l, ref_feats, ref_masks, images_w, images_l, ref_images, grid,
                      cfg: FocusConfig, prior_mask=None, aligned: bool | torch.Tensor = False) -> torch.Tensor:
    """The timestep-free focus maps ``(2B, 2, h, w)``, ``[w; l]``: channel 0 ``conf·Δ``
    (structure), channel 1 ``conf·α_a·D·S`` (detail). Arguments as in :func:`focus_parts`."""
    return focus_parts(feats_w, feats_l, ref_feats, ref_masks, images_w, images_l, ref_images, grid,
                       cfg, prior_mask, aligned)["static"]


def reference_free_parts(winners, losers, grid, cfg: FocusConfig) -> dict[str, torch.Tensor]:
    """:func:`focus_parts` for pairs without references (e.g. Pick-a-Pic): nothing to match, so S = conf =
    α_a = 1 everywhere and Δ = 0: structure is 0 and detail is the complexity map D alone.

    Returns the :func:`focus_parts` dict for ``winners``, ``losers`` ``(B, 3, H, W)`` in [0, 1].
    """
    complexity = complexity_map(torch.cat([winners, losers]), grid, cfg.entropy_bins, cfg.entropy_sigma)
    zeros, ones = torch.zeros_like(complexity), torch.ones_like(complexity)
    return dict(static=torch.stack([zeros, complexity], dim=1), assignment=zeros.long(), confidence=ones,
                subject=ones, complexity=complexity, delta=zeros)


def schedule(u, center: float, width: float) -> torch.Tensor:
    """g(u) = sigmoid((u − center) / width); u in [0, 1] is the noise level (1 = pure noise)."""
    return torch.sigmoid((torch.as_tensor(u, dtype=torch.float32) - center) / width)


def error_confidence(ref_error: torch.Tensor) -> torch.Tensor:
    """Confidence from the reference model's own per-patch error (``confidence_source: reference_error``).

    Args:
        ref_error: ``(N, h, w)`` the reference prediction's squared error per patch (channel mean).

    Returns:
        ``(N, h, w)`` float32 in (0, 1]: ``exp(−e(q) / ē)``, ē the image's mean error: a patch the reference
        predicts perfectly counts as certain (1), one at the mean error as 1/e.
    """
    error = ref_error.float()
    return torch.exp(-error / error.mean(dim=(1, 2), keepdim=True).clamp_min(1e-12))


def focus_weights(static: torch.Tensor, u, lambda_structure: float, lambda_detail: float,
                  center: float = 0.5, width: float = 0.1, gate: torch.Tensor | None = None) -> torch.Tensor:
    """Per-step focus weights.

    Args:
        static: ``(N, 2, h, w)`` maps from :func:`static_focus_maps`.
        u: ``(N,)`` or scalar noise level in [0, 1] (1 = pure noise).
        gate: optional ``(N, h, w)`` per-step confidence in [0, 1] multiplying both focus terms
            (:func:`error_confidence`); None keeps the confidence already in the static maps only.

    Returns:
        ``(N, h, w)`` float32 ``W = 1 + gate·(λ_s·g(u)·structure + λ_d·(1 − g(u))·detail)`` divided by its
        per-image mean (so β keeps its meaning). λ_s = λ_d = 0 gives exactly ones (vanilla DPO).
    """
    if lambda_structure == 0 and lambda_detail == 0:
        # Bit-exact ones even if a cached map holds NaN: the loss must equal vanilla Diffusion-DPO.
        return torch.ones(static.shape[0], *static.shape[2:], device=static.device)
    g = schedule(u, center, width).to(static.device).reshape(-1, 1, 1)
    focus = lambda_structure * g * static[:, 0].float() + lambda_detail * (1 - g) * static[:, 1].float()
    weights = 1 + (focus if gate is None else gate.to(focus) * focus)
    return weights / weights.mean(dim=(1, 2), keepdim=True)


def check_cached_grid(static: torch.Tensor, grid: tuple[int, int]) -> None:
    """Fail early when cached static maps ``(N, 2, h, w)`` do not sit on the backbone's loss grid."""
    if static.ndim != 4 or static.shape[1] != 2:
        raise ValueError(f"cached focus maps must be (N, 2, h, w), got {tuple(static.shape)}: "
                         "re-run `focusdpo focus` to rebuild the cache")
    if tuple(static.shape[-2:]) != tuple(grid):
        raise ValueError(f"cached focus maps are on a {static.shape[-2]}x{static.shape[-1]} grid but this backbone's "
                         f"loss grid at this resolution is {grid[0]}x{grid[1]}: re-run `focusdpo focus` with the "
                         "training resolution and model family (or drop the cached maps)")

"""Target <-> reference patch correspondence on L2-normalised patch features (DINOv2 or an ImageNet CNN).

Pure tensor functions.

Dot products of unit vectors are cosine similarities. Shapes: ``B`` pairs, ``K`` references,
``C`` feature channels, ``(h, w)`` the target patch grid, ``(hr, wr)`` the reference patch grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masks_to_grid(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Pool pixel masks ``(..., H, W)`` to a boolean ``(..., h, w)`` patch grid.

    A patch is foreground when at least half of it is covered; a mask that would vanish that way
    (a subject smaller than half a patch) keeps every patch it touches instead.
    """
    lead = masks.shape[:-2]
    frac = F.adaptive_avg_pool2d(masks.float().reshape(-1, 1, *masks.shape[-2:]), grid).reshape(*lead, *grid)
    half = frac >= 0.5
    vanished = ~half.flatten(-2).any(-1)[..., None, None]
    return torch.where(vanished, frac > 0, half)


def _check_masks(ref_masks: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    expected = (*refs.shape[:2], *refs.shape[-2:])
    if tuple(ref_masks.shape) != expected:
        raise ValueError(f"reference masks must be (B, K, hr, wr) = {expected} on the references' patch grid, "
                         f"got {tuple(ref_masks.shape)} (pool pixel masks with masks_to_grid)")
    masks = ref_masks.bool()
    empty = (~masks.flatten(2).any(-1)).nonzero().tolist()
    if empty:
        raise ValueError(f"reference mask (pair, reference) {empty} is empty: the subject lies outside the image "
                         "or the mask is blank; give a mask with foreground or no mask")
    return masks


def similarity_maps(target: torch.Tensor, refs: torch.Tensor, ref_masks: torch.Tensor | None = None,
                    top_n: int = 4) -> torch.Tensor:
    """Per-reference correspondence score of every target patch.

    Args:
        target: ``(B, C, h, w)`` unit-norm features of the target image.
        refs: ``(B, K, C, hr, wr)`` unit-norm features of the references.
        ref_masks: ``(B, K, hr, wr)`` bool subject masks, or ``None`` (all patches count).
        top_n: similarities averaged per target patch; a mask with fewer patches uses them all.

    Returns:
        ``(B, K, h, w)``: ``s_k(q)`` = mean of the top-n cosines between target patch q and the
        masked patches of reference k.
    """
    B, K, _, hr, wr = refs.shape
    h, w = target.shape[-2:]
    masks = torch.ones(B, K, hr, wr, dtype=torch.bool, device=refs.device) if ref_masks is None \
        else _check_masks(ref_masks, refs)
    sims = torch.einsum("bcq,bkcr->bkqr", target.flatten(2), refs.flatten(3))  # (B, K, h*w, hr*wr)
    sims = sims.masked_fill(~masks.flatten(2)[:, :, None, :], float("-inf"))
    n = min(top_n, hr * wr)
    top = sims.topk(n, dim=-1).values  # (B, K, h*w, n), -inf past the mask's patch count
    count = masks.flatten(2).sum(-1).clamp(max=n)  # (B, K): patches really averaged
    valid = torch.arange(n, device=refs.device) < count[..., None, None]
    score = torch.where(valid, top, 0.0).sum(-1) / count[..., None]
    return score.view(B, K, h, w)


def assign_subjects(sims: torch.Tensor) -> torch.Tensor:
    """``(B, K, h, w)`` scores -> ``(B, h, w)`` long index of the best-matching reference."""
    return sims.argmax(dim=1)


def confidence(sims: torch.Tensor, scale: float) -> torch.Tensor:
    """How sure the assignment is, ``(B, K, h, w)`` -> ``(B, h, w)`` in [0, 1].

    K >= 2: the best-vs-second margin, full confidence at ``scale``. K = 1: there is no rival,
    so the best similarity itself says how subject-like the patch is.
    """
    if sims.shape[1] == 1:
        return sims[:, 0].clamp(0, 1)
    top2 = sims.topk(2, dim=1).values
    return ((top2[:, 0] - top2[:, 1]) / scale).clamp(0, 1)


def _mutual(target: torch.Tensor, ref: torch.Tensor, ref_mask, target_mask):
    """Mutual nearest neighbours: ``(M, 2)`` (ref_index, target_index) and their ``(M,)`` cosines."""
    sim = ref.flatten(1).T @ target.flatten(1)  # (R, T)
    if ref_mask is not None:
        sim = sim.masked_fill(~ref_mask.flatten().bool()[:, None], float("-inf"))
    if target_mask is not None:
        sim = sim.masked_fill(~target_mask.flatten().bool()[None, :], float("-inf"))
    best_t = sim.argmax(dim=1)  # (R,) nearest target of each ref patch
    best_r = sim.argmax(dim=0)  # (T,) nearest ref patch of each target
    r = torch.arange(sim.shape[0], device=sim.device)
    keep = (best_r[best_t] == r) & torch.isfinite(sim[r, best_t])
    pairs = torch.stack([r[keep], best_t[keep]], dim=1)
    return pairs, sim[pairs[:, 0], pairs[:, 1]]


def mutual_matches(target: torch.Tensor, ref: torch.Tensor, ref_mask: torch.Tensor | None = None,
                   target_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mutual nearest-neighbour patch pairs between one reference and one target.

    Args:
        target: ``(C, h, w)`` unit-norm features; ``ref``: ``(C, hr, wr)``.
        ref_mask: ``(hr, wr)`` bool, ``target_mask``: ``(h, w)`` bool; patches outside never match.

    Returns:
        ``(M, 2)`` long rows ``(ref_index, target_index)`` of flattened row-major indices, sorted
        by ref index.
    """
    return _mutual(target, ref, ref_mask, target_mask)[0]


def multi_reference_matches(target: torch.Tensor, refs: torch.Tensor, ref_masks: torch.Tensor | None = None,
                            target_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Mutual matches for ``K`` references where each target patch goes to at most one reference.

    Args:
        target: ``(C, h, w)``; refs: ``(K, C, hr, wr)``; ref_masks: ``(K, hr, wr)`` bool or ``None``;
        target_mask: ``(h, w)`` bool or ``None``.

    Returns:
        K tensors ``(M_k, 2)`` of ``(ref_index, target_index)``. A target patch matched by several
        references stays with the most similar one (the lower k on a tie): MOSAIC's SCA loss needs
        one owner per target token.
    """
    found = [_mutual(target, refs[k], None if ref_masks is None else ref_masks[k], target_mask)
             for k in range(refs.shape[0])]
    claims = torch.full((refs.shape[0], target[0].numel()), float("-inf"), device=target.device)
    for k, (pairs, sims) in enumerate(found):
        claims[k, pairs[:, 1]] = sims
    owner = claims.argmax(dim=0)  # (T,) first maximum wins ties
    return [pairs[owner[pairs[:, 1]] == k] for k, (pairs, _) in enumerate(found)]

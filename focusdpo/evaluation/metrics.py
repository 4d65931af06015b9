"""Evaluation metrics as pure tensor functions: per-subject fidelity, IP-Conf, collapse, whole-image scores.

Per-subject scores work on patch features from any extractor (``extractor(images01) -> (B, C, h, w)``,
unit norm over ``C``), so DINOv2, DINO v1 or an offline CNN all plug in. Shapes: ``B`` generated
images, ``K`` references (one per subject), ``C`` channels, ``(h, w)`` the generated image's patch
grid, ``(hr, wr)`` the references' grid. ``NaN`` marks a score that is not defined for a sample
(IP-Conf and collapse of a single-subject sample); it is never used for "zero".

Definitions (see docs/evaluate.md):
    * ``s_k(q)``: correspondence score of generated patch ``q`` for reference ``k``
      (:func:`focusdpo.correspondence.similarity_maps`, mean of the top-n patch cosines).
    * region of subject ``k``: the patches where ``s_k(q)`` reaches both ``min_similarity`` and
      ``peak_ratio`` times its own peak (references may share patches: that is what collapse sees),
      or a given layout box.
    * grounded fidelity ``F_k``: mean ``s_k`` over the region of ``k``; 0 when ``k`` was not found
      (a missing subject is the worst outcome, and ``found`` says it was missing).
    * IP-Conf of reference ``k``: with ``s1 >= s2`` its two best region similarities
      ``S[k, j]`` (mean ``s_k`` over region ``j``), ``min(1, (s1 - s2) / s1)``; higher = less confusion.
    * collapse: two found references whose regions overlap with IoU >= ``collapse_iou``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from focusdpo.features.correspondence import masks_to_grid, similarity_maps

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]

"""``(B, 3, H, W)`` float in [0, 1] -> ``(B, C, h, w)`` unit-norm patch features."""


@dataclass
class SubjectScores:
    """Per-subject scores of ``B`` generated images against the same ``K`` references.

    Attributes:
        fidelity: ``(B, K)`` grounded fidelity ``F_k`` (0 where not found).
        found: ``(B, K)`` bool, subject ``k`` has a region.
        ip_conf: ``(B, K)`` IP-Conf, ``NaN`` for K = 1 or fewer than two regions.
        collapsed: ``(B,)`` float 1/0, ``NaN`` for K = 1.
        regions: ``(B, K, h, w)`` bool region of each subject on the generated patch grid.
        region_similarity: ``(B, K, K)`` ``S[k, j]``, ``NaN`` where region ``j`` is empty.
    """

    fidelity: torch.Tensor
    found: torch.Tensor
    ip_conf: torch.Tensor
    collapsed: torch.Tensor
    regions: torch.Tensor
    region_similarity: torch.Tensor

    def summary(self) -> dict[str, torch.Tensor]:
        """``(B,)`` per-sample numbers: fidelity mean and min over subjects, subject count, IP-Conf, collapse."""
        return {"fidelity_mean": self.fidelity.mean(1), "fidelity_min": self.fidelity.min(1).values,
                "subject_count": self.found.sum(1).float(), "ip_conf": nanmean(self.ip_conf, dim=1),
                "collapsed": self.collapsed}


def nanmean(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean over ``dim`` ignoring NaN; all-NaN stays NaN (undefined, not zero)."""
    valid = ~x.isnan()
    total = torch.where(valid, x, 0.0).sum(dim)
    count = valid.sum(dim)
    return torch.where(count > 0, total / count.clamp(min=1), float("nan"))


def threshold_regions(sims: torch.Tensor, min_similarity: float, peak_ratio: float) -> torch.Tensor:
    """``(B, K, h, w)`` scores -> ``(B, K, h, w)`` bool regions: near each reference's own peak and above the floor."""
    peak = sims.flatten(2).max(-1).values[..., None, None]
    return (sims >= min_similarity) & (sims >= peak_ratio * peak)


def boxes_to_regions(boxes: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Layout boxes ``(B, K, 4)`` pixel ``(x0, y0, x1, y1)`` -> ``(B, K, h, w)`` bool regions on ``grid``."""
    height, width = image_size
    ys = torch.arange(height, device=boxes.device)[:, None] + 0.5
    xs = torch.arange(width, device=boxes.device)[None, :] + 0.5
    x0, y0, x1, y1 = (boxes[..., i, None, None] for i in range(4))
    masks = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)  # (B, K, H, W)
    return masks_to_grid(masks, grid)


def region_similarity(sims: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """``S[b, k, j]`` = mean of ``s_k`` over region ``j``: ``(B, K, h, w)`` x ``(B, J, h, w)`` -> ``(B, K, J)``."""
    weights = regions.flatten(2).float()  # (B, J, h*w)
    total = torch.einsum("bkq,bjq->bkj", sims.flatten(2), weights)
    count = weights.sum(-1)[:, None, :]
    return torch.where(count > 0, total / count.clamp(min=1), float("nan"))


def ip_confidence(similarity: torch.Tensor) -> torch.Tensor:
    """IP-Conf ``min(1, (s1 - s2) / s1)`` per reference: ``(B, K, J)`` -> ``(B, K)``.

    ``s1 >= s2`` are the two best non-NaN entries of each row (the reference's similarity to each
    generated subject); ``NaN`` with fewer than two generated subjects; 0 when ``s1 <= 0``.
    """
    if similarity.shape[-1] < 2:
        return torch.full(similarity.shape[:2], float("nan"), device=similarity.device)
    top2 = similarity.nan_to_num(float("-inf")).topk(2, dim=-1).values
    s1, s2 = top2[..., 0], top2[..., 1]
    conf = torch.where(s1 > 0, ((s1 - s2) / s1.clamp(min=1e-12)).clamp(max=1.0), 0.0)
    return torch.where(torch.isfinite(s2), conf, float("nan"))


def region_iou(regions: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of ``(B, K, h, w)`` bool regions -> ``(B, K, K)`` (0 where both are empty)."""
    flat = regions.flatten(2).float()
    inter = torch.einsum("bkq,blq->bkl", flat, flat)
    area = flat.sum(-1)
    union = area[:, :, None] + area[:, None, :] - inter
    return inter / union.clamp(min=1)


def collapse(regions: torch.Tensor, found: torch.Tensor, collapse_iou: float) -> torch.Tensor:
    """``(B,)`` 1.0 where two found subjects share a region (IoU >= ``collapse_iou``), NaN for K = 1."""
    if regions.shape[1] < 2:
        return torch.full(regions.shape[:1], float("nan"), device=regions.device)
    iou = region_iou(regions)
    both = found[:, :, None] & found[:, None, :]
    off_diagonal = ~torch.eye(regions.shape[1], dtype=torch.bool, device=regions.device)
    return ((iou >= collapse_iou) & both & off_diagonal).flatten(1).any(-1).float()


def subject_scores(generated: torch.Tensor, references: torch.Tensor, ref_masks: torch.Tensor | None = None,
                   boxes: torch.Tensor | None = None, image_size: tuple[int, int] | None = None,
                   top_n: int = 4, min_similarity: float = 0.3, peak_ratio: float = 0.8,
                   collapse_iou: float = 0.5, subject_views: list[list[int]] | None = None) -> SubjectScores:
    """Grounded per-subject scores of generated images against their references, from features.

    Args:
        generated: ``(B, C, h, w)`` unit-norm features of the generated images.
        references: ``(K, C, hr, wr)`` (shared by the batch) or ``(B, K, C, hr, wr)``.
        ref_masks: ``(K, hr, wr)`` / ``(B, K, hr, wr)`` bool subject masks, or ``None``.
        boxes: ``(B, K, 4)`` pixel layout boxes (MS-Bench style) on an ``image_size`` image: region of
            subject ``k`` = box ``k``, found when its ``S[k, k]`` reaches ``min_similarity``.
            ``None``: regions come from the correspondence scores.
        top_n: reference patch cosines averaged per generated patch (FocusConfig.top_n's default). With 1 an
            image scored against itself gets exactly 1; more averages in next-best patches (self < 1),
            which separates similar subjects better on real photos.
        min_similarity, peak_ratio: region threshold (:func:`threshold_regions`).
        collapse_iou: regions overlapping this much count as one generated subject.
        subject_views: several views per subject (DreamBench folders): the reference indices of each
            subject; a patch's score for a subject is its best over the views. ``None``: one view each.
    """
    B = generated.shape[0]
    refs = references.expand(B, *references.shape) if references.ndim == 4 else references
    masks = None if ref_masks is None else (ref_masks.expand(B, *ref_masks.shape) if ref_masks.ndim == 3
                                            else ref_masks)
    sims = similarity_maps(generated, refs, masks, top_n=top_n)  # (B, K, h, w)
    if subject_views is not None:
        sims = torch.stack([sims[:, views].amax(1) for views in subject_views], dim=1)  # (B, subjects, h, w)
    if boxes is None:
        regions = threshold_regions(sims, min_similarity, peak_ratio)
    else:
        if image_size is None:
            raise ValueError("boxes need image_size=(H, W), the pixel size the boxes refer to")
        regions = boxes_to_regions(boxes, image_size, tuple(sims.shape[-2:]))
    similarity = region_similarity(sims, regions)
    own = similarity.diagonal(dim1=1, dim2=2)  # (B, K)
    found = regions.flatten(2).any(-1) & (own.nan_to_num(float("-inf")) >= min_similarity)
    fidelity = torch.where(found, own, 0.0)
    return SubjectScores(fidelity=fidelity, found=found, ip_conf=ip_confidence(similarity),
                         collapsed=collapse(regions, found, collapse_iou), regions=regions,
                         region_similarity=similarity)


def score_subjects(extractor: FeatureExtractor, images: torch.Tensor, references: torch.Tensor,
                   ref_masks: torch.Tensor | None = None, **kwargs) -> SubjectScores:
    """:func:`subject_scores` from pixels: ``images`` ``(B, 3, H, W)`` and ``references`` ``(K, 3, Hr, Wr)`` in [0, 1].

    ``ref_masks`` are pixel masks ``(K, Hr, Wr)``, pooled to the extractor's grid; ``kwargs`` go to
    :func:`subject_scores` (``boxes`` are in ``images`` pixels).
    """
    generated = extractor(images)
    refs = extractor(references)
    masks = None if ref_masks is None else masks_to_grid(ref_masks, tuple(refs.shape[-2:]))
    if "boxes" in kwargs and kwargs["boxes"] is not None:
        kwargs.setdefault("image_size", tuple(images.shape[-2:]))
    return subject_scores(generated, refs, masks, **kwargs)


def pooled_embedding(features: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` patch features -> ``(B, C)`` unit-norm mean-pooled image embedding."""
    return F.normalize(features.flatten(2).mean(-1), dim=-1)


def all_pairs_similarity(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Mean cosine over all (generated x reference view) pairs: ``(G, C)`` x ``(R, C)`` -> scalar.

    The DreamBench DINO / CLIP-I convention; inputs need not be normalised.
    """
    return (F.normalize(generated, dim=-1) @ F.normalize(references, dim=-1).T).mean()


def subject_averaged_similarity(generated: torch.Tensor,
                                references: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-subject whole-image score: all-pairs mean per subject, then the mean over subjects.

    Args:
        generated: ``(G, C)`` embeddings of the generated image(s) of one prompt.
        references: K tensors ``(R_k, C)``, the views of each subject.

    Returns:
        ``(scalar mean, (K,) per-subject)``.
    """
    per_subject = torch.stack([all_pairs_similarity(generated, views) for views in references])
    return per_subject.mean(), per_subject


def text_image_similarity(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """CLIP-T: raw cosine of each image with its prompt, ``(B, C)`` x ``(B, C)`` -> ``(B,)`` (no x100, no clip)."""
    return (F.normalize(image_embeds, dim=-1) * F.normalize(text_embeds, dim=-1)).sum(-1)

"""Candidate scores for pair selection, from the evaluator's per-subject metrics (``focusdpo.evaluation.metrics``).

Combined score of a candidate, with the configured weights normalised to sum 1 (so it lies in [-1, 1]):
``w_f·fidelity_mean + w_m·fidelity_min − w_l·leakage + w_c·clip + w_u·user``, where

- ``fidelity_mean`` / ``fidelity_min``: the mean / worst grounded fidelity ``F_k`` over the subjects
  (:func:`focusdpo.evaluation.metrics.score_subjects`, the evaluator's definition; 0 for a subject not found);
- ``leakage``: mean over ordered subject pairs ``j ≠ k`` of ``S[j, k]``, the mean similarity to reference ``j``
  inside subject ``k``'s region (how strongly one subject's region matches another reference; 0 for K = 1);
- ``clip``: CLIP cosine of image and prompt (``clip_model``); ``user``: a ``module:function`` scorer.
"""

from __future__ import annotations

import importlib

import torch
from PIL import Image

from focusdpo.errors import ConfigError
from focusdpo.evaluation.metrics import score_subjects
from focusdpo.features.correspondence import masks_to_grid, similarity_maps
from focusdpo.images import to_tensor
from focusdpo.models.sampling import reference_tensor


def load_user_scorer(spec: str):
    """``'module:function'`` → the function; a clear error when either part does not exist."""
    module_name, _, function = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"scorer={spec!r}: module {module_name!r} cannot be imported ({e})") from None
    if not callable(getattr(module, function, None)):
        raise ConfigError(f"scorer={spec!r}: {module_name} has no function {function!r}")
    return getattr(module, function)


def pil_batch(images: list[Image.Image]) -> torch.Tensor:
    """Same-size PIL images → ``(N, 3, H, W)`` in [0, 1]."""
    return torch.stack([to_tensor(img.convert("RGB")) for img in images])


def leakage(region_similarity: torch.Tensor) -> torch.Tensor:
    """``(B, K, K)`` ``S[j, k]`` → ``(B,)`` mean of the off-diagonal entries (NaN ignored; 0 if none)."""
    k = region_similarity.shape[-1]
    off = ~torch.eye(k, dtype=torch.bool, device=region_similarity.device)
    values = region_similarity[:, off]  # (B, K·(K−1))
    valid = ~values.isnan()
    total = torch.where(valid, values, 0.0).sum(-1)
    return torch.where(valid.any(-1), total / valid.sum(-1).clamp(min=1), 0.0)


def subject_views(item) -> list[list[int]] | None:
    """Reference indices per subject when several references show one subject (DreamBench folders), else None."""
    names = list(item.subjects)
    if not names or len(set(names)) == len(names):
        return None
    return [[i for i, n in enumerate(names) if n == name] for name in dict.fromkeys(names)]


class CandidateScorer:
    """Scores candidates of one prompt; holds the feature extractor, optional CLIP and the user scorer."""

    def __init__(self, pair_cfg, focus_cfg, device=None, extractor=None):
        from focusdpo.features.eval import load_subject_extractor

        self.weights = pair_cfg.score_weights()
        self.user = load_user_scorer(pair_cfg.scorer) if pair_cfg.scorer else None
        # Random toy weights are seeded inside the loader: every process scores alike.
        self.extractor = extractor or load_subject_extractor(focus_cfg, device)
        self.clip = None
        if pair_cfg.clip_model and pair_cfg.clip_weight > 0:
            from focusdpo.features.eval import ClipScorer
            self.clip = ClipScorer(pair_cfg.clip_model, device)
        self.options = {"top_n": focus_cfg.top_n, "min_similarity": pair_cfg.min_similarity,
                        "peak_ratio": pair_cfg.peak_ratio}
        self.resolution = pair_cfg.resolution
        self.device = device

    def settings(self) -> dict:
        """What produced the scores (stored with every pair and in the dataset's provenance)."""
        return {"weights": self.weights, **self.options, "extractor": getattr(self.extractor, "name", "custom"),
                "clip": getattr(self.clip, "name", None), "user_scorer": getattr(self.user, "__name__", None)}

    @torch.no_grad()
    def score(self, images: list[Image.Image], item, references: list[Image.Image]):
        """Scores of N candidates: ``(combined (N,), parts {name: (N,)}, SubjectScores, per_subject (N, S))``.

        ``per_subject`` is the user scorer's per-subject scores when it returns one score per candidate and subject,
        else the grounded fidelity of each subject; it labels the subject-wise preferences (``subject_scores``)."""
        pixels = pil_batch(images).to(self.device)
        refs = reference_tensor(references, self.resolution).to(self.device)
        subjects = score_subjects(self.extractor, pixels, refs, subject_views=subject_views(item), **self.options)
        summary = subjects.summary()
        parts = {"fidelity": summary["fidelity_mean"], "min_fidelity": summary["fidelity_min"],
                 "leakage": leakage(subjects.region_similarity)}
        if self.clip is not None:
            parts["clip"] = (self.clip.images(pixels) * self.clip.texts([item.prompt] * len(images))).sum(-1)
        per_subject = subjects.fidelity.float().cpu()
        if self.user is not None:
            user = self.user_scores(images, item, per_subject.shape[1])
            parts["user"] = user.mean(1) if user.ndim == 2 else user
            per_subject = user if user.ndim == 2 else per_subject
        parts = {k: v.float().cpu() for k, v in parts.items()}
        combined = sum(w * (-parts[k] if k == "leakage" else parts[k]) for k, w in self.weights.items())
        return combined, parts, subjects, per_subject

    def user_scores(self, images, item, subjects: int) -> torch.Tensor:
        """The user scorer's ``(N,)`` scores, or ``(N, S)``: one per candidate and subject."""
        values = torch.as_tensor(self.user(images, item), dtype=torch.float32)
        values = values.flatten() if values.ndim < 2 or values.shape[1:] == (1,) else values
        if values.shape not in ((len(images),), (len(images), subjects)) or not bool(values.isfinite().all()):
            raise ValueError(f"user scorer returned {values.tolist()} for {len(images)} candidates and {subjects} "
                             "subjects; it must return one finite float per candidate, or a list per candidate with "
                             "one finite float per subject")
        return values

    @torch.no_grad()
    def region_fidelity(self, image: Image.Image, references: list[Image.Image], views: list[int],
                        region: torch.Tensor) -> float:
        """Mean ``s_k`` (the same correspondence score as fidelity; best over the subject's reference ``views``)
        over a pixel region ``(H, W)`` bool."""
        pixels = pil_batch([image]).to(self.device)
        refs = reference_tensor(references, self.resolution).to(self.device)
        target, ref_feats = self.extractor(pixels), self.extractor(refs)
        sims = similarity_maps(target, ref_feats[None], top_n=self.options["top_n"])[0, views].amax(0)  # (h, w)
        cells = masks_to_grid(region[None].to(sims.device), tuple(sims.shape))[0]
        return float(sims[cells].mean()) if bool(cells.any()) else float("nan")

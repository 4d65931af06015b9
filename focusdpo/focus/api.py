"""Focus weights for any trainer: what a custom diffusers DPO loop has in hand → the ``(2B, h, w)`` weights.

One image convention everywhere: **float pixels in [0, 1]**, ``(B, 3, H, W)`` winners and losers, ``(K, 3, Hr, Wr)``
references per pair (the diffusers training scripts normalise to [-1, 1]: pass ``(pixel_values + 1) / 2``).
Values outside [0, 1] are refused, so a [-1, 1] or [0, 255] batch fails loudly instead of weighting garbage.

The noise level ``u`` (1 = pure noise) drives the schedule: flow models pass ``sigmas`` (σ itself); DDPM-style
schedulers pass ``timesteps`` and the ``scheduler``, and ``u`` is the flow σ with the same SNR,
``√(1−ᾱ_t) / (√ᾱ_t + √(1−ᾱ_t))``, exactly as the trainer's UNet families do. The weights equal
``FocusDPOTrainer.focus_weights`` on the same batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from focusdpo.config.focus import FocusConfig
from focusdpo.focus.maps import error_confidence, focus_weights

if TYPE_CHECKING:
    from focusdpo.focus.mapper import FocusMapper


# focusdpo.focus.mapper (and timm behind it) is imported inside the functions: `import focusdpo` stays light.

PAIR_KEYS = ("winner", "loser", "references")  # required keys of a pair for iter_static_maps


def check_unit_range(name: str, images: torch.Tensor) -> None:
    if not torch.is_floating_point(images):
        raise ValueError(f"{name} must be float pixels in [0, 1], got dtype {images.dtype}: divide uint8 by 255")
    low, high = images.min().item(), images.max().item()
    if low < 0 or high > 1:
        raise ValueError(f"{name} must be in [0, 1], got values in [{low:.3g}, {high:.3g}]: diffusers' training "
                         "scripts normalise to [-1, 1], pass (pixel_values + 1) / 2")


def as_mapper(extractor, cfg: FocusConfig) -> "FocusMapper":
    """A :class:`FocusMapper` as given, or one around a feature extractor from :mod:`focusdpo.features`."""
    from focusdpo.focus.mapper import FocusMapper

    if isinstance(extractor, FocusMapper):
        return extractor
    if not isinstance(extractor, torch.nn.Module):
        raise TypeError(f"extractor must be a FocusMapper or a focusdpo.features extractor, got {type(extractor)}")
    return FocusMapper(cfg, device=next(extractor.parameters()).device, model=extractor)


def collated_batch(winners, losers, references, masks, prior_masks) -> dict:
    """The inputs in :class:`~focusdpo.data.collate.PairCollator`'s layout, checked."""
    if winners.ndim != 4 or winners.shape[1] != 3 or winners.shape != losers.shape:
        raise ValueError(f"winners and losers must both be (B, 3, H, W), got {tuple(winners.shape)} and "
                         f"{tuple(losers.shape)}")
    pairs = winners.shape[0]
    for name, values in (("references", references), ("masks", masks), ("prior_masks", prior_masks)):
        if values is not None and len(values) != pairs:
            raise ValueError(f"{name} must have one entry per pair ({pairs}), got {len(values)}")
    check_unit_range("winners", winners)
    check_unit_range("losers", losers)
    for i, refs in enumerate(references):
        if refs.ndim != 4 or (refs.shape[0] and refs.shape[1] != 3):
            raise ValueError(f"references[{i}] must be (K, 3, Hr, Wr), got {tuple(refs.shape)}")
        if refs.shape[0]:
            check_unit_range(f"references[{i}]", refs)
        mask = None if masks is None else masks[i]
        if mask is not None and tuple(mask.shape) != (refs.shape[0], *refs.shape[-2:]):
            raise ValueError(f"masks[{i}] must be (K, Hr, Wr) = {(refs.shape[0], *refs.shape[-2:])}, got "
                             f"{tuple(mask.shape)}")
        prior = None if prior_masks is None else prior_masks[i]
        if prior is not None and tuple(prior.shape) != tuple(winners.shape[-2:]):
            raise ValueError(f"prior_masks[{i}] must be (H, W) = {tuple(winners.shape[-2:])}, got {tuple(prior.shape)}")
    none = [None] * pairs
    return {"pixel_values": torch.cat([winners, losers]).float() * 2 - 1, "references": list(references),
            "reference_masks": list(masks) if masks is not None else none,
            "prior_mask": list(prior_masks) if prior_masks is not None else none,
            "pair_ids": [str(i) for i in range(pairs)]}


def noise_levels(pairs: int, timesteps=None, scheduler=None, sigmas=None) -> torch.Tensor:
    """``(2B,)`` u: from σ (flow models) or from DDPM timesteps through the scheduler's ᾱ; per pair or per image."""
    if (sigmas is None) == (timesteps is None):
        raise ValueError("give either sigmas (flow models: σ in [0, 1]) or timesteps with their scheduler (DDPM)")
    if sigmas is not None:
        u = torch.as_tensor(sigmas, dtype=torch.float32).reshape(-1)
        if u.numel() and (u.min() < 0 or u.max() > 1):
            raise ValueError(f"sigmas must be in [0, 1] (1 = pure noise), got [{u.min():.3g}, {u.max():.3g}]")
    else:
        alphas = getattr(scheduler, "alphas_cumprod", None)
        if alphas is None:
            raise ValueError(f"scheduler {type(scheduler).__name__} has no alphas_cumprod (not DDPM-style): pass the "
                             "flow σ as sigmas instead")
        from focusdpo.models.sd import flow_equivalent_sigma

        u = flow_equivalent_sigma(alphas.cpu(), torch.as_tensor(timesteps).reshape(-1).long().cpu())
    if u.numel() == pairs:
        return torch.cat([u, u])  # winner i and loser i share their noise level
    if u.numel() != 2 * pairs:
        raise ValueError(f"need one noise level per pair ({pairs}) or per image ({2 * pairs}), got {u.numel()}")
    return u


def compute_focus_weights(winners: torch.Tensor, losers: torch.Tensor, references: list[torch.Tensor],
                          grid: tuple[int, int], config: FocusConfig, extractor, *, masks=None, prior_masks=None,
                          timesteps=None, scheduler=None, sigmas=None, reference_error=None) -> torch.Tensor:
    """Focus weights ``(2B, h, w)`` (rows ``[winners; losers]``) on the loss grid ``grid = (h, w)``.

    Args:
        winners, losers: ``(B, 3, H, W)`` float in [0, 1].
        references: B tensors ``(K_i, 3, Hr, Wr)`` in [0, 1] (same ``Hr, Wr`` for pairs with the same K;
            K = 0 only with ``lambda_structure = 0``).
        grid: the loss grid, e.g. latent ``(H/8, W/8)`` for SD or the packed token grid for FLUX.
        config: the :class:`FocusConfig` (λ, schedule, correspondence settings).
        extractor: a :class:`~focusdpo.focus.mapper.FocusMapper` or a feature extractor of
            :func:`focusdpo.features.dino.load_feature_extractor` (build it once, reuse it every step).
        masks: None or B entries, each None or ``(K_i, Hr, Wr)`` subject masks in [0, 1].
        prior_masks: None or B entries, each None or ``(H, W)``: where the loser was disrupted (aligned pairs).
        timesteps, scheduler: DDPM timesteps ``(B,)`` or ``(2B,)`` and the scheduler with ``alphas_cumprod``; or
        sigmas: flow σ ``(B,)`` or ``(2B,)`` in [0, 1].
        reference_error: ``(2B, h, w)`` the reference model's squared error per patch
            (:func:`focusdpo.losses.patch_error`); needed, and only used, with ``confidence_source: reference_error``.

    Returns ``torch.ones`` when both λ are 0 (vanilla Diffusion-DPO); each image's weights have mean 1.
    """
    batch = collated_batch(winners, losers, references, masks, prior_masks)
    u = noise_levels(winners.shape[0], timesteps, scheduler, sigmas)
    gate = reference_gate(config, reference_error, (2 * winners.shape[0], *grid))
    static = as_mapper(extractor, config).batch_maps(batch, tuple(grid))
    return focus_weights(static, u, config.lambda_structure, config.lambda_detail, config.schedule_center,
                         config.schedule_width, gate)


def compute_subject_masks(winners: torch.Tensor, losers: torch.Tensor, references: list[torch.Tensor],
                          grid: tuple[int, int], config: FocusConfig, extractor, *, masks=None) -> torch.Tensor:
    """Soft subject masks ``(2B, K_max, h, w)`` (rows ``[winners; losers]``, zero-padded to the batch's most
    references): ``M_k(q) = S(q)·softmax_k(s_k(q) / mask_temperature)``, what ``preference_unit: subject`` splits
    each image into. Arguments as in :func:`compute_focus_weights`; every pair needs at least one reference."""
    if any(len(r) == 0 for r in references):
        raise ValueError("every pair needs at least one reference: subject masks locate the reference subjects")
    batch = collated_batch(winners, losers, references, masks, None)
    return as_mapper(extractor, config).batch_maps(batch, tuple(grid), masks=True)[1]


def reference_gate(config: FocusConfig, reference_error, shape: tuple[int, ...]):
    """The per-step confidence of ``confidence_source: reference_error`` (None for the other sources)."""
    if config.confidence_source != "reference_error":
        return None
    if reference_error is None or tuple(reference_error.shape) != tuple(shape):
        got = None if reference_error is None else tuple(reference_error.shape)
        raise ValueError(f"confidence_source: reference_error needs reference_error={shape} (the reference "
                         f"model's per-patch squared error, [winners; losers]), got {got}: pass "
                         "focusdpo.losses.patch_error(ref_pred, target), or choose another confidence_source")
    return error_confidence(reference_error)


def iter_static_maps(pairs: Iterable[dict], grid: tuple[int, int], config: FocusConfig, extractor,
                     batch_size: int = 8) -> Iterator[torch.Tensor]:
    """Static maps of any iterable of pairs, one float16 ``(2, 2, h, w)`` per pair (``[winner, loser]`` ×
    ``[structure, detail]``, the ``focusdpo focus`` cache layout), computed ``batch_size`` pairs at a time.

    A pair is a dict with ``winner``, ``loser`` ``(3, H, W)`` and ``references`` ``(K, 3, Hr, Wr)`` in [0, 1], and
    optionally ``masks`` ``(K, Hr, Wr)`` and ``prior_mask`` ``(H, W)``. Turn maps of a batch into weights with
    :func:`focusdpo.focus.focus_weights` on ``torch.cat([maps[:, 0], maps[:, 1]])`` (``[winners; losers]``).
    """
    mapper = as_mapper(extractor, config)
    chunk: list[dict] = []
    for index, pair in enumerate(pairs):
        missing = [k for k in PAIR_KEYS if k not in pair]
        if missing:
            raise ValueError(f"pair {index} lacks {missing}: each pair needs {PAIR_KEYS} (and may have masks, "
                             "prior_mask)")
        chunk.append(pair)
        if len(chunk) == batch_size:
            yield from chunk_maps(chunk, grid, mapper)
            chunk = []
    if chunk:
        yield from chunk_maps(chunk, grid, mapper)


def chunk_maps(chunk: list[dict], grid, mapper) -> Iterator[torch.Tensor]:
    batch = collated_batch(torch.stack([p["winner"] for p in chunk]), torch.stack([p["loser"] for p in chunk]),
                           [p["references"] for p in chunk], [p.get("masks") for p in chunk],
                           [p.get("prior_mask") for p in chunk])
    maps = mapper.batch_maps(batch, tuple(grid)).cpu()
    yield from torch.stack(maps.chunk(2), dim=1).half()

"""MOSAIC (arXiv 2509.01977) in training: correspondence targets and the SCA / MD auxiliary losses.

Correspondence points of one pair are a ``(P, 3)`` long tensor of rows ``(k, ref_token, target_token)``: reference
k's token ``ref_token`` (row-major on the reference token grid) matches ``target_token`` (row-major on the target
token grid). They come from

- :func:`compute_points`: mutual nearest neighbours of DINOv2 features inside the subject masks, each target token
  owned by at most one reference (``correspondence.multi_reference_matches``, MOSAIC Eq. 2), made on the fly per
  pair (and kept in memory) or precomputed by :func:`precompute_points` into a ``mosaic_points`` column keyed like
  the focus maps;
- :func:`import_semalign`: MOSAIC's SemAlign-MS layout, per reference ``[N, 2]`` (y, x) points on a 64×64 grid in
  the reference and in the target, scaled to the token grids.

:class:`MosaicObjective` turns a batch's points into a :class:`~focusdpo.mosaic.attention.CapturePlan`, records the
policy's winner pass and returns ``λ_sca·SCA + w_md(step)·MD`` (:func:`focusdpo.losses.sca_loss`, ``md_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from focusdpo.config.focus import FocusConfig
from focusdpo.config.training import LossConfig
from focusdpo.data.collate import PairCollator
from focusdpo.errors import ConfigError, PairDataError
from focusdpo.features.correspondence import masks_to_grid, multi_reference_matches
from focusdpo.losses import md_loss, sca_loss
from focusdpo.models.families import FLOW_FAMILIES
from focusdpo.mosaic.attention import AttentionCapture, CapturePlan

SEMALIGN_GRID = 64  # SemAlign-MS stores matches on a 64×64 grid

IMPORTED_KEY = "imported"  # mosaic_key prefix of imported points (e.g. "imported:semalign"), not checked


# ---- correspondence points --------------------------------------------------------------------------------------
def points_from_matches(matches: list[torch.Tensor]) -> torch.Tensor:
    """K tensors ``(M_k, 2)`` of ``(ref_token, target_token)`` → one ``(ΣM_k, 3)`` long ``(k, ref, target)``."""
    rows = [torch.cat([torch.full_like(m[:, :1], k), m], dim=1) for k, m in enumerate(matches)]
    return torch.cat(rows).long() if rows else torch.zeros(0, 3, dtype=torch.long)


def check_points(points: torch.Tensor, num_references: int, target_tokens: int, reference_tokens: int,
                 pair_id: str = "?") -> torch.Tensor:
    """Refuse points outside the grids, references beyond K, and target tokens claimed by two references."""
    points = torch.as_tensor(points).long().reshape(-1, 3)
    k, ref, tgt = points.unbind(1)
    if bool((k < 0).any() | (k >= num_references).any()):
        raise PairDataError(f"pair {pair_id}: correspondence reference index {int(k.max())} but the pair has "
                            f"{num_references} references (indices 0…{num_references - 1})")
    for name, index, size in (("reference", ref, reference_tokens), ("target", tgt, target_tokens)):
        if bool((index < 0).any() | (index >= size).any()):
            raise PairDataError(f"pair {pair_id}: a correspondence point lies outside the {name} token grid "
                                f"({size} tokens; got index {int(index.min())}…{int(index.max())}); "
                                "were the points made for another resolution?")
    owners = torch.unique(torch.stack([tgt, k], 1), dim=0)[:, 0]
    if owners.numel() != torch.unique(owners).numel():
        token = int(owners[1:][owners[1:] == owners[:-1]][0])
        raise PairDataError(f"pair {pair_id}: target token {token} is matched by two references; MOSAIC needs one "
                            "owner per target token (multi_reference_matches keeps the most similar one)")
    return points


def scale_points(yx: torch.Tensor, source: int, grid: tuple[int, int]) -> torch.Tensor:
    """``(N, 2)`` (y, x) points on a ``source × source`` grid → row-major indices on ``grid``."""
    yx = torch.as_tensor(yx).long()
    if bool((yx < 0).any() | (yx >= source).any()):
        raise PairDataError(f"SemAlign points must lie on the {source}×{source} grid, got values "
                            f"{int(yx.min())}…{int(yx.max())}")
    y, x = yx[:, 0] * grid[0] // source, yx[:, 1] * grid[1] // source
    return y * grid[1] + x


def import_semalign(reference_points: list, target_points: list, target_grid: tuple[int, int],
                    reference_grid: tuple[int, int], source_grid: int = SEMALIGN_GRID) -> torch.Tensor:
    """SemAlign-MS matches (per reference k, ``[N_k, 2]`` (y, x) in the reference and in the target) → ``(P, 3)``.

    Points are scaled to the token grids by integer division, as MOSAIC's loader resizes them; pairs that fall
    into the same tokens are kept once.
    """
    if len(reference_points) != len(target_points):
        raise PairDataError(f"SemAlign matches: {len(reference_points)} reference point sets but "
                            f"{len(target_points)} target point sets")
    matches = []
    for ref_yx, tgt_yx in zip(reference_points, target_points):
        if len(ref_yx) != len(tgt_yx):
            raise PairDataError(f"SemAlign matches: {len(ref_yx)} reference points but {len(tgt_yx)} target points")
        pair = torch.stack([scale_points(ref_yx, source_grid, reference_grid),
                            scale_points(tgt_yx, source_grid, target_grid)], dim=1)
        matches.append(torch.unique(pair.reshape(-1, 2), dim=0))
    points = points_from_matches(matches)
    return check_points(points, len(matches), target_grid[0] * target_grid[1],
                        reference_grid[0] * reference_grid[1], "semalign")


def pooled_features(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Unit-norm patch features ``(N, C, h', w')`` averaged onto a token ``grid`` and renormalised."""
    return F.normalize(F.adaptive_avg_pool2d(features, grid), dim=1)


@torch.no_grad()
def compute_points(dino, winner: torch.Tensor, refs: torch.Tensor, ref_masks: torch.Tensor | None,
                   target_grid: tuple[int, int], reference_grid: tuple[int, int], image_size: int) -> torch.Tensor:
    """Mutual-NN points of one pair on the token grids.

    Args:
        winner: ``(3, H, W)`` in [0, 1]; refs: ``(K, 3, Hr, Wr)`` in [0, 1]; ref_masks: ``(K, Hr, Wr)`` or None.

    Returns:
        ``(P, 3)`` long ``(k, ref_token, target_token)``, each target token owned by at most one reference.
    """
    from focusdpo.features.dino import patch_features

    target = pooled_features(patch_features(dino, winner[None], image_size), target_grid)[0]
    ref_feats = pooled_features(patch_features(dino, refs, image_size), reference_grid)
    masks = None if ref_masks is None else masks_to_grid(ref_masks, reference_grid)
    return points_from_matches(multi_reference_matches(target, ref_feats, masks)).cpu()


def points_key(cfg: FocusConfig, target_grid: tuple[int, int], reference_grid: tuple[int, int]) -> str:
    """What made computed points: the focus-map key (extractor + DINO settings + grid) and the reference grid."""
    from focusdpo.focus.mapper import focus_cache_key

    return f"mosaic/{focus_cache_key(cfg, target_grid)}/ref{reference_grid[0]}x{reference_grid[1]}"


def precompute_points(pairs, cfg: FocusConfig, target_grid, reference_grid, resolution: int, device=None):
    """Add ``mosaic_points`` (int32 ``(P, 3)`` per pair) and ``mosaic_key`` columns to a pair dataset."""
    from datasets import Array2D
    from tqdm.auto import tqdm

    from focusdpo.focus.mapper import FocusMapper

    dino = FocusMapper(cfg, device).model
    collate = PairCollator(resolution)
    points = []
    for i in tqdm(range(len(pairs)), desc="MOSAIC correspondences", unit="pair"):
        batch = collate([pairs[i]])
        masks = batch["reference_masks"][0]
        points.append(compute_points(dino, (batch["pixel_values"][0] + 1) / 2, batch["references"][0], masks,
                                     target_grid, reference_grid, cfg.dino_image_size).int().numpy())
    pairs = pairs.remove_columns([c for c in ("mosaic_points", "mosaic_key") if c in pairs.column_names])
    pairs = pairs.add_column("mosaic_points", [p.tolist() for p in points],
                             feature=Array2D(shape=(None, 3), dtype="int32"))
    return pairs.add_column("mosaic_key", [points_key(cfg, target_grid, reference_grid)] * len(pairs))


class MosaicCollator(PairCollator):
    """:class:`~focusdpo.data.collate.PairCollator` that also passes cached ``mosaic_points`` (B tensors) and its key."""

    def __call__(self, rows: list[dict]) -> dict:
        batch = super().__call__(rows)
        if "mosaic_points" in rows[0]:
            batch["mosaic_points"] = [torch.as_tensor(np.asarray(r["mosaic_points"], dtype=np.int64)).reshape(-1, 3)
                                      for r in rows]
            batch["mosaic_key"] = rows[0]["mosaic_key"]
        return batch


# ---- batched targets and the objective ----------------------------------------------------------------------------
@dataclass
class MosaicTargets:
    """A batch's points padded to ``P_max`` and the attention rows to capture (``S`` captured samples)."""

    plan: CapturePlan
    point_rows: torch.Tensor  # (S, P) row of the captured attention holding each point's reference token
    point_targets: torch.Tensor  # (S, P)
    point_refs: torch.Tensor  # (S, P)
    point_valid: torch.Tensor  # (S, P) bool
    row_refs: torch.Tensor  # (S, R)
    row_valid: torch.Tensor  # (S, R) bool
    num_references: int


def pad_points(points: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """B tensors ``(P_i, 3)`` → ``(B, P_max, 3)`` (padding rows are 0) and a ``(B, P_max)`` validity mask."""
    padded = torch.nn.utils.rnn.pad_sequence([p.long().reshape(-1, 3) for p in points], batch_first=True)
    if padded.shape[1] == 0:  # no sample has a point: keep one masked slot so gathers stay well-formed
        padded = padded.new_zeros(len(points), 1, 3)
    lengths = torch.tensor([len(p) for p in points])
    return padded, torch.arange(padded.shape[1]) < lengths[:, None]


def build_targets(points: list[torch.Tensor], counts: list[int], target_tokens: int, reference_tokens: int,
                  rows: str = "matched", device=None) -> MosaicTargets:
    """Capture plan and loss indices for B samples with ``counts[i]`` references of ``reference_tokens`` each.

    ``rows="matched"`` captures one row per point; ``"all"`` captures every reference token (MD over all rows).
    """
    padded, valid = pad_points(points)
    k, ref, tgt = padded.unbind(-1)
    k_max = max(counts)
    if rows == "matched":
        query = target_tokens + k * reference_tokens + ref
        point_rows, row_refs, row_valid = torch.arange(k.shape[1]).expand_as(k), k, valid
    else:
        flat = torch.arange(k_max * reference_tokens)
        query = (target_tokens + flat).expand(len(points), -1)
        point_rows = k * reference_tokens + ref
        row_refs = (flat // reference_tokens).expand(len(points), -1)
        row_valid = row_refs < torch.tensor(counts)[:, None]
    plan = CapturePlan(query.to(device), target_tokens, target_tokens + k_max * reference_tokens)
    to = (lambda t: t.to(device))
    return MosaicTargets(plan, to(point_rows), to(tgt), to(k), to(valid), to(row_refs), to(row_valid), k_max)


def md_weight(cfg: LossConfig, step: int) -> float:
    """λ_md after the warm-up: 0 before ``md_start_step``, then a linear ramp over ``md_ramp_steps``."""
    if step < cfg.md_start_step:
        return 0.0
    if cfg.md_ramp_steps == 0:
        return cfg.lambda_md
    return cfg.lambda_md * min(1.0, (step - cfg.md_start_step + 1) / cfg.md_ramp_steps)


class MosaicObjective:
    """Correspondence points per batch, attention capture on the policy's winner pass, and the weighted losses."""

    def __init__(self, denoiser: torch.nn.Module, family: str, loss_cfg: LossConfig, focus_cfg: FocusConfig,
                 device=None):
        if family not in FLOW_FAMILIES:
            raise ConfigError(f"lambda_sca / lambda_md supervise in-context reference tokens, which family={family!r} "
                              f"does not have; use family {' or '.join(FLOW_FAMILIES)}, or set both to 0")
        self.cfg, self.focus_cfg, self.device = loss_cfg, focus_cfg, device
        self.capture = AttentionCapture(denoiser, loss_cfg.attention_block_selection())
        self.dino = None
        self.cache: dict[str, torch.Tensor] = {}  # pair_id -> points computed on the fly
        self.pending: tuple[torch.Tensor, MosaicTargets] | None = None

    def active(self, step: int) -> bool:
        return self.cfg.lambda_sca > 0 or md_weight(self.cfg, step) > 0

    def batch_points(self, inputs: dict, samples: int, target_grid, reference_grid) -> list[torch.Tensor]:
        """Checked points of the batch's first ``samples`` pairs: cached in the dataset, or computed and kept."""
        ids, refs = inputs["pair_ids"], inputs["references"]
        if "mosaic_points" in inputs:
            key = str(inputs["mosaic_key"])
            expected = points_key(self.focus_cfg, target_grid, reference_grid)
            if not key.startswith(IMPORTED_KEY) and key != expected:  # imported points carry their own origin
                raise ValueError(f"cached MOSAIC points were made as {key!r} but this run needs {expected!r}: "
                                 "re-run `focusdpo correspond` with this recipe")
            found = inputs["mosaic_points"][:samples]
        else:
            found = [self.computed(inputs, i, target_grid, reference_grid) for i in range(samples)]
        size = target_grid[0] * target_grid[1], reference_grid[0] * reference_grid[1]
        return [check_points(p, len(refs[i]), *size, ids[i]) for i, p in enumerate(found)]

    def computed(self, inputs: dict, i: int, target_grid, reference_grid) -> torch.Tensor:
        pair_id = inputs["pair_ids"][i]
        if pair_id not in self.cache:
            if self.dino is None:
                from focusdpo.focus.mapper import FocusMapper

                self.dino = FocusMapper(self.focus_cfg, self.device).model
            refs, masks = inputs["references"][i], inputs["reference_masks"][i]
            if len(refs) == 0:
                raise PairDataError(f"pair {pair_id} has no references: MOSAIC losses need at least one")
            winner = (inputs["pixel_values"][i].float() + 1) / 2
            self.cache[pair_id] = compute_points(self.dino, winner.to(self.device), refs.float().to(self.device),
                                                 None if masks is None else masks.to(self.device), target_grid,
                                                 reference_grid, self.focus_cfg.dino_image_size)
        return self.cache[pair_id]

    def targets(self, inputs: dict, prepared, samples: int) -> MosaicTargets:
        """Targets for the first ``samples`` rows of a prepared flow batch (the winners of ``[w; l]``)."""
        kw = prepared.model_kwargs
        h, w = kw["grid_size"]
        counts = [len(r) for r in inputs["references"][:samples]]
        if "references" not in kw or max(counts, default=0) == 0:
            raise PairDataError(f"pairs {inputs['pair_ids'][:samples]} have no references: MOSAIC losses need them")
        per_ref = kw["references"].shape[1] // max(len(r) for r in inputs["references"])
        side = int(round(per_ref ** 0.5))
        if side * side != per_ref:
            raise ValueError(f"MOSAIC needs square references ({per_ref} tokens each): set reference_size")
        points = self.batch_points(inputs, samples, (h, w), (side, side))
        return build_targets(points, counts, h * w, per_ref, self.cfg.md_rows, kw["tokens"].device)

    def forward(self, model, prepared, targets: MosaicTargets):
        """Run ``model(prepared)`` recording the planned rows; the attention waits for :meth:`loss`."""
        with self.capture.recording(targets.plan):
            pred = model(prepared)
        self.pending = (self.capture.attention(targets.plan), targets)
        return pred

    def loss(self, step: int, metrics: dict) -> torch.Tensor:
        """``λ_sca·SCA + w_md(step)·MD`` of the recorded pass; adds ``mosaic/sca`` and ``mosaic/md`` to metrics."""
        attention, t = self.pending
        self.pending = None
        sca = sca_loss(attention, t.point_rows, t.point_targets, t.point_refs, t.point_valid, t.num_references)
        md = md_loss(attention, t.row_refs, t.row_valid, t.num_references, self.cfg.md_divergence)
        metrics.update({"mosaic/sca": sca.detach(), "mosaic/md": md.detach()})
        return self.cfg.lambda_sca * sca + md_weight(self.cfg, step) * md


BATCHLESS_INPUTS = ("grid_size", "target_ids", "txt_ids", "img_ids")  # shared by every row of a batch


def winner_inputs(prepared):
    """The winners' half of a prepared ``[w; l]`` batch (SFT trains on the chosen images only)."""
    from focusdpo.models.base import DenoiseInputs

    half = prepared.target.shape[0] // 2

    def take(key, value):
        if key in BATCHLESS_INPUTS or not isinstance(value, (torch.Tensor, dict)):
            return value
        return {k: take(k, v) for k, v in value.items()} if isinstance(value, dict) else value[:half]
    return DenoiseInputs({k: take(k, v) for k, v in prepared.model_kwargs.items()}, prepared.target[:half],
                         prepared.noise_level[:half])

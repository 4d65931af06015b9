"""Focus maps and weights: hand-computed values for the pure functions, real DreamBench photos for the complexity
map."""

import math

import pytest
import torch
import torch.nn.functional as F

from focusdpo.config.focus import FocusConfig
from focusdpo.focus.maps import (check_cached_grid, complexity_map, error_confidence, focus_parts, focus_weights,
                                 gaussian_blur, misalignment_map, reference_complexity, schedule, static_focus_maps,
                                 subject_map, subject_masks)

from conftest import photo

LOG32 = math.log(32)


def entropy_image():
    """8x8 grey image, 2x2 cells of 4x4 px: flat | two values | four values | two values 1:3."""
    image = torch.zeros(8, 8)
    image[0:4, 4:8] = torch.tensor([0.1, 0.6]).repeat_interleave(8).view(4, 4)
    image[4:8, 0:4] = torch.tensor([0.0, 0.3, 0.6, 0.9]).repeat_interleave(4).view(4, 4)
    image[4:8, 4:8] = 0.5
    image[4, 4:8] = 0.9
    return image.expand(1, 3, 8, 8)


def test_complexity_entropy_by_hand():
    d = complexity_map(entropy_image(), (2, 2), bins=32, sigma=0)
    p = torch.tensor([0.25, 0.75])
    expected = torch.tensor([[[0.0, math.log(2) / LOG32], [math.log(4) / LOG32, -(p * p.log()).sum() / LOG32]]])
    torch.testing.assert_close(d, expected)
    assert math.isclose(math.log(2) / LOG32, 0.2)


def test_complexity_cells_follow_h_then_w_and_cover_uneven_sizes():
    image = torch.zeros(1, 3, 10, 7)
    image[..., 0:5, 4:7:2] = 1.0  # texture only in cell (row 0, col 1) of a 2x2 grid on 10x7 px
    d = complexity_map(image, (2, 2), sigma=0)[0]
    assert d[0, 1] > 0 and d[0, 0] == 0 and d[1].abs().sum() == 0


def test_complexity_rejects_more_cells_than_pixels():
    with pytest.raises(ValueError, match="fewer pixels"):
        complexity_map(torch.rand(1, 3, 8, 8), (16, 16))


def test_gaussian_blur_keeps_constants_and_mass():
    flat = torch.full((1, 1, 9, 9), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, 1.5), flat)
    dot = torch.zeros(1, 1, 21, 21)
    dot[..., 10, 10] = 1
    blurred = gaussian_blur(dot, 1.0)
    assert math.isclose(blurred.sum().item(), 1.0, rel_tol=1e-5) and blurred[..., 10, 10] < 0.2


def test_complexity_textured_above_flat_on_real_photos(dreambench):
    paths = sorted(dreambench.glob("*/00.jpg"))
    assert len(paths) >= 4
    images = torch.stack([photo(p, 256) for p in paths])
    d = complexity_map(images, (32, 32))
    # Independent texture measure: mean squared finite difference per 8x8 cell.
    gray = images.mean(1)
    energy = F.pad((gray.diff(dim=1) ** 2)[:, :, :-1] + (gray.diff(dim=2) ** 2)[:, :-1], (0, 1, 0, 1))
    energy = F.avg_pool2d(energy[:, None], 8)[:, 0]
    for i, path in enumerate(paths):
        low, high = energy[i].flatten().quantile(torch.tensor([0.25, 0.75]))
        flat, textured = d[i][energy[i] <= low].mean(), d[i][energy[i] >= high].mean()
        assert textured > flat + 0.2, path.parent.name
    assert d.min() >= 0 and d.max() <= 1


def test_reference_complexity_by_hand():
    # Two 8x4 references on a 2x1 grid of 4x4 cells: A = two values on top, flat below (0.2, 0);
    # B = flat on top, four values below (0, 0.4).
    refs = torch.zeros(1, 2, 3, 8, 4)
    refs[0, 0, :, 0:4] = torch.tensor([0.1, 0.6, 0.1, 0.6])
    refs[0, 1, :, 4:8] = torch.tensor([0.0, 0.3, 0.6, 0.9])
    alpha = reference_complexity(refs, None, bins=32, sigma=0, grid=(2, 1))
    torch.testing.assert_close(alpha, torch.tensor([[2 / 3, 4 / 3]]))  # means 0.1, 0.2 over their mean 0.15
    top_only = torch.zeros(1, 2, 8, 4)
    top_only[..., 0:4, :] = 1  # pixel masks, pooled to the 2x1 grid given by `grid`
    alpha = reference_complexity(refs, top_only, bins=32, sigma=0, grid=(2, 1))
    torch.testing.assert_close(alpha, torch.tensor([[2.0, 0.0]]))  # foreground means 0.2, 0
    flat = torch.zeros(2, 3, 3, 8, 8)
    assert torch.equal(reference_complexity(flat, None, sigma=0, grid=(2, 2)), torch.ones(2, 3))


def test_subject_and_misalignment_maps_by_hand():
    sims = torch.tensor([[0.6, 0.2], [0.1, 0.5]]).T.reshape(1, 2, 1, 2)  # max 0.6, 0.5
    torch.testing.assert_close(subject_map(sims, 0.5, 0.1), torch.sigmoid(torch.tensor([[[1.0, 0.0]]])))
    sims_l = torch.tensor([[0.2, 0.2], [0.1, 0.9]]).T.reshape(1, 2, 1, 2)
    assignment = torch.tensor([[[0, 1]]])
    torch.testing.assert_close(misalignment_map(sims, sims_l, assignment), torch.tensor([[[0.4, 0.0]]]))
    prior = torch.tensor([[[0.0, 0.7]]])
    torch.testing.assert_close(misalignment_map(sims, sims_l, assignment, prior), torch.tensor([[[0.4, 0.7]]]))


def box_features(box, grid=(16, 16)):
    """Target features equal to the single reference feature e0 inside `box`, e1 elsewhere."""
    feats = torch.zeros(1, 4, *grid)
    feats[:, 1] = 1
    feats[:, :, box] = torch.tensor([1.0, 0, 0, 0])[:, None]
    return feats


def test_static_maps_land_on_latent_grids():
    # Subject at DINO patch rows 3..6, columns 9..11 (non-square, x != y); K = 1, unaligned: Δ = S.
    box = torch.zeros(16, 16, dtype=torch.bool)
    box[3:7, 9:12] = True
    feats = box_features(box)
    refs = torch.zeros(1, 1, 4, 2, 2)
    refs[:, :, 0] = 1
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cfg = FocusConfig()
    for side in (64, 32, 8):
        static = static_focus_maps(feats, feats, refs, None, images, images, images[:, None], (side, side), cfg)
        assert static.shape == (2, 2, side, side) and static.dtype == torch.float32
        scale = side // 16 if side >= 16 else None
        if scale:  # bilinear upsampling: the 0.5 level of the row/column profiles is the scaled box edge
            expected = box.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
            assert torch.equal(static[0, 0].amax(1) > 0.5, expected.any(1))
            assert torch.equal(static[0, 0].amax(0) > 0.5, expected.any(0))
        else:  # area downsampling: the box's 2x2 cells hold the mass
            assert static[0, 0].argmax().item() == 2 * 8 + 5


def test_identical_winner_and_loser_give_zero_structure_on_aligned_pairs():
    box = torch.zeros(16, 16, dtype=torch.bool)
    box[2:9, 5:10] = True
    feats = box_features(box)
    refs = torch.zeros(1, 1, 4, 2, 2)
    refs[:, :, 0] = 1
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    args = (feats, feats, refs, None, images, images, images[:, None], (32, 32), FocusConfig())
    aligned = static_focus_maps(*args, aligned=True)
    assert torch.equal(aligned[:, 0], torch.zeros(2, 32, 32))
    unaligned = static_focus_maps(*args, aligned=False)  # Δ = S there, not zero
    assert unaligned[:, 0].amax() > 0.9
    assert torch.equal(aligned[:, 1], unaligned[:, 1])  # the detail channel does not depend on alignment
    # pair_alignment='auto' makes a pair with a prior mask aligned: Δ = prior where s^w = s^l.
    prior = torch.zeros(1, 32, 32)
    prior[:, 4:12, 12:20] = 1
    with_prior = focus_parts(*args, prior_mask=prior)
    # K = 1: conf = best sim = box, resized to the loss grid; the prior lands on the loss grid directly (by area).
    conf = F.interpolate(box.float()[None, None], size=(32, 32), mode="bilinear")[0, 0]
    torch.testing.assert_close(with_prior["static"][:, 0], (conf * prior).expand(2, 32, 32))
    torch.testing.assert_close(with_prior["delta"][0], prior[0])


def test_a_one_cell_prior_keeps_its_whole_weight_at_its_cell():
    feats = box_features(torch.ones(4, 4, dtype=torch.bool), (4, 4))  # DINO grid 4x4, coarser than the loss grid
    refs = torch.zeros(1, 1, 4, 2, 2)
    refs[:, :, 0] = 1
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    prior = torch.zeros(1, 64, 64)
    prior[:, 24:32, 40:48] = 1  # exactly loss cell (3, 5) at 8 px per cell
    parts = focus_parts(feats, feats, refs, None, images, images, images[:, None], (8, 8), FocusConfig(),
                        prior_mask=prior)
    expected = torch.zeros(8, 8)
    expected[3, 5] = 1
    torch.testing.assert_close(parts["delta"][0], expected)
    torch.testing.assert_close(parts["static"][0, 0], expected)  # conf = 1 everywhere here


def test_reference_complexity_scales_the_detail_term_only():
    feats = box_features(torch.ones(4, 4, dtype=torch.bool), (4, 4))  # every patch matches reference 0 only
    refs = torch.zeros(1, 2, 4, 2, 2)
    refs[:, 0, 0] = 1
    refs[:, 1, 2] = 1
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    flat_and_textured = torch.stack([torch.full((3, 32, 32), 0.5), images[0]])[None]  # α = (0, 2)
    args = (feats, feats, refs, None, images, images, flat_and_textured, (4, 4))
    on = static_focus_maps(*args, FocusConfig(reference_complexity=True), aligned=False)
    off = static_focus_maps(*args, FocusConfig(reference_complexity=False), aligned=False)
    torch.testing.assert_close(on[:, 0], off[:, 0])  # a flat reference keeps its structure weight
    assert not torch.allclose(on[:, 1], off[:, 1])


def test_aligned_pairs_use_the_winner_loser_gap():
    refs = torch.zeros(1, 1, 4, 2, 2)
    refs[:, :, 0] = 1
    winner = box_features(torch.ones(16, 16, dtype=torch.bool))  # matches everywhere
    box = torch.zeros(16, 16, dtype=torch.bool)
    box[0:8, 0:16] = True
    loser = box_features(box)  # fails the reference in the bottom half
    images = torch.zeros(1, 3, 16, 16)
    static = static_focus_maps(winner, loser, refs, None, images, images, images[:, None], (16, 16),
                               FocusConfig(), aligned=torch.tensor([True]))
    # Winner: conf 1, Δ = 1 - 0 in the bottom half. Loser: conf = its best sim (0 there) → 0.
    assert torch.equal(static[0, 0], (~box).float())
    assert torch.equal(static[1, 0], torch.zeros(16, 16))


def test_schedule_by_hand():
    torch.testing.assert_close(schedule(0.5, 0.5, 0.1), torch.tensor(0.5))
    torch.testing.assert_close(schedule(torch.tensor([0.6, 0.3]), 0.5, 0.1),
                               torch.tensor([1 / (1 + math.exp(-1)), 1 / (1 + math.exp(2))]))


def test_focus_weights_by_hand():
    static = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2): structure left, detail right
    # u = center: g = 1/2 -> W = [1 + 2·½, 1 + 4·½] = [2, 3] -> / 2.5
    w = focus_weights(static, torch.tensor([0.5]), lambda_structure=2.0, lambda_detail=4.0, center=0.5, width=0.1)
    torch.testing.assert_close(w, torch.tensor([[[0.8, 1.2]]]))
    # High noise: g ≈ 1, structure dominates.
    hi = focus_weights(static, 1.0, 2.0, 4.0, center=0.5, width=0.01)
    torch.testing.assert_close(hi, torch.tensor([[[1.5, 0.5]]]))


def test_error_confidence_by_hand():
    # Mean error 1: a perfect patch is certain (1), one at twice the mean gets exp(-2).
    torch.testing.assert_close(error_confidence(torch.tensor([[[0.0, 2.0]]])), torch.tensor([[[1.0, math.exp(-2)]]]))
    assert torch.equal(error_confidence(torch.zeros(1, 2, 2)), torch.ones(1, 2, 2))  # no error: no NaN


def test_a_gate_scales_the_focus_terms_not_the_base_weight():
    static = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]]])  # structure 1 on both patches
    # u = center, λ_s = 2: W = 1 + gate·1 = [2, 1] -> / 1.5
    w = focus_weights(static, torch.tensor([0.5]), 2.0, 0.0, gate=torch.tensor([[[1.0, 0.0]]]))
    torch.testing.assert_close(w, torch.tensor([[[4 / 3, 2 / 3]]]))
    ungated = focus_weights(static, torch.tensor([0.5]), 2.0, 0.0)
    assert torch.equal(ungated, torch.ones(1, 1, 2))  # the same structure everywhere: uniform


def test_confidence_source_none_drops_the_correspondence_gate():
    feats = torch.zeros(1, 4, 4, 4)
    feats[:, :2] = 1  # every patch matches both references equally: margin 0, correspondence confidence 0
    refs = torch.zeros(1, 2, 4, 2, 2)
    refs[:, 0, 0] = 1
    refs[:, 1, 1] = 1
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    args = (feats, feats, refs, None, images, images, images[:, None].repeat(1, 2, 1, 1, 1), (4, 4))
    gated = focus_parts(*args, FocusConfig(subject_threshold=0.5), aligned=False)
    free = focus_parts(*args, FocusConfig(subject_threshold=0.5, confidence_source="none"), aligned=False)
    assert torch.equal(gated["static"], torch.zeros_like(gated["static"]))
    assert torch.equal(free["confidence"], torch.ones_like(free["confidence"]))
    torch.testing.assert_close(free["static"][:, 0], free["subject"])  # structure = S (unaligned, conf 1)
    for source in ("none", "reference_error"):  # reference_error gates per step, not in the cached maps
        other = focus_parts(*args, FocusConfig(subject_threshold=0.5, confidence_source=source), aligned=False)
        assert torch.equal(other["static"], free["static"])


def test_focus_weights_zero_lambdas_are_exactly_ones():
    static = torch.rand(4, 2, 8, 8)
    static[0, 0, 0, 0] = float("nan")
    w = focus_weights(static, torch.rand(4), 0.0, 0.0)
    assert torch.equal(w, torch.ones(4, 8, 8))


def test_focus_weights_mean_one_per_image():
    static = torch.rand(6, 2, 16, 16, generator=torch.Generator().manual_seed(0)) * 3
    w = focus_weights(static, torch.linspace(0, 1, 6), 1.5, 0.7)
    assert w.shape == (6, 16, 16) and (w > 0).all()
    torch.testing.assert_close(w.mean(dim=(1, 2)), torch.ones(6), atol=1e-6, rtol=0)


def test_mismatched_cached_grid_says_how_to_fix():
    check_cached_grid(torch.zeros(4, 2, 32, 32), (32, 32))
    with pytest.raises(ValueError, match=r"64x64 grid.*32x32.*focusdpo focus"):
        check_cached_grid(torch.zeros(4, 2, 64, 64), (32, 32))


def test_subject_masks_split_the_subject_ness_between_the_references():
    sims, subject = torch.rand(2, 3, 4, 4), torch.rand(2, 4, 4)
    masks = subject_masks(sims, subject, temperature=0.05)
    torch.testing.assert_close(masks.sum(1), subject)
    assert (masks.argmax(1) == sims.argmax(1)).all()

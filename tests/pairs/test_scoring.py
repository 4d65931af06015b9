"""Candidate scoring for pair generation."""

import pytest


def test_leakage_is_the_mean_off_diagonal_region_similarity():
    import torch

    from focusdpo.pairs.scoring import leakage

    s = torch.tensor([[[0.9, 0.3, float("nan")], [0.1, 0.8, 0.5], [0.2, 0.4, 0.7]]])
    assert leakage(s).item() == pytest.approx((0.3 + 0.1 + 0.5 + 0.2 + 0.4) / 5)
    assert leakage(torch.tensor([[[0.9]]])).item() == 0.0  # one subject: nothing to leak

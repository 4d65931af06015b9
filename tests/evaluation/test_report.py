"""The evaluation report's statistics by hand: per-prompt deltas, bootstrap intervals."""

import numpy as np
import pytest
import torch

from focusdpo.evaluation.report import bootstrap_interval, compare, paired_deltas, summarize


def test_paired_deltas_and_bootstrap_by_hand():
    records = [{"item_id": "p0", "variants": {"base": {"clip_t": 0.2}, "new": {"clip_t": 0.5}}},
               {"item_id": "p0", "variants": {"base": {"clip_t": 0.4}, "new": {"clip_t": 0.5}}},
               {"item_id": "p1", "variants": {"base": {"clip_t": 0.3}, "new": {"clip_t": 0.2}}},
               {"item_id": "p2", "variants": {"base": {"clip_t": 0.3}, "new": {"clip_t": None}}}]
    assert paired_deltas(records, "new", "base", "clip_t") == pytest.approx([0.2, -0.1])  # per prompt, p2 undefined
    assert summarize(records, ["base"])["base"]["clip_t"] == {"mean": pytest.approx(0.3), "n": 4}
    low, high = bootstrap_interval(np.array([0.2, -0.1]), 2000, seed=0)
    assert -0.1 <= low < 0.05 < high <= 0.2
    assert bootstrap_interval(np.array([0.3, 0.3]), 50, seed=0) == pytest.approx((0.3, 0.3))
    assert compare(records, ["base", "new"], 100, 0)["new"]["clip_t"]["delta"] == pytest.approx(0.05)


def bars(path, colour) -> list[int]:
    """Widths in px of the bars of ``colour`` in deltas.png, top to bottom (the whisker crosses a bar: rows a few px
    apart belong to one bar)."""
    from PIL import Image

    rows = (np.asarray(Image.open(path).convert("RGB")) == colour).all(-1).sum(1)
    widths, last = [], -10
    for y in np.nonzero(rows)[0]:
        if y - last > 3:
            widths.append(0)
        widths[-1], last = max(widths[-1], int(rows[y])), y
    return widths


def delta(value, low=None, high=None):
    return {"delta": value, "ci95": [value if low is None else low, value if high is None else high], "prompts": 8}


def test_delta_chart_shares_one_axis_and_draws_no_bar_for_a_change_that_rounds_to_zero(tmp_path):
    from focusdpo.evaluation.report import BAD, CHART_WIDTH, GOOD, delta_axis, save_delta_chart

    # the review's case: backbone_i -0.0003 had the longest red bar, twice fidelity_mean's -0.0007
    chart = save_delta_chart(tmp_path / "deltas.png", {"lora": {
        "fidelity_mean": delta(-0.0007, -0.002, 0.001), "backbone_i": delta(-0.0003, -0.0005, 0.0),
        "collapsed": delta(0.0), "ip_conf": delta(0.00002, -0.001, 0.001)}}, baseline="base")
    fidelity, backbone = bars(chart, BAD)
    assert fidelity > backbone > 0 and abs(backbone / fidelity - 3 / 7) < 0.1  # one scale: lengths compare
    assert bars(chart, GOOD) == []  # collapsed +0 and ip_conf +0.00002 (prints +0.0000) draw no bar
    axis, decimals = delta_axis([delta(-0.0007, -0.002, 0.001)], 0.01)
    assert axis == 0.01 and 0.5 * 10 ** -decimals <= axis / (CHART_WIDTH / 2)  # a 1 px bar never prints as 0
    assert delta_axis([delta(0.3, 0.1, 0.42)], 0.01)[0] == 0.5  # the axis covers every interval end

    counts = save_delta_chart(tmp_path / "counts.png", {"lora": {"fidelity_mean": delta(0.004),
                                                                 "subject_count": delta(0.5)}})
    score, count = bars(counts, GOOD)
    assert score == round(0.004 / 0.01 * CHART_WIDTH / 2) and count == CHART_WIDTH // 2  # an axis per metric group


def test_prompt_row_prints_the_prompt_outlines_regions_and_shows_the_change():
    from focusdpo.evaluation.report import TILE, prompt_row
    from focusdpo.visualize import LINE_HEIGHT, PALETTE, TITLE_HEIGHT, rgb

    base = torch.full((3, 32, 32), 0.5)
    lora = base.clone()
    lora[:, :8, :8] = 1.0  # the LoRA changed the top-left corner
    regions = torch.zeros(2, 4, 4, dtype=torch.bool)
    regions[0, 0, 0] = True  # subject 0 found in the top-left cell, subject 1 not found
    row = prompt_row("a dog and a can", torch.rand(2, 3, 16, 16), {"base": (base, regions), "lora": (lora, None)})
    top = LINE_HEIGHT + TITLE_HEIGHT
    assert row.width == TILE * 5  # two references, two variants, |lora - base|
    pixels = np.asarray(row.convert("RGB"))
    assert (pixels[:LINE_HEIGHT, :200] < 100).any()  # the prompt, written
    assert tuple(row.getpixel((2 * TILE, top))) == rgb(PALETTE[0])  # the region's outline, on the tile's border
    change = row.crop((4 * TILE, top, 5 * TILE, top + TILE))
    assert change.getpixel((10, 10))[0] > 200 > change.getpixel((10, 10))[2]  # changed: red
    assert change.getpixel((100, 60))[2] > 200 > change.getpixel((100, 60))[0]  # unchanged: blue

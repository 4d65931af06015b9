"""The PIL pictures: focus panels, image grids and the before/after grid, and the training curves (metrics.png):
written, of the documented size, with the maps, scales and reference lines where they belong."""

import numpy as np
import torch
from PIL import Image

from focusdpo.visualize import BAR_HEIGHT, TITLE_HEIGHT, save_focus_panel


def test_save_focus_panel_writes_png_of_expected_size(tmp_path):
    g = torch.Generator().manual_seed(0)
    winner, loser = torch.rand(3, 64, 48, generator=g), torch.rand(3, 64, 48, generator=g)
    refs = torch.rand(3, 3, 40, 40, generator=g)
    assignment = torch.randint(0, 3, (8, 6), generator=g)
    weights = {u: 1 + torch.rand(8, 6, generator=g) for u in (0.1, 0.5, 0.9)}
    path = save_focus_panel(tmp_path / "panels" / "pair0.png", winner, loser, refs, assignment,
                            torch.rand(8, 6, generator=g), torch.rand(8, 6, generator=g), weights, tile=64)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.size == (64 * (7 + 3 + 3), 64 + TITLE_HEIGHT + BAR_HEIGHT)  # colour bars under the maps


def test_assignment_panel_uses_one_colour_per_reference(tmp_path):
    winner = torch.zeros(3, 32, 32)
    assignment = torch.zeros(4, 4, dtype=torch.long)
    assignment[:, 2:] = 1  # right half assigned to reference 1
    path = save_focus_panel(tmp_path / "p.png", winner, winner, torch.rand(2, 3, 32, 32), assignment,
                            torch.ones(4, 4), torch.zeros(4, 4), {}, tile=32)
    with Image.open(path) as image:
        assert image.size == (32 * 9, 32 + TITLE_HEIGHT + BAR_HEIGHT)
        subject_panel = 5  # winner, loser, |winner - loser|, ref 0, ref 1, subject
        left = image.getpixel((subject_panel * 32 + 8, TITLE_HEIGHT + 16))
        right = image.getpixel((subject_panel * 32 + 24, TITLE_HEIGHT + 16))
    assert left != right and left != (0, 0, 0) and right != (0, 0, 0)


def panel_pixel(image, panel: int, x: int, y: int, tile: int):
    return image.getpixel((panel * tile + x, TITLE_HEIGHT + y))


def test_focus_panel_shows_the_difference_the_prior_colour_bars_and_the_prompt(tmp_path):
    from focusdpo.visualize import LINE_HEIGHT, pair_facts

    tile = 32
    winner = torch.full((3, 32, 32), 0.5)
    loser = winner.clone()
    loser[:, :16, :16] = 0.0  # the repainted region: top left
    prior = torch.zeros(32, 32)
    prior[:, 16:] = 1.0  # the prior marks the right half
    weights = {0.9: torch.ones(4, 4), 0.1: torch.full((4, 4), 2.0)}
    facts = pair_facts({"pair_id": "p7", "prompt": "a cat", "margin": 0.25})
    assert facts == "pair p7 · margin (winner - loser score): +0.25"
    path = save_focus_panel(tmp_path / "p.png", winner, loser, torch.rand(1, 3, 32, 32), torch.zeros(4, 4),
                            torch.zeros(4, 4), torch.ones(4, 4), weights, tile=tile, caption="features: cnn",
                            prior=prior, prompt="a cat on a mat", facts=facts)
    with Image.open(path) as image:
        image = image.convert("RGB")
        # winner, loser, |w - l|, ref 0, subject, prior, confidence, complexity, W u=0.9, W u=0.1; three text lines
        assert image.size == (tile * 10, TITLE_HEIGHT + tile + BAR_HEIGHT + 3 * LINE_HEIGHT)
        changed, unchanged = panel_pixel(image, 2, 4, 4, tile), panel_pixel(image, 2, 28, 28, tile)
        assert changed[0] > 200 > changed[2] and unchanged[2] > 200 > unchanged[0]  # red where it changed, else blue
        inside, outside = panel_pixel(image, 5, 28, 16, tile), panel_pixel(image, 5, 4, 16, tile)
        assert inside[0] > outside[0] and inside[2] < outside[2]  # the prior's half is hot
        bar_y = tile + 3 + 4  # inside the 8 px gradient of the colour bars
        for panel in (2, 5, 6, 7, 8, 9):  # every colour-coded panel has its bar: blue (low) .. red (high)
            low, high = panel_pixel(image, panel, 5, bar_y, tile), panel_pixel(image, panel, tile - 6, bar_y, tile)
            assert low[2] > 200 > low[0] and high[0] > 200 > high[2], panel
        for panel in (0, 1, 3, 4):  # photos, references and the assignment have none
            assert panel_pixel(image, panel, tile // 2, bar_y, tile) == (255, 255, 255), panel
        text = np.asarray(image.crop((0, TITLE_HEIGHT + tile + BAR_HEIGHT, image.width, image.height)))
        assert all((text[i * LINE_HEIGHT:(i + 1) * LINE_HEIGHT] < 100).any() for i in range(3))  # three text lines

    no_prior = save_focus_panel(tmp_path / "q.png", winner, loser, torch.rand(1, 3, 32, 32), torch.zeros(4, 4),
                                torch.zeros(4, 4), torch.ones(4, 4), weights, tile=tile)
    with Image.open(no_prior) as image:
        assert image.size == (tile * 10, TITLE_HEIGHT + tile + BAR_HEIGHT)
        assert panel_pixel(image.convert("RGB"), 5, 16, 16, tile) == (209, 209, 209)  # "prior mask: none", grey
    assert "not stored" in pair_facts({"pair_id": "p"})


def test_image_grid_label_column_fits_its_longest_label():
    from PIL import ImageDraw

    from focusdpo.visualize import image_grid

    cells = [[Image.new("RGB", (8, 8), "red")] * 2]
    label = "a label far longer than eighty pixels"
    grid = image_grid(cells, [label], min_cell=16, titles=["a", "b"])
    width = ImageDraw.Draw(grid).textlength(label)
    assert grid.size[0] >= width + 2 * 16 and grid.size[1] == 16 + TITLE_HEIGHT
    assert image_grid(cells, ["x"], min_cell=16).size == (80 + 32, 16)  # short labels keep the old layout


def test_before_after_grid_draws_the_change_on_one_scale():
    from focusdpo.visualize import before_after_grid

    before = [Image.new("RGB", (16, 16), (100, 100, 100)) for _ in range(2)]
    after = [before[0].copy(), before[1].copy()]
    after[1].putpixel((15, 15), (200, 100, 100))  # one pixel of the second prompt changes
    grid = before_after_grid(before, after, ["a cat", "a dog"], min_cell=32).convert("RGB")
    label_w = grid.width - 3 * 32
    assert label_w >= 80
    diff = grid.crop((label_w + 64, TITLE_HEIGHT, label_w + 96, TITLE_HEIGHT + 64))
    assert diff.getpixel((31, 63))[0] > 200 > diff.getpixel((31, 63))[2]  # the changed pixel: red (the maximum)
    assert diff.getpixel((5, 5))[2] > 200 > diff.getpixel((5, 5))[0]  # everything else, first row included: blue
    from focusdpo.visualize import LINE_HEIGHT

    same = before_after_grid(before[:1], before[:1], ["a cat"], min_cell=32)
    changed = before_after_grid(before[1:], after[1:], ["a cat"], min_cell=32)
    assert same.height == changed.height + LINE_HEIGHT  # identical samples get a line that says so


def write_metrics(run, lines):
    import json

    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def reference_row(image, panel: int, value: float, values: list[float]):
    """The pixel row of ``value`` in ``panel`` of metrics.png, as its fraction of pixels in the reference colour."""
    from focusdpo.training.plot import MARGIN, PANEL, REFERENCE_COLOUR, span

    lo, hi = span(values)
    top, bottom = MARGIN["top"], PANEL[1] - MARGIN["bottom"]
    y = round(bottom - (value - lo) / (hi - lo) * (bottom - top)) + (panel // 2) * PANEL[1]
    x0, x1 = (panel % 2) * PANEL[0] + MARGIN["left"] + 2, (panel % 2 + 1) * PANEL[0] - MARGIN["right"] - 2
    row = np.asarray(image.convert("RGB"))[y, x0:x1]
    return (row == REFERENCE_COLOUR).all(-1).mean()


def test_metrics_png_draws_ln2_on_the_loss_and_zero_on_the_margins(tmp_path):
    import math

    from focusdpo.training.plot import plot_run

    margins = [-1.0, 1.0, -0.5]
    write_metrics(tmp_path, [{"step": s, "loss": loss, "rewards/margins": m, "rewards/chosen": m / 2,
                              "rewards/rejected": -m / 2, "rewards/accuracies": a}
                             for s, loss, m, a in zip((1, 2, 3), (0.9, 1.0, 0.95), margins, (0.0, 1.0, 1.0))])
    with Image.open(plot_run(tmp_path)) as image:
        assert reference_row(image, 0, math.log(2), [0.9, 1.0, 0.95, math.log(2)]) > 0.9  # ln 2, though out of data
        assert reference_row(image, 1, 0.0, margins + [0.0]) > 0.9  # the margins' zero line
        assert reference_row(image, 1, 0.5, margins + [0.0]) < 0.1  # and no such line elsewhere
        assert reference_row(image, 2, 0.5, [0.0, 1.0, 1.0, 0.5]) > 0.9  # chance accuracy


def test_a_metric_missing_from_a_log_line_breaks_its_curve():
    from focusdpo.training.plot import nice_ticks, segments

    points = [(1, 0.1), (2, 0.2), (4, 0.4)]
    assert segments(points, [1, 2, 3, 4]) == [[(1, 0.1), (2, 0.2)], [(4, 0.4)]]  # step 3 lacks it: no bridge
    assert segments(points, [1, 2, 4]) == [points]
    assert nice_ticks(-1.1, 1.1) == [-1.0, -0.5, 0.0, 0.5, 1.0]

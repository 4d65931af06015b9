"""Focus-panel PNGs: written, of the documented size, with the maps where they belong."""

import torch
from PIL import Image

from focusdpo.visualize import TITLE_HEIGHT, save_focus_panel


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
        assert image.size == (64 * (5 + 3 + 3), 64 + TITLE_HEIGHT)


def test_assignment_panel_uses_one_colour_per_reference(tmp_path):
    winner = torch.zeros(3, 32, 32)
    assignment = torch.zeros(4, 4, dtype=torch.long)
    assignment[:, 2:] = 1  # right half assigned to reference 1
    path = save_focus_panel(tmp_path / "p.png", winner, winner, torch.rand(2, 3, 32, 32), assignment,
                            torch.ones(4, 4), torch.zeros(4, 4), {}, tile=32)
    with Image.open(path) as image:
        assert image.size == (32 * 7, 32 + TITLE_HEIGHT)
        subject_panel = 4  # winner, loser, ref 0, ref 1, subject
        left = image.getpixel((subject_panel * 32 + 8, TITLE_HEIGHT + 16))
        right = image.getpixel((subject_panel * 32 + 24, TITLE_HEIGHT + 16))
    assert left != right and left != (0, 0, 0) and right != (0, 0, 0)

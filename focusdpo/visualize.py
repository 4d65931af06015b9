"""Focus-map PNG panels (PIL only): one row per pair to eyeball what the focus weights attend to."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from focusdpo.images import to_pil

TITLE_HEIGHT = 14

# One colour per reference (up to 6 references, then the palette repeats).
PALETTE = torch.tensor([(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)],
                       dtype=torch.float32) / 255


def _fit(image: torch.Tensor, tile: int) -> torch.Tensor:
    """``(3, H, W)`` or ``(h, w)`` -> ``(3 or 1, tile, tile)`` float; maps keep their blocky cells."""
    x = image.detach().float().cpu()
    x = x[None] if x.ndim == 2 else x
    mode = "nearest" if x.shape[0] == 1 else "bilinear"
    return F.interpolate(x[None], size=(tile, tile), mode=mode)[0]


def _heat(values: torch.Tensor) -> torch.Tensor:
    """``(1, H, W)`` in [0, 1] -> ``(3, H, W)`` blue (low) -> yellow -> red (high)."""
    v = values.clamp(0, 1)
    return torch.cat([(2 * v).clamp(max=1), 1 - (2 * v - 1).abs(), (1 - 2 * v).clamp(min=0)])


def _overlay(base: torch.Tensor, colour: torch.Tensor, alpha: float = 0.55) -> torch.Tensor:
    return (1 - alpha) * base + alpha * colour


def save_focus_panel(path, winner: torch.Tensor, loser: torch.Tensor, references, assignment: torch.Tensor,
                     confidence: torch.Tensor, complexity: torch.Tensor, weights_by_u: dict[float, torch.Tensor],
                     tile: int = 128, caption: str | None = None) -> Path:
    """Write one pair's focus panel as a PNG.

    Args:
        winner, loser: ``(3, H, W)`` in [0, 1]; references: ``(K, 3, Hr, Wr)`` or a list of ``(3, Hr, Wr)``.
        assignment: ``(h, w)`` long reference index; confidence, complexity: ``(h, w)`` in [0, 1].
        weights_by_u: noise level u -> ``(h, w)`` focus weights W (one panel each, shared colour scale).
        tile: side of each square panel in pixels.

    Returns:
        The path. The image is ``tile · (5 + K + len(weights_by_u))`` wide and ``tile + 14`` high:
        winner, loser, references (framed in their assignment colour), assignment, confidence,
        complexity, then W at each u, maps overlaid on the winner. A ``caption`` (e.g. which
        features made the maps) adds a 14 px line below.
    """
    base = _fit(winner, tile)
    palette = PALETTE[torch.arange(len(references)) % len(PALETTE)]  # (K, 3)
    colours = palette[assignment.long().cpu()].permute(2, 0, 1)  # (3, h, w)
    w_max = max((float(w.max()) for w in weights_by_u.values()), default=1.0)
    panels = [("winner", base), ("loser", _fit(loser, tile))]
    panels += [(f"ref {k}", _fit(ref, tile)) for k, ref in enumerate(references)]
    panels += [("subject", _overlay(base, _fit(colours, tile))),
               ("confidence", _overlay(base, _heat(_fit(confidence, tile)))),
               ("complexity", _overlay(base, _heat(_fit(complexity, tile))))]
    # One colour scale for every u, so weights at different noise levels compare directly.
    panels += [(f"W u={u:.2f} max {float(w.max()):.1f}", _overlay(base, _heat(_fit(w, tile) / max(w_max, 1e-12))))
               for u, w in sorted(weights_by_u.items(), reverse=True)]
    caption_height = TITLE_HEIGHT if caption else 0
    canvas = Image.new("RGB", (tile * len(panels), tile + TITLE_HEIGHT + caption_height), "white")
    draw = ImageDraw.Draw(canvas)
    if caption:
        draw.text((2, tile + TITLE_HEIGHT + 1), caption, fill="black")
    for i, (title, image) in enumerate(panels):
        canvas.paste(to_pil(image), (i * tile, TITLE_HEIGHT))
        draw.text((i * tile + 2, 1), title, fill="black")
    for k in range(len(references)):
        x0 = (2 + k) * tile
        colour = tuple(int(c * 255) for c in palette[k])
        draw.rectangle([x0, TITLE_HEIGHT, x0 + tile - 1, TITLE_HEIGHT + tile - 1], outline=colour, width=3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def image_grid(rows: list[list], labels: list[str], min_cell: int = 128):
    """Rows of PIL images, upscaled (nearest) to at least ``min_cell`` px, each row labelled on the left."""
    cell = max(min_cell, rows[0][0].width)
    label_w = 80
    grid = Image.new("RGB", (label_w + cell * len(rows[0]), cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (row, label) in enumerate(zip(rows, labels)):
        draw.text((6, r * cell + cell // 2), label, fill="black")
        for c, image in enumerate(row):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (label_w + c * cell, r * cell))
    return grid

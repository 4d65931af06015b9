"""PNG pictures drawn with PIL only: focus-map panels, labelled image grids, colour bars, difference maps.

Every colour-coded map comes with a colour bar that prints the values of its two ends, and every difference is
printed as a number beside its picture, so a reader never has to guess what a colour or a blank tile means.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from focusdpo.images import to_pil, to_tensor

TITLE_HEIGHT = 14
LINE_HEIGHT = 14  # one line of caption text
BAR_HEIGHT = 26  # a colour bar: an 8 px gradient and its end values under it
NO_MAP = (0.82, 0.82, 0.82)  # the grey of a map the pair does not have

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


def rgb(colour: torch.Tensor) -> tuple[int, int, int]:
    return tuple(int(c * 255) for c in colour)


def number(value: float) -> str:
    """A colour bar's end value: short, and never rounded to 0 when it is not 0."""
    return "0" if value == 0 else f"{value:.3g}"


def difference_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a - b|`` of two ``(3, H, W)`` images in [0, 1], averaged over the channels -> ``(H, W)``."""
    return (a.detach().float().cpu() - b.detach().float().cpu()).abs().mean(0)


def heat_tile(values: torch.Tensor, high: float, size: int) -> Image.Image:
    """An ``(h, w)`` map as a ``size`` px heat tile, 0 blue .. ``high`` red (the colour bar's scale)."""
    return to_pil(_heat(_fit(values, size) / max(high, 1e-12)))


def draw_colour_bar(canvas: Image.Image, x: int, y: int, width: int, low: float, high: float) -> None:
    """The heat scale as a gradient ``width`` px wide at ``(x, y)``, with ``low`` and ``high`` printed under its ends."""
    width = max(width, 2)
    ramp = torch.linspace(0, 1, width)[None, None].expand(1, 8, width)
    canvas.paste(to_pil(_heat(ramp)), (x, y))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([x, y, x + width - 1, y + 7], outline="#555555")
    high_text = number(high)
    draw.text((x, y + 10), number(low), fill="black")
    draw.text((x + width - draw.textlength(high_text), y + 10), high_text, fill="black")


def wrap(text: str, width_px: int) -> list[str]:
    """``text`` in lines that fit ``width_px`` of the default font (about 6 px a character)."""
    return textwrap.wrap(text, width=max(20, width_px // 6 - 1)) or [""]


def write_lines(canvas: Image.Image, lines: list[str], y: int, x: int = 4) -> None:
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((x, y + i * LINE_HEIGHT + 1), line, fill="black")


def pair_facts(row: dict) -> str:
    """What the pair data says about a pair's preference: its id, margin, weight, soft label, subject scores."""
    facts = [f"pair {row.get('pair_id', '?')}"]
    margin = row.get("margin")
    facts.append("margin (winner - loser score): " + ("not stored" if margin is None else f"{float(margin):+.4g}"))
    for key, name in (("pair_weight", "pair weight"), ("preference", "preference p")):
        if row.get(key) is not None:
            facts.append(f"{name} {float(row[key]):.3g}")
    if row.get("subject_scores") is not None:
        chosen, rejected = (", ".join(f"{float(s):.2f}" for s in side) for side in row["subject_scores"])
        facts.append(f"subject scores winner [{chosen}] loser [{rejected}]")
    return " · ".join(facts)


def save_focus_panel(path, winner: torch.Tensor, loser: torch.Tensor, references, assignment: torch.Tensor,
                     confidence: torch.Tensor, complexity: torch.Tensor, weights_by_u: dict[float, torch.Tensor],
                     tile: int = 128, caption: str | None = None, prior: torch.Tensor | None = None,
                     prompt: str | None = None, facts: str | None = None) -> Path:
    """Write one pair's focus panel as a PNG.

    Args:
        winner, loser: ``(3, H, W)`` in [0, 1]; references: ``(K, 3, Hr, Wr)`` or a list of ``(3, Hr, Wr)``.
        assignment: ``(h, w)`` long reference index; confidence, complexity: ``(h, w)`` in [0, 1].
        weights_by_u: noise level u -> ``(h, w)`` focus weights W (one panel each, shared colour scale).
        tile: side of each square panel in pixels.
        prior: the pair's ``(H, W)`` prior mask in [0, 1] (where the pair differs), or None (drawn grey, "none").
        prompt, facts, caption: text lines under the panels (the prompt wrapped; e.g. :func:`pair_facts`; which
            features made the maps).

    Returns:
        The path. The image is ``tile · (7 + K + len(weights_by_u))`` wide: winner, loser, |winner - loser|,
        references (framed in their assignment colour), assignment, prior mask, confidence, complexity, then W at
        each u, maps overlaid on the winner. It is ``TITLE_HEIGHT + tile + BAR_HEIGHT`` high, plus
        ``LINE_HEIGHT`` per text line: under every colour-coded panel a colour bar prints its scale's ends.
    """
    base = _fit(winner, tile)
    palette = PALETTE[torch.arange(len(references)) % len(PALETTE)]  # (K, 3)
    colours = palette[assignment.long().cpu()].permute(2, 0, 1)  # (3, h, w)
    w_max = max((float(w.max()) for w in weights_by_u.values()), default=1.0)
    change = difference_map(winner, loser)
    change_max = float(change.max())
    panels = [("winner", base, None), ("loser", _fit(loser, tile), None),
              ("|winner - loser|", _heat(_fit(change, tile) / max(change_max, 1e-12)), (0.0, change_max))]
    panels += [(f"ref {k}", _fit(ref, tile), None) for k, ref in enumerate(references)]
    panels += [("subject", _overlay(base, _fit(colours, tile)), None)]
    panels += [("prior mask: none", torch.tensor(NO_MAP)[:, None, None].expand(3, tile, tile), None) if prior is None
               else ("prior mask", _overlay(base, _heat(_fit(prior, tile))), (0.0, 1.0))]
    panels += [("confidence", _overlay(base, _heat(_fit(confidence, tile))), (0.0, 1.0)),
               ("complexity", _overlay(base, _heat(_fit(complexity, tile))), (0.0, 1.0))]
    # One colour scale for every u, so weights at different noise levels compare directly.
    panels += [(f"W u={u:.2f} max {float(w.max()):.1f}", _overlay(base, _heat(_fit(w, tile) / max(w_max, 1e-12))),
                (0.0, w_max)) for u, w in sorted(weights_by_u.items(), reverse=True)]
    width = tile * len(panels)
    lines = (wrap(f"prompt: {prompt}", width) if prompt else []) + [t for t in (facts, caption) if t]
    canvas = Image.new("RGB", (width, TITLE_HEIGHT + tile + BAR_HEIGHT + LINE_HEIGHT * len(lines)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, image, scale) in enumerate(panels):
        canvas.paste(to_pil(image), (i * tile, TITLE_HEIGHT))
        draw.text((i * tile + 2, 1), title, fill="black")
        if scale is not None:
            draw_colour_bar(canvas, i * tile + 3, TITLE_HEIGHT + tile + 3, tile - 6, *scale)
    for k in range(len(references)):
        x0 = (3 + k) * tile
        draw.rectangle([x0, TITLE_HEIGHT, x0 + tile - 1, TITLE_HEIGHT + tile - 1], outline=rgb(palette[k]), width=3)
    write_lines(canvas, lines, TITLE_HEIGHT + tile + BAR_HEIGHT)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def image_grid(rows: list[list], labels: list[str], min_cell: int = 128, titles: list[str] | None = None):
    """Rows of PIL images, upscaled (nearest) to at least ``min_cell`` px, each row labelled on the left (the label
    column as wide as the longest label line); ``titles`` adds a line of column titles above the images."""
    cell = max(min_cell, rows[0][0].width)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max([80] + [int(probe.textlength(line)) + 12 for label in labels for line in label.split("\n")])
    top = TITLE_HEIGHT if titles else 0
    grid = Image.new("RGB", (label_w + cell * max(len(row) for row in rows), top + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(titles or []):
        draw.text((label_w + c * cell + 2, 1), title, fill="black")
    for r, (row, label) in enumerate(zip(rows, labels)):
        draw.text((6, top + r * cell + cell // 2 - 6), label, fill="black")
        for c, image in enumerate(row):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (label_w + c * cell, top + r * cell))
    return grid


def before_after_grid(before: list[Image.Image], after: list[Image.Image], prompts: list[str],
                      names: tuple[str, str] = ("reference", "trained"), min_cell: int = 128) -> Image.Image:
    """One row per prompt: the ``before`` sample, the ``after`` sample (same seed) and ``|after - before|`` as a
    heat map on one scale for every row (its colour bar under the grid); each row's label prints the mean and the
    largest pixel change (pixels in [0, 1]), the prompts are written under the grid."""
    changes = [difference_map(to_tensor(a.convert("RGB")), to_tensor(b.convert("RGB"))) for b, a in zip(before, after)]
    high = max((float(c.max()) for c in changes), default=0.0)
    cell = max(min_cell, before[0].width)
    rows = [[b, a, heat_tile(c, high, cell)] for b, a, c in zip(before, after, changes)]
    labels = [f"prompt {i}\n|change| mean {float(c.mean()):.4f}\nmax {float(c.max()):.4f}"
              for i, c in enumerate(changes)]
    grid = image_grid(rows, labels, min_cell, titles=[*names, f"|{names[1]} - {names[0]}|"])
    lines = [part for i, prompt in enumerate(prompts) for part in wrap(f"{i}: {prompt}", grid.width)]
    if high == 0:
        lines.insert(0, f"the {names[1]} samples are identical to the {names[0]} samples, pixel for pixel")
    out = Image.new("RGB", (grid.width, grid.height + BAR_HEIGHT + LINE_HEIGHT * len(lines) + 4), "white")
    out.paste(grid, (0, 0))
    draw_colour_bar(out, grid.width - cell + 3, grid.height + 3, cell - 6, 0.0, high)
    write_lines(out, lines, grid.height + BAR_HEIGHT)
    return out

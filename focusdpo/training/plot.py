"""``focusdpo plot runs/X``: the training curves of a run from its ``metrics.jsonl``, as one PNG.

For users without a tracker. Drawn with PIL (already a dependency; matplotlib is not one): loss, the
reward margins (with the chosen/rejected rewards), the preference accuracy and the margins per quarter
of the noise range (``rewards/margins_u…``), each on round ticks with its reference line: ln 2 on the loss (what a
policy that learned no preference scores), 0 on the margins, 0.5 (chance) on the accuracy.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from focusdpo.atomic import save_png
from focusdpo.errors import RunFolderError

PANEL = (520, 320)

MARGIN = dict(left=70, right=16, top=34, bottom=40)

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")

PANELS = (  # title, metric names (a trailing * takes every metric with that prefix)
    ("loss", ("loss",)),
    ("reward margins", ("rewards/margins", "rewards/chosen", "rewards/rejected")),
    ("preference accuracy", ("rewards/accuracies",)),
    ("margins per noise level u", ("rewards/margins_u*",)),
)


Series = dict[str, list[tuple[float, float]]]

# Reference lines per panel: (value, label). The DPO loss is ln 2 when the policy and the reference agree (margin
# 0); a margin's sign says which image the policy prefers; an accuracy of 0.5 is chance.
REFERENCE_LINES = {
    "loss": ((math.log(2), "ln 2: no preference learned"),),
    "reward margins": ((0.0, "0"),),
    "preference accuracy": ((0.5, "0.5: chance"),),
    "margins per noise level u": ((0.0, "0"),),
}
REFERENCE_COLOUR = (120, 120, 120)
GRID_COLOUR = (232, 232, 232)


def read_training_logs(run: Path) -> list[dict]:
    """The training lines of ``run/metrics.jsonl`` (those with a ``loss``)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run}: give the output_dir of a focusdpo training run")
    logs, garbled = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            logs.append(json.loads(line)) if line.strip() else None
        except json.JSONDecodeError:
            garbled.append(number)  # e.g. the half-written last line of a killed run
    skipped = (f"skipped {len(garbled)} line(s) that are not JSON (line {garbled[0]}"
               f"{', ...' if len(garbled) > 1 else ''})") if garbled else ""
    logs = [entry for entry in logs if isinstance(entry, dict) and "loss" in entry and "step" in entry]
    if not logs:
        raise RunFolderError(f"{path} holds no training log lines yet (no 'loss'{'; ' + skipped if skipped else ''}): "
                             "plot after the first logging step, or give the output_dir of another run")
    if skipped:
        print(f"[focusdpo] {path}: {skipped}", file=sys.stderr)
    return logs


def select_series(logs: list[dict], names: tuple[str, ...]) -> Series:
    """``{metric: [(step, value), ...]}`` for the named metrics (``prefix*`` matches by prefix)."""
    keys = []
    for name in names:
        if name.endswith("*"):
            keys += sorted({k for entry in logs for k in entry if k.startswith(name[:-1])})
        else:
            keys.append(name)
    return {key: [(entry["step"], entry[key]) for entry in logs if key in entry] for key in keys
            if any(key in entry for entry in logs)}


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round values (1, 2 or 5 x 10^n apart) inside ``[lo, hi]``, at most ``count`` of them (at least 2)."""
    raw = (hi - lo) / max(count - 1, 1)
    exponent = 10.0 ** math.floor(math.log10(raw))
    step = next(m * exponent for m in (1, 2, 5, 10) if m * exponent >= raw)
    first = math.ceil(lo / step)
    return [round(i * step, 12) for i in range(first, math.floor(hi / step) + 1)]


def segments(values: list[tuple[float, float]], steps: list[float] | None) -> list[list[tuple[float, float]]]:
    """``values`` cut where a logged step lacks the metric (e.g. a noise quarter with no sample in a window), so a
    line never bridges a gap; without ``steps`` one segment."""
    if not steps:
        return [values]
    position = {step: i for i, step in enumerate(steps)}
    out: list[list[tuple[float, float]]] = []
    for point in values:
        if out and position.get(point[0], -2) == position.get(out[-1][-1][0], -9) + 1:
            out[-1].append(point)
        else:
            out.append([point])
    return out


def line_chart(series: Series, title: str, size: tuple[int, int] = PANEL, references=(), steps=None):
    """One panel: axes with round ticks and grid lines, the ``references`` ``(value, label)`` as grey lines (always in
    range), a line per series (cut where a logged step lacks it, see ``steps``) and a legend; an empty panel says
    so."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN["left"], 10), title, fill="black")
    box = (MARGIN["left"], MARGIN["top"], size[0] - MARGIN["right"], size[1] - MARGIN["bottom"])
    points = [p for values in series.values() for p in values]
    if not points:
        draw.rectangle(box, outline="#888888")
        draw.text((box[0] + 10, box[1] + 10), "not logged in this run", fill="#888888")
        return image
    (x0, x1), (y0, y1) = span([p[0] for p in points]), span([p[1] for p in points] + [v for v, _ in references])

    def to_pixel(x, y):
        return (box[0] + (x - x0) / (x1 - x0) * (box[2] - box[0]), box[3] - (y - y0) / (y1 - y0) * (box[3] - box[1]))

    for tick in nice_ticks(y0, y1):
        y = round(to_pixel(x0, tick)[1])
        draw.line([box[0], y, box[2], y], fill=GRID_COLOUR)
        text = f"{tick:.4g}"
        draw.text((box[0] - 6 - draw.textlength(text), y - 6), text, fill="black")
    for tick in nice_ticks(x0, x1):
        x = round(to_pixel(tick, y0)[0])
        draw.line([x, box[3], x, box[3] + 4], fill="black")
        text = f"{tick:g}"
        draw.text((x - draw.textlength(text) / 2, box[3] + 6), text, fill="black")
    draw.text((box[2] - 30, box[3] + 20), "step", fill="black")
    for value, label in references:
        y = round(to_pixel(x0, value)[1])
        draw.line([box[0] + 1, y, box[2] - 1, y], fill=REFERENCE_COLOUR)
        draw.text((box[2] - 4 - draw.textlength(label), y - 13), label, fill=REFERENCE_COLOUR)
    draw.rectangle(box, outline="#888888")
    for i, (name, values) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        for part in segments(values, steps):
            pixels = [to_pixel(x, y) for x, y in part]
            if len(pixels) > 1:
                draw.line(pixels, fill=colour, width=2)
            for px, py in pixels:
                draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        draw.text((box[0] + 8, box[1] + 6 + 12 * i), name, fill=colour)
    return image


def span(values: list[float]) -> tuple[float, float]:
    """Axis range of ``values``, widened when flat so every point still has a place."""
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    return lo - pad, hi + pad


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    """Write the four panels of ``run``'s curves into one PNG (default ``run/metrics.png``); returns its path."""
    from PIL import Image

    run = Path(run)
    logs = read_training_logs(run)
    steps = [entry["step"] for entry in logs]
    panels = [line_chart(select_series(logs, names), title, references=REFERENCE_LINES.get(title, ()), steps=steps)
              for title, names in PANELS]
    sheet = Image.new("RGB", (2 * PANEL[0], 2 * PANEL[1]), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, ((i % 2) * PANEL[0], (i // 2) * PANEL[1]))
    return save_png(sheet, Path(out) if out else run / "metrics.png")

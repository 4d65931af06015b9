"""The evaluation report: JSON with every per-sample score, a Markdown table with bootstrap intervals, PNGs.

Deltas are paired: per prompt, the mean over its images of (variant - base), then the mean over prompts;
the 95 % interval resamples prompts with replacement (seeded, so a rerun writes the same bytes).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageOps

from focusdpo.atomic import atomic_write_text, save_png
from focusdpo.images import to_pil
from focusdpo.visualize import (
    BAR_HEIGHT,
    LINE_HEIGHT,
    PALETTE,
    TITLE_HEIGHT,
    difference_map,
    draw_colour_bar,
    heat_tile,
    rgb,
    wrap,
    write_lines,
)

# Scalar per-sample scores, in report order; "collapsed" (0/1 per sample) averages to the collapse rate.
SCALAR_METRICS = ("fidelity_mean", "fidelity_min", "ip_conf", "collapsed", "subject_count", "backbone_i", "dino",
                  "clip_i", "clip_t")

LOWER_IS_BETTER = ("collapsed",)

DIGITS = 6  # rounding in the JSON: stable bytes, far below any meaningful difference

TILE = 128


def rounded(value):
    if isinstance(value, float):
        return round(value, DIGITS)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value


def metric_values(records: list[dict], variant: str, metric: str) -> list[float]:
    return [r["variants"][variant][metric] for r in records
            if variant in r["variants"] and r["variants"][variant].get(metric) is not None]


def summarize(records: list[dict], variants: list[str]) -> dict:
    """``{variant: {metric: {"mean", "n"}}}`` over samples where the metric is defined."""
    out = {}
    for variant in variants:
        out[variant] = {}
        for metric in SCALAR_METRICS:
            values = metric_values(records, variant, metric)
            if values:
                out[variant][metric] = {"mean": float(np.mean(values)), "n": len(values)}
    return out


def paired_deltas(records: list[dict], variant: str, baseline: str, metric: str) -> np.ndarray:
    """Per-prompt mean of (variant - baseline) over the images where both have the metric, sorted by prompt id."""
    by_prompt: dict[str, list[float]] = {}
    for r in records:
        scores = r["variants"]
        a, b = scores.get(variant, {}).get(metric), scores.get(baseline, {}).get(metric)
        if a is not None and b is not None:
            by_prompt.setdefault(r["item_id"], []).append(a - b)
    return np.array([np.mean(by_prompt[k]) for k in sorted(by_prompt)])


def bootstrap_interval(deltas: np.ndarray, samples: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``deltas`` over ``samples`` resamples of the prompts."""
    rng = np.random.default_rng(seed)
    means = deltas[rng.integers(0, len(deltas), size=(samples, len(deltas)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def compare(records: list[dict], variants: list[str], samples: int, seed: int) -> dict:
    """``{variant: {metric: {"delta", "ci95", "prompts"}}}`` of every variant against the first (the baseline)."""
    baseline, out = variants[0], {}
    for variant in variants[1:]:
        out[variant] = {}
        for metric in SCALAR_METRICS:
            deltas = paired_deltas(records, variant, baseline, metric)
            if len(deltas):
                out[variant][metric] = {"delta": float(deltas.mean()), "prompts": len(deltas),
                                        "ci95": list(bootstrap_interval(deltas, samples, seed))}
    return out


def markdown(report: dict) -> str:
    """Tables of the report: per variant, baseline vs variant, delta and its 95 % interval per metric."""
    variants, summary = report["variants"], report["summary"]
    baseline = variants[0]
    lines = [f"# Evaluation: {report['benchmark']['file']}", "",
             f"{report['counts']['prompts']} prompts, {report['counts']['samples']} samples scored; "
             f"{report['counts']['skipped_entries']} benchmark entries and {report['counts']['skipped_images']} "
             "images skipped (missing files, listed in report.json).", "",
             "Extractors: " + "; ".join(f"{k}: {v}" for k, v in sorted(report["extractors"].items())), ""]
    for variant in variants[1:] or variants:
        lines += [f"| metric | {baseline} | {variant} | Δ | 95 % CI | prompts |", "|---|---|---|---|---|---|"]
        for metric in SCALAR_METRICS:
            if metric not in summary[baseline]:
                continue
            base = summary[baseline][metric]["mean"]
            other = summary.get(variant, {}).get(metric, {}).get("mean")
            delta = report["deltas"].get(variant, {}).get(metric)
            name = metric + (" (lower is better)" if metric in LOWER_IS_BETTER else "")
            cells = [f"{base:.4f}", "–" if other is None else f"{other:.4f}"]
            cells += ["–", "–", "0"] if delta is None else [
                f"{delta['delta']:+.4f}", f"[{delta['ci95'][0]:+.4f}, {delta['ci95'][1]:+.4f}]", str(delta["prompts"])]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_report(out: Path, cfg, model_cfg, extractors: dict, variants: list[str], prompt_set, records: list[dict],
                 skipped_images: list[dict], items) -> dict:
    """Write report.json, report.md and deltas.png into ``out``; returns the report."""
    records = sorted(records, key=lambda r: (r["item_id"], r["image"]))
    skipped_images = sorted(skipped_images, key=lambda s: (s["item_id"], s["image"], s["variant"]))
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "output_dir"}  # where, not what
    report = {
        "benchmark": {"file": Path(cfg.benchmark).name, "layout": prompt_set.layout, "entries":
                      len(prompt_set.items) + len(prompt_set.skipped), "evaluated": len(items),
                      "skipped_entries": [{"item_id": i, "reason": r} for i, r in prompt_set.skipped]},
        "model": {"family": model_cfg.family, "pretrained_path": model_cfg.pretrained_path,
                  "personalization_lora": model_cfg.personalization_lora},
        "extractors": extractors, "settings": settings, "variants": variants,
        "counts": {"prompts": len({r["item_id"] for r in records}), "samples": len(records),
                   "skipped_entries": len(prompt_set.skipped), "skipped_images": len(skipped_images)},
        "summary": summarize(records, variants),
        "deltas": compare(records, variants, cfg.bootstrap_samples, cfg.seed),
        "skipped_images": skipped_images, "samples": records,
    }
    report = rounded(report)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, sort_keys=True) + "\n")
    atomic_write_text(out / "report.md", markdown(report))
    if report["deltas"]:
        save_delta_chart(out / "deltas.png", report["deltas"], variants[0])
    return report


def tile_of(image: torch.Tensor, size: int = TILE) -> Image.Image:
    """``(3, H, W)`` in [0, 1] -> a ``size`` x ``size`` RGB tile."""
    return to_pil(image).resize((size, size), Image.BICUBIC)


def overlay_regions(tile: Image.Image, regions: torch.Tensor | None) -> Image.Image:
    """Tint each subject's ``(h, w)`` region of ``(K, h, w)`` in its palette colour (overlaps mix) and outline it in
    full colour, so a region shows even on a busy image."""
    if regions is None:
        return tile
    out = tile
    for k, region in enumerate(regions):
        colour = Image.new("RGB", tile.size, rgb(PALETTE[k % len(PALETTE)]))
        mask = Image.fromarray(region.cpu().numpy().astype(np.uint8) * 255).resize(tile.size, Image.NEAREST)
        inner = ImageOps.expand(mask, 3).filter(ImageFilter.MinFilter(7)).crop((3, 3, 3 + tile.width, 3 + tile.height))
        edge = ImageChops.subtract(mask, inner)  # the region's 3 px rim, along the tile's border too
        out = Image.composite(colour, out, mask.point(lambda v: v * 90 // 255))
        out = Image.composite(colour, out, edge)
    return out


def save_prompt_grid(path: Path, prompt: str, references: torch.Tensor, shown: dict,
                     groups: list[list[int]] | None = None) -> Path:
    """:func:`prompt_row` as a PNG."""
    return save_png(prompt_row(prompt, references, shown, groups), path)


def region_title(name: str, regions: torch.Tensor | None) -> str:
    if regions is None:
        return name
    found = sum(bool(region.any()) for region in regions)
    return f"{name}: {found}/{len(regions)} found"


def prompt_row(prompt: str, references: torch.Tensor, shown: dict, groups: list[list[int]] | None = None) -> Image.Image:
    """One row under its prompt: the references framed in their subject's colour | each variant with its subjects'
    regions tinted and outlined (the title counts the subjects found) | ``|variant - first variant|`` for every
    other variant, as heat maps on one scale (colour bar under them) with the mean pixel change printed on each;
    a legend line at the bottom.

    ``references``: ``(V, 3, S, S)`` views; ``groups``: the view indices of each subject (default one each);
    ``shown``: variant -> (image ``(3, H, W)``, regions ``(K, h, w)`` or None), regions in subject order.
    """
    groups = groups or [[v] for v in range(len(references))]
    subject_of = {v: k for k, views in enumerate(groups) for v in views}
    names = list(shown)
    changes = {name: difference_map(shown[name][0], shown[names[0]][0]) for name in names[1:]
               if shown[name][0].shape == shown[names[0]][0].shape}
    high = max((float(c.max()) for c in changes.values()), default=0.0)
    panels = [(f"subject {subject_of[v]}", tile_of(r)) for v, r in enumerate(references)]
    panels += [(region_title(name, regions), overlay_regions(tile_of(image), regions))
               for name, (image, regions) in shown.items()]
    panels += [(f"|{name} - {names[0]}|", heat_tile(change, high, TILE)) for name, change in changes.items()]
    width = TILE * len(panels)
    head = wrap(prompt, width)
    legend = wrap("frame: the subject's colour; tint and outline: the patches matched to that subject"
                  + ("; |a - b|: pixel change (pixels in [0, 1]), mean printed on the tile" if changes else ""), width)
    top = LINE_HEIGHT * len(head) + TITLE_HEIGHT
    bar = BAR_HEIGHT if changes else 0
    canvas = Image.new("RGB", (width, top + TILE + bar + LINE_HEIGHT * len(legend)), "white")
    draw = ImageDraw.Draw(canvas)
    write_lines(canvas, head, 0, x=2)
    for i, (title, tile) in enumerate(panels):
        canvas.paste(tile, (i * TILE, top))
        draw.text((i * TILE + 2, top - TITLE_HEIGHT + 1), title, fill="black")
    for v in range(len(references)):
        colour = rgb(PALETTE[subject_of[v] % len(PALETTE)])
        draw.rectangle([v * TILE, top, (v + 1) * TILE - 1, top + TILE - 1], outline=colour, width=3)
    first = len(panels) - len(changes)
    for i, change in enumerate(changes.values()):
        x = (first + i) * TILE
        text = f"mean {float(change.mean()):.4f}"
        draw.rectangle([x + 2, top + TILE - 15, x + 6 + draw.textlength(text), top + TILE - 2], fill="white")
        draw.text((x + 4, top + TILE - 14), text, fill="black")
    if changes:
        draw_colour_bar(canvas, first * TILE + 3, top + TILE + 3, len(changes) * TILE - 6, 0.0, high)
    write_lines(canvas, legend, top + TILE + bar, x=2)
    return canvas


# deltas.png: metrics on the same scale share one axis; a metric group's axis is printed above its rows.
DELTA_GROUPS = (  # title, metrics, the smallest half-range of the axis (a change worth seeing)
    ("scores and rates (0-1 scale)", ("fidelity_mean", "fidelity_min", "ip_conf", "collapsed", "backbone_i", "dino",
                                      "clip_i", "clip_t"), 0.01),
    ("subjects found (count)", ("subject_count",), 0.1),
)
GOOD, BAD = (60, 160, 80), (200, 70, 60)
ROW, LABEL_WIDTH, CHART_WIDTH = 20, 330, 400


def nice_ceil(value: float) -> float:
    """The smallest of 1, 2, 5 x 10^n that is >= ``value`` (> 0)."""
    exponent = 10.0 ** np.floor(np.log10(value))
    return next(float(m * exponent) for m in (1, 2, 5, 10) if m * exponent >= value * (1 - 1e-9))


def delta_axis(entries: list[dict], floor: float) -> tuple[float, int]:
    """The half-range of a group's axis (covers every delta and interval end, at least ``floor``) and the decimals
    its numbers are printed with: enough that any change long enough to draw (1 px) does not print as 0."""
    top = max([floor, 1e-9] + [abs(v) for d in entries for v in (d["delta"], *d["ci95"])])
    axis = nice_ceil(top)
    return axis, max(2, int(np.ceil(np.log10(CHART_WIDTH / 4 / axis))))


def delta_groups(deltas: dict) -> list[tuple[str, float, list]]:
    """``(title, floor, [(variant, metric, delta), ...])`` per metric group present; unknown metrics get their own."""
    rows = [(variant, metric, d) for variant, per in deltas.items() for metric, d in per.items()]
    known = {m for _, metrics, _ in DELTA_GROUPS for m in metrics}
    groups = [(title, floor, [r for r in rows if r[1] in metrics]) for title, metrics, floor in DELTA_GROUPS]
    groups += [(metric, 0.0, [r for r in rows if r[1] == metric])
               for metric in dict.fromkeys(r[1] for r in rows if r[1] not in known)]
    return [g for g in groups if g[2]]


def save_delta_chart(path: Path, deltas: dict, baseline: str = "baseline") -> Path:
    """Horizontal bars of each metric's delta (variant - baseline) with its 95 % interval as a whisker.

    Metrics on the same scale share one axis (:data:`DELTA_GROUPS`), its ticks printed above the group's rows, so
    bar lengths compare within a group; each axis spans at least the group's floor, so a tiny change draws a tiny
    bar. Numbers are printed with enough decimals that a drawn bar never reads 0, and a delta that rounds to 0
    draws no bar.
    """
    groups = delta_groups(deltas)
    head = [f"change vs {baseline}: bar = mean over prompts of (variant - {baseline}), whisker = its 95 % CI",
            "green: better, red: worse (collapsed: lower is better); no bar: a change that rounds to 0"]
    height = LINE_HEIGHT * len(head) + 4 + sum(2 * ROW + ROW * len(rows) for _, _, rows in groups)
    canvas = Image.new("RGB", (LABEL_WIDTH + CHART_WIDTH + 70, height), "white")
    draw = ImageDraw.Draw(canvas)
    write_lines(canvas, head, 2)
    centre, half = LABEL_WIDTH + 20 + CHART_WIDTH // 2, CHART_WIDTH // 2
    y = LINE_HEIGHT * len(head) + 4 + ROW // 2
    for title, floor, rows in groups:
        axis, decimals = delta_axis([d for _, _, d in rows], floor)
        y = draw_delta_axis(draw, y, title, axis, decimals, centre, half, len(rows))
        for variant, metric, d in rows:
            draw_delta_row(draw, y, variant, metric, d, axis, decimals, centre, half)
            y += ROW
        y += ROW // 2
    return save_png(canvas, path)


def draw_delta_axis(draw, y: int, title: str, axis: float, decimals: int, centre: int, half: int, rows: int) -> int:
    """A group's title, its axis with ticks at -axis, -axis/2, 0, axis/2, axis, and grid lines through its rows."""
    draw.text((4, y + 2), title, fill="black")
    base = y + ROW + 2
    draw.line([centre - half, base, centre + half, base], fill="black")
    for fraction in (-1, -0.5, 0, 0.5, 1):
        x = centre + fraction * half
        text = "0" if fraction == 0 else f"{fraction * axis:+.{decimals}f}"
        draw.text((x - draw.textlength(text) / 2, y + 4), text, fill="black")
        draw.line([x, base - 3, x, base], fill="black")
        draw.line([x, base + 1, x, base + ROW * rows], fill="#777777" if fraction == 0 else "#e4e4e4")
    return base + 1


def draw_delta_row(draw, y: int, variant: str, metric: str, d: dict, axis: float, decimals: int, centre: int,
                   half: int) -> None:
    delta = round(d["delta"], decimals)
    name = metric + (" (lower better)" if metric in LOWER_IS_BETTER else "")
    low, high = d["ci95"]
    draw.text((4, y + 4), f"{variant}: {name} {delta:+.{decimals}f}  [{low:+.{decimals}f}, {high:+.{decimals}f}]",
              fill="black")
    if delta != 0:
        good = (delta < 0) == (metric in LOWER_IS_BETTER)
        length = max(1.0, abs(d["delta"]) / axis * half)
        x = centre + length * np.sign(delta)
        draw.rectangle([min(centre, x), y + 5, max(centre, x) - (1 if x > centre else 0), y + ROW - 6],
                       fill=GOOD if good else BAD)
    lo, hi = (centre + c / axis * half for c in (low, high))
    middle = y + ROW // 2 - 1
    draw.line([lo, middle, hi, middle], fill="black")
    for x in (lo, hi):
        draw.line([x, middle - 3, x, middle + 3], fill="black")

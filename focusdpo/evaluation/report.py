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
from PIL import Image, ImageDraw

from focusdpo.atomic import atomic_write_text, save_png
from focusdpo.images import to_pil
from focusdpo.visualize import PALETTE

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
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, sort_keys=True) + "\n")
    atomic_write_text(out / "report.md", markdown(report))
    if report["deltas"]:
        save_delta_chart(out / "deltas.png", report["deltas"])
    return report


def tile_of(image: torch.Tensor, size: int = TILE) -> Image.Image:
    """``(3, H, W)`` in [0, 1] -> a ``size`` x ``size`` RGB tile."""
    return to_pil(image).resize((size, size), Image.BICUBIC)


def overlay_regions(tile: Image.Image, regions: torch.Tensor | None) -> Image.Image:
    """Tint each subject's ``(h, w)`` region of ``(K, h, w)`` in its palette colour (overlaps mix)."""
    if regions is None:
        return tile
    out = tile
    for k, region in enumerate(regions):
        colour = tuple(int(c * 255) for c in PALETTE[k % len(PALETTE)])
        mask = Image.fromarray(region.cpu().numpy().astype(np.uint8) * 110).resize(tile.size, Image.NEAREST)
        out = Image.composite(Image.new("RGB", tile.size, colour), out, mask)
    return out


def save_prompt_grid(path: Path, prompt: str, references: torch.Tensor, shown: dict,
                     groups: list[list[int]] | None = None) -> Path:
    """:func:`prompt_row` as a PNG."""
    return save_png(prompt_row(prompt, references, shown, groups), path)


def prompt_row(prompt: str, references: torch.Tensor, shown: dict, groups: list[list[int]] | None = None) -> Image.Image:
    """One row: the references framed in their subject's colour | each variant with its regions tinted.

    ``references``: ``(V, 3, S, S)`` views; ``groups``: the view indices of each subject (default one each);
    ``shown``: variant -> (image ``(3, H, W)``, regions ``(K, h, w)`` or None), regions in subject order.
    """
    groups = groups or [[v] for v in range(len(references))]
    subject_of = {v: k for k, views in enumerate(groups) for v in views}
    panels = [(f"subject {subject_of[v]}", tile_of(r)) for v, r in enumerate(references)]
    panels += [(name, overlay_regions(tile_of(image), regions)) for name, (image, regions) in shown.items()]
    canvas = Image.new("RGB", (TILE * len(panels), TILE + 28), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), prompt[:120], fill="black")
    for i, (title, tile) in enumerate(panels):
        canvas.paste(tile, (i * TILE, 28))
        draw.text((i * TILE + 2, 14), title, fill="black")
    for v in range(len(references)):
        colour = tuple(int(c * 255) for c in PALETTE[subject_of[v] % len(PALETTE)])
        draw.rectangle([v * TILE, 28, (v + 1) * TILE - 1, 28 + TILE - 1], outline=colour, width=3)
    return canvas


def save_delta_chart(path: Path, deltas: dict, width: int = 640) -> Path:
    """Horizontal bars of each metric's delta (variant - baseline) with its 95 % interval as a whisker.

    Each metric row has its own scale (metrics differ in range): the bar spans half the row width at
    the largest |delta| or interval end of that metric.
    """
    rows = [(variant, metric, d) for variant, per in deltas.items() for metric, d in per.items()]
    row_h, label_w = 22, 220
    canvas = Image.new("RGB", (width, row_h * (len(rows) + 1)), "white")
    draw = ImageDraw.Draw(canvas)
    centre = label_w + (width - label_w) // 2
    half = (width - label_w) // 2 - 10
    draw.text((4, 4), "delta vs baseline (bar) and 95 % CI (whisker)", fill="black")
    for i, (variant, metric, d) in enumerate(rows, start=1):
        y = i * row_h
        scale = half / max(abs(d["delta"]), *map(abs, d["ci95"]), 1e-12)
        good = (d["delta"] < 0) == (metric in LOWER_IS_BETTER)
        x = centre + d["delta"] * scale
        draw.rectangle([min(centre, x), y + 5, max(centre, x), y + row_h - 5],
                       fill=(60, 160, 80) if good else (200, 70, 60))
        lo, hi = (centre + c * scale for c in d["ci95"])
        draw.line([lo, y + row_h // 2, hi, y + row_h // 2], fill="black", width=1)
        draw.text((4, y + 4), f"{variant}: {metric} {d['delta']:+.3f}", fill="black")
        draw.line([centre, y, centre, y + row_h], fill="grey")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path

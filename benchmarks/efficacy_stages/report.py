"""The report: per-arm means ± std over seeds, paired bootstrap intervals of the gain over vanilla DPO, the
focus-weight statistics from each run's ``metrics.jsonl``, and the sample PNGs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

METRICS = ("fidelity", "leakage", "missing", "extra")
BASELINE = "dpo"


def read_scores(path: Path) -> dict[str, np.ndarray]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    return {m: np.array([r[m] for r in rows], float) for m in METRICS}


def focus_statistics(metrics_file: Path) -> dict[str, float]:
    """Mean over logged steps of ``focus/entropy`` and of ``focus/max`` / ``focus/mean`` (absent: NaN)."""
    lines = metrics_file.read_text().splitlines() if metrics_file.is_file() else []
    rows = [row for row in map(json.loads, filter(None, lines)) if "focus/entropy" in row]
    if not rows:
        return {"entropy": math.nan, "max_over_mean": math.nan}
    return {"entropy": float(np.mean([r["focus/entropy"] for r in rows])),
            "max_over_mean": float(np.mean([r["focus/max"] / r["focus/mean"] for r in rows]))}


def paired_bootstrap(arm: list[np.ndarray], base: list[np.ndarray], draws: int, seed: int) -> tuple[float, float]:
    """95 % interval of mean(arm − base), scenes resampled (the same indices in every seed: paired by scene)."""
    arm = arm * len(base) if len(arm) == 1 else arm  # the base model: one sample set for every seed
    diffs = np.stack([a - b for a, b in zip(arm, base)])  # (seeds, scenes)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, diffs.shape[1], (draws, diffs.shape[1]))
    means = diffs[:, index].mean(axis=(0, 2))
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def cell(values: list[float], scale: float = 100.0) -> str:
    return f"{np.mean(values) * scale:.1f} ± {np.std(values) * scale:.1f}"


def finished_seeds(evals: Path, arm: str, seeds: list[int]) -> list[int]:
    """The seeds whose sample set exists (an interrupted study reports what it has); the base model: seed 0's."""
    wanted = seeds[:1] if arm == "base" else seeds
    return [s for s in wanted if (evals / arm / f"seed{s}" / "scores.jsonl").is_file()]


def gain_cell(arm: dict, base: dict, metric: str, draws: int) -> tuple[str, bool]:
    """``[low, high]`` of the paired bootstrap over the seeds both have, and whether it counts (issue rule:
    |mean gain| ≥ 3 points and the interval excludes zero)."""
    shared = [s for s in arm if s in base]
    if not shared:
        return "–", False
    arm_scores = [arm[s][metric] for s in shared]
    low, high = paired_bootstrap(arm_scores, [base[s][metric] for s in shared], draws, 0)
    gain = float(np.mean([a.mean() - base[s][metric].mean() for a, s in zip(arm_scores, shared)]))
    counts = abs(gain) >= 0.03 and (low > 0 or high < 0)
    return f"[{low * 100:+.1f}, {high * 100:+.1f}]" + (" **" if counts else ""), counts


def arm_rows(evals: Path, arms: list[str], seeds: list[int], draws: int) -> list[str]:
    """One table row per arm with at least one finished sample set."""
    scores = {a: {s: read_scores(evals / a / f"seed{s}" / "scores.jsonl") for s in finished_seeds(evals, a, seeds)}
              for a in arms}
    lines = []
    for arm in (a for a in arms if scores[a]):
        means = {m: [float(v[m].mean()) for v in scores[arm].values()] for m in METRICS}
        # the base model is sampled once: it is paired with every dpo seed
        paired = {s: next(iter(scores[arm].values())) for s in scores.get(BASELINE, {})} if arm == "base" \
            else scores[arm]
        gains = [gain_cell(paired, scores.get(BASELINE, {}), m, draws)[0] if arm != BASELINE else "–"
                 for m in ("fidelity", "leakage")]
        lines.append(f"| {arm} | {len(scores[arm])} | {cell(means['fidelity'])} | {cell(means['leakage'])} | "
                     f"{cell(means['missing'])} | {cell(means['extra'], 1.0)} | {gains[0]} | {gains[1]} |")
    return lines


def focus_rows(runs: Path, arms: list[str], seeds: list[int]) -> list[str]:
    lines = []
    for arm in arms:
        stats = [focus_statistics(runs / arm / f"seed{s}" / "run" / "metrics.jsonl") for s in seeds
                 if (runs / arm / f"seed{s}" / "run").is_dir()]
        if not stats:
            continue
        entropy, ratio = (np.nanmean([s[k] for s in stats]) if not all(math.isnan(s[k]) for s in stats) else math.nan
                          for k in ("entropy", "max_over_mean"))
        if math.isnan(entropy):  # no focus weights logged: uniform W (vanilla DPO, SFT)
            lines.append(f"| {arm} | – (uniform) | – |")
        else:
            lines.append(f"| {arm} | {entropy:.3f} | {ratio:.2f} |")
    return lines


def samples_figure(evals: Path, arms: list[str], seed: int, out: Path) -> None:
    """One PNG: the references, then each arm's samples of the same held-out scenes (same noise)."""
    from focusdpo.visualize import image_grid

    from .evaluation import tiles_of
    from .world import SIZE

    shown = [a for a in arms if (evals / a / f"seed{seed}" / "strip.png").is_file()]  # the base model: seeds[0]
    if not shown:
        return
    rows = [tiles_of(evals / shown[0] / f"seed{seed}" / "references.png", SIZE)]
    rows += [tiles_of(evals / a / f"seed{seed}" / "strip.png", SIZE) for a in shown]
    image_grid(rows, ["references", *shown], min_cell=64).save(out / "samples.png")


def write_report(out: Path, root: Path, arms: list[str], seeds: list[int], todo: dict, settings: dict) -> None:
    evaluated = ["base"] + arms
    samples_figure(root / "eval", evaluated, seeds[0], out)
    accuracy = json.loads((root / "judge" / "accuracy.json").read_text())
    lines = ["# Efficacy study", "", f"Settings: `{json.dumps(settings, sort_keys=True)}`", "",
             f"Judge, exact identity per subject: {accuracy['renders'] * 100:.1f} % on clean renders, "
             f"{accuracy['reconstructions'] * 100:.1f} % on VAE reconstructions (check it on samples by eye).", "",
             f"Held-out scenes scored by the judge; mean ± std over each arm's finished seeds (column `seeds`, of "
             f"{seeds}; percent; extra: subjects per scene). Gain intervals: paired bootstrap 95 % of the arm minus "
             "vanilla DPO (`dpo`), scenes resampled.",
             "A gain counts (marked **) only if it is at least 3 points and its interval excludes zero.",
             "", "| arm | seeds | fidelity | leakage | missing | extra | Δ fidelity vs dpo | Δ leakage vs dpo |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |",
             *arm_rows(root / "eval", evaluated, seeds, settings["bootstrap_draws"]), "",
             "Focus weights during training (mean over logged steps; uniform weights: entropy 1, max/mean 1):", "",
             "| arm | focus/entropy | max/mean |", "| --- | --- | --- |", *focus_rows(root / "arms", arms, seeds), "",
             *(["Not run:", "", *(f"- `{name}`: {why}" for name, why in todo.items()), ""] if todo else []),
             f"All arms on the first held-out scenes (seed {seeds[0]}, the same noise): [samples.png](samples.png). "
             "Per arm: " + ", ".join(
                 f"[{a}](../eval/{a}/seed{seeds[0]}/samples.png)" for a in evaluated
                 if (root / "eval" / a / f"seed{seeds[0]}" / "samples.png").is_file()), ""]
    (out / "report.md").write_text("\n".join(lines))

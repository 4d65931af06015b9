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


def gain_interval(arm: dict, base: dict, metric: str, draws: int) -> tuple[float, float, float, int] | None:
    """(mean gain, 95 % low, high, seeds) of ``arm`` over ``base`` (seed → scores) over the seeds both have."""
    shared = [s for s in arm if s in base]
    if not shared:
        return None
    arm_scores = [arm[s][metric] for s in shared]
    low, high = paired_bootstrap(arm_scores, [base[s][metric] for s in shared], draws, 0)
    gain = float(np.mean([a.mean() - base[s][metric].mean() for a, s in zip(arm_scores, shared)]))
    return gain, low, high, len(shared)


def counts(gain: float, low: float, high: float, seeds: int, min_seeds: int) -> bool:
    """The issue's rule: |mean gain| ≥ 3 points and the interval excludes zero, over at least ``min_seeds`` seeds."""
    return abs(gain) >= 0.03 and (low > 0 or high < 0) and seeds >= min_seeds


def gain_cell(arm: dict, base: dict, metric: str, draws: int, min_seeds: int = 1) -> tuple[str, bool]:
    """``[low, high]`` of the paired bootstrap over the seeds both have, and whether it counts."""
    interval = gain_interval(arm, base, metric, draws)
    if interval is None:
        return "–", False
    gain, low, high, seeds = interval
    counted = counts(gain, low, high, seeds, min_seeds)
    return f"[{low * 100:+.1f}, {high * 100:+.1f}]" + (" **" if counted else ""), counted


def arm_scores(evals: Path, arms: list[str], seeds: list[int], baseline: str) -> dict[str, dict]:
    """arm → seed → scores, for every arm with a finished sample set and the baseline."""
    scores = {a: {s: read_scores(evals / a / f"seed{s}" / "scores.jsonl") for s in finished_seeds(evals, a, seeds)}
              for a in {*arms, baseline}}
    return {a: v for a, v in scores.items() if v or a == baseline}


def paired_with(scores: dict, arm: str, baseline: str) -> dict:
    """The arm's scores by seed; the base model is sampled once, so it is paired with every seed of the baseline."""
    if arm == "base":
        return {s: next(iter(scores[arm].values())) for s in scores.get(baseline, {})}
    return scores[arm]


def arm_rows(evals: Path, arms: list[str], seeds: list[int], draws: int, baseline: str = BASELINE,
             min_seeds: int = 1) -> list[str]:
    """One table row per arm with at least one finished sample set; gains against ``baseline``."""
    scores = arm_scores(evals, arms, seeds, baseline)
    lines = []
    for arm in (a for a in arms if scores.get(a)):
        means = {m: [float(v[m].mean()) for v in scores[arm].values()] for m in METRICS}
        paired = paired_with(scores, arm, baseline)
        gains = [gain_cell(paired, scores.get(baseline, {}), m, draws, min_seeds)[0] if arm != baseline else "–"
                 for m in ("fidelity", "leakage")]
        lines.append(f"| {arm} | {len(scores[arm])} | {cell(means['fidelity'])} | {cell(means['leakage'])} | "
                     f"{cell(means['missing'])} | {cell(means['extra'], 1.0)} | {gains[0]} | {gains[1]} |")
    return lines


def effect_rows(evals: Path, arms: list[str], seeds: list[int], draws: int, baseline: str,
                min_seeds: int) -> list[tuple]:
    """(arm, {metric: (gain, low, high, counts)}) per arm but the baseline, gains in points, for the effects figure."""
    scores, rows = arm_scores(evals, arms, seeds, baseline), []
    for arm in (a for a in arms if a != baseline and a in scores):
        found = {m: gain_interval(paired_with(scores, arm, baseline), scores[baseline], m, draws)
                 for m in ("fidelity", "leakage")}
        if all(found.values()):
            seeds_shown = "1 sample set" if arm == "base" else found["fidelity"][3]
            rows.append((f"{arm} ({seeds_shown})", {m: (*(100 * v for v in g[:3]), counts(*g, min_seeds))
                                                               for m, g in found.items()}))
    return rows


def effects_figure(blocks: list[tuple[str, list[tuple]]], out: Path, rule: float = 3.0) -> None:
    """A forest plot: per arm, the paired 95 % interval (line) and mean (dot) of its gain over a baseline, fidelity
    and leakage side by side on one scale; the grey band is the ±3 points a difference must exceed to count, and a
    difference that counts is drawn in red. ``blocks``: (title, :func:`effect_rows`) per baseline."""
    from PIL import Image, ImageDraw

    rows = [row for _, block in blocks for row in block]
    if not rows:
        return
    span = max(5.0, *(max(abs(g[1]), abs(g[2])) for _, gains in rows for g in gains.values()))
    span = float(np.ceil(span))
    label_w, panel_w, row_h, top = 190, 300, 20, 34
    height = top + row_h * (len(rows) + len(blocks)) + 24
    image = Image.new("RGB", (label_w + 2 * panel_w + 50, height), "white")
    draw = ImageDraw.Draw(image)
    def to_x(panel: int, value: float) -> float:  # panel 0: fidelity, 1: leakage
        return label_w + panel * (panel_w + 40) + (value + span) / (2 * span) * panel_w

    titles = ("fidelity gain (points, higher is better)", "leakage gain (points, lower is better)")
    for k, title in enumerate(titles):
        draw.text((to_x(k, -span), 2), title, fill="black")
        draw.rectangle([to_x(k, -rule), top - 6, to_x(k, rule), height - 22], fill=(232, 232, 232))
        draw.line([to_x(k, 0), top - 6, to_x(k, 0), height - 22], fill=(120, 120, 120))
        for tick in range(-int(span), int(span) + 1):
            draw.line([to_x(k, tick), height - 22, to_x(k, tick), height - 18], fill="black")
            if tick % max(1, int(span) // 5) == 0:
                draw.text((to_x(k, tick) - 6, height - 16), f"{tick:+d}" if tick else "0", fill="black")
    y = top
    for title, block in blocks:
        draw.text((4, y), title, fill=(90, 90, 90))
        y += row_h
        for label, gains in block:
            draw.text((12, y - 6), label, fill="black")
            for k, metric in enumerate(("fidelity", "leakage")):
                gain, low, high, counted = gains[metric]
                colour = (200, 30, 30) if counted else (20, 20, 20)
                draw.line([to_x(k, low), y, to_x(k, high), y], fill=colour, width=2)
                draw.ellipse([to_x(k, gain) - 3, y - 3, to_x(k, gain) + 3, y + 3], fill=colour)
            y += row_h
    image.save(out / "effects.png")


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


# ---- round 2 (issue 25) ------------------------------------------------------------------------------------------
TRAINING_METRICS = ("rewards/accuracies", "subject/accuracy", "subject/labelled", "subject/label_disagrees",
                    "subject/mask_coverage", "mse/winner_drift")


def logged_means(metrics_file: Path, last: float = 1.0) -> dict[str, float]:
    """Mean over the logged steps (the last ``last`` share of them) of each of TRAINING_METRICS (absent: NaN)."""
    lines = metrics_file.read_text().splitlines() if metrics_file.is_file() else []
    rows = [row for row in map(json.loads, filter(None, lines)) if "loss" in row or "subject/accuracy" in row]
    rows = rows[int(len(rows) * (1 - last)):]
    return {name: float(np.mean([r[name] for r in rows if name in r])) if any(name in r for r in rows) else math.nan
            for name in TRAINING_METRICS}


def training_rows(runs: Path, arms: list[str], seeds: list[int]) -> list[str]:
    """Per arm, means over seeds of the training metrics (winner drift: over the last quarter of the steps)."""
    lines = []
    for arm in arms:
        files = [runs / arm / f"seed{s}" / "run" / "metrics.jsonl" for s in seeds]
        files = [f for f in files if f.is_file()]
        if not files:
            continue
        whole = [logged_means(f) for f in files]
        tail = [logged_means(f, 0.25) for f in files]
        values = {k: np.nanmean([w[k] for w in whole]) if not all(math.isnan(w[k]) for w in whole) else math.nan
                  for k in TRAINING_METRICS}
        drift = [t["mse/winner_drift"] for t in tail if not math.isnan(t["mse/winner_drift"])]
        values["mse/winner_drift"] = float(np.mean(drift)) if drift else math.nan
        shown = ["–" if math.isnan(values[k]) else (f"{values[k] * 100:.1f}" if k != "mse/winner_drift" and
                 k != "subject/mask_coverage" else f"{values[k]:.3g}") for k in TRAINING_METRICS]
        lines.append(f"| {arm} | {len(files)} | " + " | ".join(shown) + " |")
    return lines


def stage_times(root: Path) -> list[str]:
    """Every finished stage's wall time (``done.json``), in the order they finished."""
    markers = sorted((p for p in root.rglob(MARKER_NAME) if "report" not in p.relative_to(root).parts),
                     key=lambda p: p.stat().st_mtime)
    lines = []
    for marker in markers:
        record = json.loads(marker.read_text())
        note = " (resumed; this attempt)" if record.get("resumed") else ""
        lines.append(f"| {record['stage']} | {record['seconds']:.0f}{note} |")
    return lines


MARKER_NAME = "done.json"


def pct(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value * 100:.1f}"


def agreement_lines(agreement: dict) -> list[str]:
    names = {"scorer": "scorer pairs (features' labels)", "oracle": "oracle pairs (judge's labels)"}
    lines = [("| pair set | pairs | subjects | labelled | label opposes image label | features label | judge labels | "
              "both label | features = judge (both labelled) | judge opposes image label | judge prefers chosen / "
              "ties / rejected |"), "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, title in names.items():
        a = agreement[key]
        lines.append(f"| {title} | {a['pairs']} | {a['subjects']} | {pct(a['labelled'])} | "
                     f"{pct(a['label_disagrees'])} | {pct(a['features_labelled'])} | {pct(a['judge_labelled'])} | "
                     f"{pct(a['both_labelled'])} | {pct(a['agree'])} | {pct(a['judge_disagrees_with_image'])} | "
                     f"{pct(a['judge_prefers_chosen'])} / {pct(a['judge_ties'])} / {pct(a['judge_prefers_rejected'])} |")
    return lines


def budget_lines(choice: dict) -> list[str]:
    lines = [("| point | lr | steps | rank | β | pairs | Δ fidelity | Δ leakage | Δ missing | Δ extra | drifted | "
              "qualifies |"), "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in choice["points"]:
        g = p["gain"]
        mark = " (held)" if p["name"] == choice["chosen"] else ""
        lines.append(f"| {p['name']}{mark} | {p['arm_lr']:g} | {p['arm_steps']} | {p['lora_rank']} | {p['beta']:g} | "
                     f"{choice['arm_pairs']} | {g['fidelity'] * 100:+.1f} | {g['leakage'] * 100:+.1f} | "
                     f"{g['missing'] * 100:+.1f} | {g['extra']:+.2f} | {p['drifted']} | {p['qualifies']} |")
    return lines


def round_rows(evals: Path, chains: list[str], seeds: list[int], draws: int) -> list[str]:
    """Second round minus first round of each chain, paired by seed and scene."""
    lines = []
    for chain in chains:
        first = {s: read_scores(evals / chain / f"seed{s}" / "scores.jsonl") for s in finished_seeds(evals, chain, seeds)}
        second = {s: read_scores(evals / f"{chain}_r2" / f"seed{s}" / "scores.jsonl")
                  for s in finished_seeds(evals, f"{chain}_r2", seeds)}
        if not second:
            continue
        cells = [gain_cell(second, first, m, draws, MIN_SEEDS)[0] for m in ("fidelity", "leakage")]
        lines.append(f"| {chain}_r2 − {chain} | {len([s for s in second if s in first])} | {cells[0]} | {cells[1]} |")
    return lines


TABLE_HEAD = ["| arm | seeds | fidelity | leakage | missing | extra | Δ fidelity vs {b} | Δ leakage vs {b} |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]


MIN_SEEDS = 3  # round 2's rule: a difference counts only over at least this many seeds


def head(baseline: str) -> list[str]:
    return [h.format(b=baseline) for h in TABLE_HEAD]


def pairs_section(root: Path) -> list[str]:
    agreement_file = root / "agreement" / "agreement.json"
    if not agreement_file.is_file():
        return ["Not finished yet.", ""]
    agreement = json.loads(agreement_file.read_text())
    return [("Percent of subjects (labelled: the scores differ; a label opposes the image label when the rejected "
             "image holds the better subject). Both sets score the same candidates (same seeds); the scorer and the "
             f"judge pick the same winner in {pct(agreement['same_winner'])} % of {agreement['shared_scenes']} "
             "scenes."), "", *agreement_lines(agreement), ""]


def budget_section(root: Path) -> list[str]:
    choice_file = root / "budget" / "choice" / "choice.json"
    if not choice_file.is_file():
        return ["Not finished yet.", ""]
    choice = json.loads(choice_file.read_text())
    return [(f"DPO alone on the `{choice.get('pair_set', 'scorer')}` pairs. Gains over the base model, points (extra: "
             f"subjects per scene). Held: `{choice['chosen']}` ({choice['why']})."), "", *budget_lines(choice), ""]


def round2_section(root: Path, chains: list[str], seeds: list[int], draws: int) -> list[str]:
    if not chains:
        return ["Not started yet (it needs every seed of the subject arms).", ""]
    evals = root / "eval"
    values = json.loads((root / "round2" / "choice" / "choice.json").read_text())["fidelity_minus_leakage"]
    return [(f"Chains: {', '.join(f'`{c}`' for c in chains)} (`{chains[1]}`: the better subject arm on the validation "
             f"scenes, mean fidelity − leakage over seeds: {values})."), "", *head("dpo_r2"),
            *arm_rows(evals, ["base", *chains, *(f"{c}_r2" for c in chains)], seeds, draws, "dpo_r2", MIN_SEEDS), "",
            "| change | seeds | Δ fidelity | Δ leakage |", "| --- | --- | --- | --- |",
            *round_rows(evals, chains, seeds, draws), ""]


def split_section(root: Path, seeds: list[int], draws: int) -> list[str]:
    """The split check (``--split_check``): seed 0 of some arms against the base model on trained and new scenes."""
    sets = [name for name in ("trained", "unseen") if (root / "split_eval" / name).is_dir()]
    if not sets:
        return ["Not run (`--split_check`).", ""]
    lines = ["Seed 0 of each arm and the base model, sampled with the evaluation's noise on training-split scenes: "
             "`trained`, scenes the on-policy pairs were sampled from; `unseen`, new training-split scenes. Δ: the "
             "paired bootstrap 95 % interval against the base model, points.", ""]
    headroom = root / "split" / "headroom" / "headroom.json"
    if headroom.is_file():
        lines += ["The judge on the pair sets' own images (percent; extra: subjects per scene), against the base "
                  "model on the `trained` scenes below:", "", "| pair set | images | fidelity | leakage | missing | "
                  "extra |", "| --- | --- | --- | --- | --- | --- |"]
        for pair_set, sides in json.loads(headroom.read_text()).items():
            lines += [f"| {pair_set} | {side} | {v['fidelity'] * 100:.1f} | {v['leakage'] * 100:.1f} | "
                      f"{v['missing'] * 100:.1f} | {v['extra']:.2f} |" for side, v in sides.items()]
        lines.append("")
    for name in sets:
        evals = root / "split_eval" / name
        arms = sorted(p.name for p in evals.iterdir() if p.is_dir() and p.name != "base")
        lines += [f"**{name}** scenes:", "", *head("base"),
                  *arm_rows(evals, ["base", *arms], seeds[:1], draws, "base"), ""]
    return lines


def write_round2_report(out: Path, root: Path, arms: list[str], seeds: list[int], settings: dict) -> None:
    """The round-2 report from whatever has finished (every section says when its stage has not)."""
    evals, draws = root / "eval", settings["bootstrap_draws"]
    chain_file = root / "round2" / "choice" / "choice.json"
    chain = json.loads(chain_file.read_text())["chain"] if chain_file.is_file() else None
    # the chains of round2.round2_chains: dpo, the chosen subject arm, the oracle's image-label control with the oracle
    chains = ["dpo", chain, *(["dpo_oracle"] if chain == "subject_oracle" and "dpo_oracle" in arms else [])] \
        if chain else []
    second = [f"{c}_r2" for c in chains]
    samples_figure(evals, ["base", *arms, *second], seeds[0], out)
    blocks = [("round 1, vs dpo (seeds)", effect_rows(evals, ["base", *arms], seeds, draws, BASELINE, MIN_SEEDS))]
    if second:
        blocks.append(("round 2, vs dpo_r2 (seeds)", effect_rows(evals, second, seeds, draws, "dpo_r2", MIN_SEEDS)))
    effects_figure(blocks, out)
    accuracy = json.loads((root / "judge" / "accuracy.json").read_text())
    rule = ("A difference counts (marked **) only if it is at least 3 points and its paired bootstrap 95 % interval "
            f"(scenes resampled, the same indices in every seed) excludes zero, over at least {MIN_SEEDS} seeds.")
    lines = ["# Efficacy study, round 2 (issue 25)", "", f"Settings: `{json.dumps(settings, sort_keys=True)}`", "",
             (f"Judge, exact identity per subject: {accuracy['renders'] * 100:.1f} % on clean renders, "
              f"{accuracy['reconstructions'] * 100:.1f} % on VAE reconstructions."), "",
             "## On-policy pairs: do the two scorings agree?", "", *pairs_section(root),
             "## The budget (DPO alone, seed 0, validation scenes)", "", *budget_section(root),
             "## Round 1: every arm at the held budget (held-out test scenes)", "", rule, "", *head("dpo"),
             *arm_rows(evals, ["base", *arms], seeds, draws, BASELINE, MIN_SEEDS), "",
             ("Training metrics (percent, means over logged steps and seeds; winner drift = e_θ(w) − e_ref(w) over "
              "the last quarter of the steps; mask coverage = Σ_k M_k per patch):"), "",
             "| arm | seeds | " + " | ".join(TRAINING_METRICS) + " |", "| --- " * (len(TRAINING_METRICS) + 2) + "|",
             *training_rows(root / "arms", [*arms, *second], seeds), "",
             "## Round 2: pairs re-sampled from each round-1 model, trained again", "",
             *round2_section(root, chains, seeds, draws),
             "## Split check: does training move the scenes it trained on?", "",
             *split_section(root, seeds, draws),
             "## Wall time of every finished stage (seconds)", "", "| stage | seconds |", "| --- | --- |",
             *stage_times(root), "",
             (f"Samples of every arm on the first held-out scenes (seed {seeds[0]}, the same noise): "
              "[samples.png](samples.png). Every arm's gain over its baseline with its 95 % interval: "
              "[effects.png](effects.png)."), ""]
    (out / "report.md").write_text("\n".join(lines))

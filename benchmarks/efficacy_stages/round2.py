"""Round 2 of the study (issue 25): on-policy pairs, a DPO budget where training matters, subject-wise arms, and a
second training round on pairs re-sampled from the first round's models.

Stages, in order (folders under ``--out``; each resumable, see ``resume.py``):

1. ``prompts``: the training scenes as a ``focusdpo pairs`` prompt file; ``validation``: held-out-split scenes
   (another seed than the test scenes) on which the budget and the round-2 chain are chosen.
2. ``pairs_r1/{scorer,oracle,disrupted}`` (``onpolicy.py``) and ``agreement`` (how often the scorings agree).
3. ``budget/<point>``: DPO alone (seed 0) at each budget point in order, sampled on the validation scenes, until
   one moves the base by ≥ ``AIM`` (fidelity up or leakage down) without drift; ``budget/choice`` holds it.
4. ``arms/<arm>/seed<s>`` + ``eval/<arm>/seed<s>``: every arm at that budget (equal steps and pairs), seed-major.
5. ``round2/choice``: the better subject arm on the validation scenes; per seed ``pairs_r2/<chain>/seed<s>``
   (the pair generator with ``dpo_lora`` = that seed's round-1 model), then ``arms/<chain>_r2/seed<s>``: a new LoRA
   on top of the round-1 one (``personalization_lora``, ``reference_mode: frozen_adapter``: the reference is the
   round-1 model), sampled with both.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np

from . import arms, recipes, report  # light: evaluation and onpolicy (torch, the package) load when needed
from .resume import MARKER, run_calls, run_stage, settings_of

AIM = 0.05          # a budget "moves the base clearly": +5 points of fidelity or −5 of leakage (validation scenes)
DRIFT = {"missing": 0.03, "extra": 0.10}  # ... "without drifting": missing up ≤ 3 points, extra ≤ 0.1 per scene

# Budget points of DPO alone, cheapest first (the first that qualifies is held for every arm).
BUDGETS = (
    {"arm_lr": 3e-4, "arm_steps": 500, "lora_rank": 8, "beta": 1000.0},     # round 1's budget
    {"arm_lr": 1e-3, "arm_steps": 500, "lora_rank": 8, "beta": 1000.0},
    {"arm_lr": 1e-3, "arm_steps": 1000, "lora_rank": 16, "beta": 1000.0},
    {"arm_lr": 1e-3, "arm_steps": 1000, "lora_rank": 16, "beta": 5000.0},
    {"arm_lr": 3e-3, "arm_steps": 1000, "lora_rank": 16, "beta": 5000.0},
    {"arm_lr": 1e-3, "arm_steps": 2000, "lora_rank": 16, "beta": 5000.0},
)
SMOKE_BUDGETS = ({"arm_lr": 3e-4, "arm_steps": 2, "lora_rank": 4, "beta": 1000.0},)  # 2 steps: a resumable arm
BUDGET_KEYS = ("arm_lr", "arm_steps", "lora_rank", "beta")


def focus(lam_s: float, lam_d: float) -> dict:
    return {"lambda_structure": lam_s, "lambda_detail": lam_d}


def arm_table(lam_s: float, lam_d: float) -> dict[str, dict]:
    """arm → recipe fields, its pair set (``pairs``) and cache (``maps``: image, subject, or oracle masks)."""
    subject = {"preference_unit": "subject"}
    return {
        "dpo": {**focus(0, 0), "pairs": "scorer", "maps": "image"},
        "subject": {**focus(0, 0), **subject, "pairs": "scorer", "maps": "subject"},
        "subject_oracle": {**focus(0, 0), **subject, "pairs": "oracle", "maps": "oracle"},
        "dpo_oracle": {**focus(0, 0), "pairs": "oracle", "maps": "image"},
        "subject_focus": {**focus(lam_s, lam_d), **subject, "pairs": "scorer", "maps": "subject"},
        "focusdpo": {**focus(lam_s, lam_d), "pairs": "scorer", "maps": "image"},
        "sft": {"objective": "sft", "pairs": "scorer", "maps": "image"},
        # SFT on the judge-chosen winners: do the oracle pairs' winners carry anything training can pick up at all?
        "sft_oracle": {"objective": "sft", "pairs": "oracle", "maps": "image"},
        "dpo_half_beta": {**focus(0, 0), "beta_scale": 0.5, "pairs": "scorer", "maps": "image"},
        "dpo_2beta": {**focus(0, 0), "beta_scale": 2.0, "pairs": "scorer", "maps": "image"},
        "disrupted_dpo": {**focus(0, 0), "pairs": "disrupted", "maps": "image"},
        "disrupted_subject": {**focus(0, 0), **subject, "pairs": "disrupted", "maps": "subject"},
    }


FIRST_ARMS = ("dpo", "subject", "subject_oracle", "dpo_oracle", "subject_focus", "focusdpo")  # every seed first
# The subject arms a second round may continue (the better one on the validation scenes). A chain's round-2 pairs are
# scored like its round-1 pairs (the scorer's, or the judge's with its masks); when the oracle arm continues, its
# image-label control (dpo_oracle) continues too, so that the round-2 comparison keeps one label source.
CHAINS = ("subject", "subject_focus", "subject_oracle")
CONTROLS = {"oracle": "dpo_oracle", "scorer": "dpo"}
PAIR_SETS = ("scorer", "oracle", "disrupted")


# ---- recipes ------------------------------------------------------------------------------------------------------
def arm_recipe(folder: Path, arm: dict, sizes: dict, pipeline: Path, pair_set: Path, seed: int,
               first_round: Path | None = None) -> Path:
    from . import onpolicy

    static = onpolicy.MAP_SETS["image" if arm["maps"] == "image" else "subject"]
    fields = {**arms.base_fields(pipeline, pair_set / arm["maps"]), **static}
    fields.update({k: v for k, v in arm.items() if k not in ("pairs", "maps", "beta_scale")})
    fields.update({"output_dir": str(folder / "run"), "max_steps": sizes["arm_steps"],
                   "per_device_train_batch_size": sizes["arm_batch"], "learning_rate": sizes["arm_lr"],
                   "beta": sizes["beta"] * arm.get("beta_scale", 1.0), "lora_rank": sizes["lora_rank"],
                   "lora_alpha": sizes["lora_rank"], "save_steps": arms.save_steps(sizes["arm_steps"]),
                   "save_total_limit": 2,
                   "logging_steps": min(5, sizes["arm_steps"]), "drop_text_encoders": True, "seed": seed,
                   "max_train_samples": sizes["arm_pairs"]})
    if first_round is not None:  # round 2: a new LoRA over the round-1 model, which is also the reference
        fields.update({"personalization_lora": str(first_round / "run"), "reference_mode": "frozen_adapter"})
    return recipes.write_recipe(folder / "recipe.yaml", fields)


def train_arm(folder: Path, arm: dict, sizes: dict, pipeline: Path, pair_set: Path, seed: int,
              first_round: Path | None = None) -> None:
    recipes.train(arm_recipe(folder, arm, sizes, pipeline, pair_set, seed, first_round), folder / "run")


ARM_KEYS = (*BUDGET_KEYS, "arm_batch", "arm_pairs")


def train_and_sample(out: Path, name: str, arm: dict, seed: int, sizes: dict, base: Path, pair_set: Path,
                     world_dir: Path, judge_dir: Path, choice: Path, first_round: Path | None = None) -> None:
    """One arm × seed (a resumable training stage, then its sampling stage on the held-out test scenes)."""
    from . import evaluation

    run = out / "arms" / name / f"seed{seed}"
    upstream = [base, pair_set, choice] + ([first_round] if first_round is not None else [])
    run_stage(run, f"arm {name} seed {seed}", {**settings_of(sizes, ARM_KEYS, *upstream), "arm": arm},
              partial(train_arm, arm=arm, sizes=sizes, pipeline=base / "pipeline", pair_set=pair_set, seed=seed,
                      first_round=first_round), resumable=True)
    evaluation.sample_stage(out, name, seed, run, sizes, base, world_dir, judge_dir, personalization=first_round)


# ---- the budget -------------------------------------------------------------------------------------------------------
def scores_of(folder: Path) -> dict[str, np.ndarray]:
    return report.read_scores(folder / "scores.jsonl")


def budget_verdict(point: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> dict:
    """Gains over the base model on the validation scenes (means; fractions) and whether the point qualifies."""
    gain = {m: float(point[m].mean() - base[m].mean()) for m in report.METRICS}
    moved = max(gain["fidelity"], -gain["leakage"])
    drifted = gain["missing"] > DRIFT["missing"] or gain["extra"] > DRIFT["extra"]
    return {"gain": gain, "moved": moved, "drifted": drifted, "qualifies": moved >= AIM and not drifted}


def choose_budget(verdicts: list[dict]) -> tuple[int, str]:
    """The first qualifying point; else (every point run) the largest move without drift; else the smallest drift."""
    for i, v in enumerate(verdicts):
        if v["qualifies"]:
            return i, f"the first point that moves the base by >= {AIM * 100:.0f} points without drift"
    steady = [i for i, v in enumerate(verdicts) if not v["drifted"]]
    if steady:
        best = max(steady, key=lambda i: verdicts[i]["moved"])
        return best, f"no point reached {AIM * 100:.0f} points without drift: the largest move without drift"
    best = min(range(len(verdicts)), key=lambda i: verdicts[i]["gain"]["missing"] + verdicts[i]["gain"]["extra"])
    return best, "every point drifted: the one that drifted least"


def budget_stage(out: Path, sizes: dict, budgets: tuple[dict, ...], base: Path, pair_set: Path, validation: Path,
                 judge_dir: Path, seed: int) -> Path:
    """DPO alone (the image label) on ``pair_set`` at each budget point (seed ``seed``), in order, until one qualifies;
    ``budget/choice`` holds it."""
    from . import evaluation

    table = arm_table(sizes["lambda_structure"], sizes["lambda_detail"])
    evaluation.sample_stage(out, "base", seed, None, sizes, base, validation, judge_dir, evals="budget_eval")
    base_scores = scores_of(out / "budget_eval" / "base" / f"seed{seed}")
    verdicts, folders = [], []
    for index, point in enumerate(budgets):
        name = f"b{index}"
        point_sizes = {**sizes, **point}
        run = out / "budget" / name
        run_stage(run, f"budget {name}", {**settings_of(point_sizes, ARM_KEYS, base, pair_set), "arm": table["dpo"],
                                          "pairs": pair_set.name},
                  partial(train_arm, arm=table["dpo"], sizes=point_sizes, pipeline=base / "pipeline",
                          pair_set=pair_set, seed=seed), resumable=True)
        evaluation.sample_stage(out, name, seed, run, sizes, base, validation, judge_dir, evals="budget_eval")
        verdicts.append(budget_verdict(scores_of(out / "budget_eval" / name / f"seed{seed}"), base_scores))
        folders.append(out / "budget_eval" / name / f"seed{seed}")
        print(f"[efficacy] budget {name} {point}: gain {verdicts[-1]['gain']}, qualifies {verdicts[-1]['qualifies']}")
        if verdicts[-1]["qualifies"]:
            break
    chosen, why = choose_budget(verdicts)

    def work(staging: Path) -> None:
        record = {"chosen": f"b{chosen}", "budget": budgets[chosen], "why": why, "arm_pairs": sizes["arm_pairs"],
                  "pair_set": pair_set.name,
                  "points": [{"name": f"b{i}", **budgets[i], **v} for i, v in enumerate(verdicts)]}
        (staging / "choice.json").write_text(json.dumps(record, indent=1))
    upstream = [out / "budget_eval" / "base" / f"seed{seed}", *folders]
    run_stage(out / "budget" / "choice", "budget choice", {**settings_of(sizes, ("arm_pairs",), *upstream),
                                                           "budgets": list(budgets), "aim": AIM, "drift": DRIFT}, work)
    return out / "budget" / "choice"


def chosen_budget(choice: Path) -> dict:
    return json.loads((choice / "choice.json").read_text())["budget"]


# ---- round 2 --------------------------------------------------------------------------------------------------------
def chain_stage(out: Path, sizes: dict, chains: list[str], seeds: list[int], base: Path, validation: Path,
                judge_dir: Path) -> Path | None:
    """The subject arm a second round continues: the best mean of (fidelity − leakage) over seeds on the validation
    scenes (never the test scenes). None when no subject arm was run."""
    from . import evaluation

    if not chains:
        return None
    for name in chains:
        for seed in seeds:
            evaluation.sample_stage(out, name, seed, out / "arms" / name / f"seed{seed}", sizes, base, validation,
                                    judge_dir, evals="validation_eval")
    folders = [out / "validation_eval" / name / f"seed{s}" for name in chains for s in seeds]

    def work(staging: Path) -> None:
        value = {}
        for name in chains:
            runs = [scores_of(out / "validation_eval" / name / f"seed{s}") for s in seeds]
            value[name] = float(np.mean([r["fidelity"].mean() - r["leakage"].mean() for r in runs]))
        best = max(chains, key=lambda n: value[n])
        (staging / "choice.json").write_text(json.dumps({"chain": best, "fidelity_minus_leakage": value}, indent=1))
    run_stage(out / "round2" / "choice", "round 2 choice", settings_of(sizes, (), *folders), work)
    return out / "round2" / "choice"


def pair_set_r2(out: Path, chain: str, seed: int, sizes: dict, prompts: Path, base: Path, judge_dir: Path,
                study_seed: int, scorer: str = "scorer") -> Path:
    """Pairs re-sampled from the round-1 model of ``chain`` (seed ``seed``), scored like its round-1 pairs."""
    from . import onpolicy

    folder = out / "pairs_r2" / chain / f"seed{seed}"
    first_round = out / "arms" / chain / f"seed{seed}"
    keys = ("candidates", "sample_steps", "pair_margin")
    run_stage(folder, f"pairs round 2 {chain} seed {seed}",
              {**settings_of(sizes, keys, prompts, base, judge_dir, first_round), **onpolicy.scorer_settings(scorer),
               "maps": onpolicy.MAP_SETS, "focus": arms.FOCUS_STATIC},
              partial(onpolicy.build_onpolicy, prompts=prompts, pipeline=base / "pipeline", judge_dir=judge_dir,
                      sizes=sizes, scorer=scorer, seed=study_seed + 700, dpo_lora=first_round / "run"),
              resumable=True)
    return folder


def round2_calls(out: Path, sizes: dict, table: dict, chain: str, seeds: list[int], base: Path, prompts: Path,
                 world_dir: Path, judge_dir: Path, choice: Path, study_seed: int) -> list:
    """Per seed: every chain's pairs, then each chain's second-round arm (equal pairs: the fewest of the sets)."""
    calls = []
    for seed in seeds:
        calls.append(partial(round2_seed, out, sizes, table, chain, seed, base, prompts, world_dir, judge_dir, choice,
                             study_seed))
    return calls


def round2_seed(out: Path, sizes: dict, table: dict, chain: str, seed: int, base: Path, prompts: Path,
                world_dir: Path, judge_dir: Path, choice: Path, study_seed: int) -> None:
    from . import onpolicy

    chains = round2_chains(table, chain)
    sets = {c: pair_set_r2(out, c, seed, sizes, prompts, base, judge_dir, study_seed, table[c]["pairs"])
            for c in chains}
    pairs = min([sizes["arm_pairs"], *(onpolicy.kept_pairs(s) for s in sets.values())])
    for c in chains:
        train_and_sample(out, f"{c}_r2", table[c], seed, {**sizes, "arm_pairs": pairs}, base, sets[c], world_dir,
                         judge_dir, choice, first_round=out / "arms" / c / f"seed{seed}")


def round2_chains(table: dict, chain: str) -> list[str]:
    """``dpo``, the chosen subject arm, and its image-label control when that is not ``dpo`` (the oracle's)."""
    control = CONTROLS[table[chain]["pairs"]]
    return ["dpo", chain] + ([control] if control != "dpo" and control in table else [])


def finished(folder: Path) -> bool:
    return (folder / MARKER).is_file()


# ---- the split check: does training move the scenes it trained on? ---------------------------------------------------
SPLIT_ARMS = ("dpo", "dpo_oracle", "subject_oracle")  # seed 0 of each, against the base model


def split_scene_stages(out: Path, sizes: dict, seed: int, prompts: Path) -> dict[str, Path]:
    """Two scene sets of the training split, ``split_scenes`` each: ``trained``, the first of the scenes the on-policy
    pairs were sampled from (other noise: the evaluation's seeds), and ``unseen``, new training-split scenes."""
    from . import world

    count = sizes["split_scenes"]

    def trained(staging: Path) -> None:
        records = json.loads((prompts / "scenes.json").read_text())[:count]
        (staging / "held_out.json").write_text(json.dumps(records))

    def unseen(staging: Path) -> None:
        scenes = world.make_scenes(count, seed + 900, held_out=False)
        (staging / "held_out.json").write_text(json.dumps([world.scene_record(s) for s in scenes]))
    folders = {"trained": out / "split" / "trained", "unseen": out / "split" / "unseen"}
    run_stage(folders["trained"], "split trained scenes", settings_of(sizes, ("split_scenes",), prompts), trained)
    run_stage(folders["unseen"], "split unseen scenes", {**settings_of(sizes, ("split_scenes",)), "seed": seed},
              unseen)
    return folders


def judged_pairs(pair_set: Path, prompts: Path, judge_dir: Path) -> dict[str, dict[str, float]]:
    """The judge's mean scores of a pair set's chosen and of its rejected images (the headroom the pairs show)."""
    from datasets import load_from_disk

    from . import evaluation

    judge, scenes = evaluation.load_judge(judge_dir), json.loads((prompts / "scenes.json").read_text())
    pairs, means = load_from_disk(str(pair_set / "generated" / "dataset")), {}
    for side in ("chosen", "rejected"):
        scores = []
        for start in range(0, len(pairs), 200):  # 200 images at a time: the judge's batch, bounded memory
            rows = pairs.select(range(start, min(len(pairs), start + 200)))
            scores += evaluation.score_images(judge, [scenes[i] for i in rows["item_index"]], rows[side])
        means[side] = {m: float(np.mean([s[m] for s in scores])) for m in report.METRICS}
    return means


def headroom_stage(out: Path) -> None:
    """``split/headroom``: the judge's scores of the chosen and rejected images of both on-policy pair sets."""
    sets = {name: out / "pairs_r1" / name for name in ("scorer", "oracle")}
    prompts, judge_dir = out / "prompts", out / "judge"

    def work(staging: Path) -> None:
        result = {name: judged_pairs(folder, prompts, judge_dir) for name, folder in sets.items()}
        (staging / "headroom.json").write_text(json.dumps(result, indent=1))
    run_stage(out / "split" / "headroom", "split headroom", settings_of({}, (), prompts, judge_dir, *sets.values()),
              work)


def split_check(out: Path, sizes: dict, seed: int, arms_checked: tuple[str, ...] = SPLIT_ARMS) -> None:
    """The base model and seed ``seed`` of each finished arm in ``arms_checked``, sampled and judged on both scene
    sets (``split_eval/<set>/<arm>/seed<seed>``): if an arm moves the scenes it trained on but not new ones, its
    pairs were fitted, not learned from."""
    from . import evaluation

    base, judge_dir = out / "base", out / "judge"
    calls = []
    for name, scenes in split_scene_stages(out, sizes, seed, out / "prompts").items():
        evals = f"split_eval/{name}"
        calls.append(partial(evaluation.sample_stage, out, "base", seed, None, sizes, base, scenes, judge_dir,
                             evals=evals))
        calls += [partial(evaluation.sample_stage, out, arm, seed, out / "arms" / arm / f"seed{seed}", sizes, base,
                          scenes, judge_dir, evals=evals)
                  for arm in arms_checked if finished(out / "arms" / arm / f"seed{seed}")]
    run_calls(calls, sizes["jobs"])
    headroom_stage(out)

"""Efficacy study: does focus weighting beat plain Diffusion-DPO where the truth is known? (issue 14)

    python benchmarks/efficacy.py --out runs/efficacy            # the study's budget (about 2 h on 2 cores)
    python benchmarks/efficacy.py --out runs/efficacy --smoke    # every stage at the smallest size (tests)
    python benchmarks/efficacy.py --out runs/efficacy_round2 --round2 --jobs 1   # round 2 (docs/efficacy-round2.md)

Stages (docs/efficacy.md): world → base model (tiny VAE, then a ≈2 M-param FLUX.2 [klein] transformer trained
by the project's trainer with ``objective: sft``) → judge (quadrant CNN) → pairs (``focusdpo embed``,
``focusdpo focus``) → arms (the project's trainer, one recipe per arm and seed) → sampling + scoring
(``focusdpo.models.sampling.sample_images``) → report (``report/report.md``, PNGs). Each stage and each arm×seed
writes into a staging folder, renames it, and leaves ``done.json`` with its settings: a finished one is
skipped, one finished with other settings is refused (naming the stage); an interrupted arm resumes from its last
checkpoint. ``--round2`` (issue 25, ``efficacy_stages/round2.py``): on-policy pairs from ``focusdpo pairs`` scored by
the project's scorer and by the judge, a DPO budget search, subject-wise arms, a second round of pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # two threads per process ran up to 8x slower under load
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Light at import (no torch, no package): a refused command fails at once. The stages import what they run.
from efficacy_stages import arms, report, round2
from efficacy_stages.resume import run_calls, run_stage, settings_of

# The budget. Measured per unit on the 2-core machine (one thread, one other job running): base SFT
# ~1.0 s/step at batch 32, a DPO arm ~0.6 s/step at batch 8 (so ~0.3 at batch 4), sampling ~0.012 s per image
# and Euler step. Estimate for these sizes: about 2 h sequential on one core (docs/efficacy.md).
FULL = {"vae_steps": 600, "vae_batch": 32, "base_scenes": 4000, "base_steps": 2000, "base_batch": 32,
        "base_lr": 1e-3, "base_ema_decay": 0.0, "judge_steps": 1500, "judge_batch": 32, "judge_check_scenes": 200,
        "pairs": 2000, "arm_steps": 500, "arm_batch": 4, "arm_lr": 3e-4, "beta": 1000.0, "lora_rank": 8,
        "held_out": 500, "sample_steps": 12, "sample_batch": 50, "png_scenes": 8, "seeds": 3, "bootstrap_draws": 2000,
        "lambda_structure": 1.0, "lambda_detail": 1.0, "sdpo_mu": 0.1,
        # round 2 (--round2): training scenes of the on-policy pairs, candidates per scene, validation scenes
        "onpolicy_scenes": 1000, "candidates": 4, "validation_scenes": 300, "split_scenes": 300,
        "pair_margin": 1e-6}  # a scene whose candidates all score alike gives no pair
SMOKE = {**FULL, "vae_steps": 2, "vae_batch": 4, "base_scenes": 4, "base_steps": 2, "base_batch": 2,
         "judge_steps": 2, "judge_batch": 4, "judge_check_scenes": 4, "pairs": 4, "arm_steps": 1, "arm_batch": 2,
         "held_out": 2, "sample_steps": 1, "sample_batch": 2, "png_scenes": 2, "seeds": 1, "bootstrap_draws": 50,
         "onpolicy_scenes": 4, "validation_scenes": 2, "split_scenes": 2,
         "pair_margin": 0.0}  # the untrained judge ties everything


def world_stage(out: Path, sizes: dict, seed: int) -> Path:
    from efficacy_stages import world

    def work(staging: Path) -> None:
        scenes = world.make_scenes(sizes["held_out"], seed + 300, held_out=True)
        (staging / "held_out.json").write_text(json.dumps([world.scene_record(s) for s in scenes]))
    run_stage(out / "world", "world", {**settings_of(sizes, ("held_out",)), "seed": seed}, work)
    return out / "world"


def base_stage(out: Path, sizes: dict, seed: int) -> Path:
    def work(staging: Path) -> None:
        from efficacy_stages import base_model

        base_model.build_base(staging, sizes, seed)

    keys = ("vae_steps", "vae_batch", "base_scenes", "base_steps", "base_batch", "base_lr")
    if sizes["base_ema_decay"]:  # a key only when set: studies made before the option still resume
        keys += ("base_ema_decay",)
    run_stage(out / "base", "base model", {**settings_of(sizes, keys), "seed": seed}, work)
    return out / "base"


def judge_stage(out: Path, sizes: dict, seed: int, base: Path) -> Path:
    def work(staging: Path) -> None:
        import torch
        from diffusers import AutoencoderKLFlux2
        from efficacy_stages import base_model, judge, world

        vae = AutoencoderKLFlux2.from_pretrained(str(base / "pipeline" / "vae")).eval()
        model = judge.train_judge(sizes["judge_steps"], sizes["judge_batch"], seed + 400, vae)
        torch.save(model.state_dict(), staging / "judge.pt")
        scenes = world.make_scenes(sizes["judge_check_scenes"], seed + 500, held_out=None)
        clean = base_model.to_pixels([world.render(s) for s in scenes])
        with torch.no_grad():
            recon = vae.decode(vae.encode(clean).latent_dist.mode()).sample.clamp(-1, 1)
        accuracy = {"renders": judge.identity_accuracy(model, scenes, clean),
                    "reconstructions": judge.identity_accuracy(model, scenes, recon)}
        (staging / "accuracy.json").write_text(json.dumps(accuracy, indent=1))
    keys = ("judge_steps", "judge_batch", "judge_check_scenes")
    run_stage(out / "judge", "judge", {**settings_of(sizes, keys, base), "seed": seed}, work)
    return out / "judge"


def pairs_stage(out: Path, sizes: dict, seed: int, base: Path) -> Path:
    run_stage(out / "pairs", "pairs", {**settings_of(sizes, ("pairs",), base), "focus": arms.FOCUS_STATIC,
                                       "map_sets": arms.MAP_SETS, "seed": seed},
              lambda staging: arms.build_pairs(staging, sizes, base / "pipeline", seed))
    return out / "pairs"


def arm_stages(out: Path, sizes: dict, table: dict, seeds: list[int], base: Path, pairs: Path, world_dir: Path,
               judge_dir: Path) -> None:
    """The base model's samples, then per seed (seed-major, so an interrupted study has whole seeds) each arm's
    training followed by its samples: two resumable stages per arm × seed, ``jobs`` at a time. The main comparison
    (``arms.FIRST_ARMS``) runs on every seed before the other arms."""
    from efficacy_stages import evaluation

    calls = [partial(evaluation.sample_stage, out, "base", seeds[0], None, sizes, base, world_dir, judge_dir)]
    for first in (True, False):
        calls += [partial(evaluation.train_and_sample, out, name, arm, seed, sizes, base, pairs, world_dir,
                          judge_dir)
                  for seed in seeds for name, arm in table.items() if (name in arms.FIRST_ARMS) == first]
    run_calls(calls, sizes["jobs"])


def report_stage(out: Path, sizes: dict, table: dict, seeds: list[int]) -> Path:
    """Always rewritten (it is cheap) from every finished sample set: a partial study reports what it has."""
    shutil.rmtree(out / "report", ignore_errors=True)
    upstream = [out / "eval" / name / f"seed{s}" for name in table for s in seeds]
    upstream = [out / "eval" / "base" / f"seed{seeds[0]}"] + [u for u in upstream if (u / "done.json").is_file()]
    run_stage(out / "report", "report", settings_of(sizes, ("bootstrap_draws",), *upstream),
              lambda staging: report.write_report(staging, out, list(table), seeds, arms.TODO_ARMS, sizes))
    return out / "report"


STAGES = ("base", "judge", "pairs", "budget", "arms", "report")
SHARED = ("world", "base", "judge", "pairs")  # what --reuse links (and the base samples): everything before the arms
SHARED_ROUND2 = ("world", "base", "judge")  # round 2 makes its own pairs


def select_arms(table: dict, names: str | None) -> dict:
    """The arms named in ``--arms`` (comma-separated), in the table's order; all of them when None."""
    if names is None:
        return table
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in table]
    if unknown:
        raise SystemExit(f"[efficacy] --arms: unknown arm(s) {', '.join(unknown)}; valid: {', '.join(table)}")
    if report.BASELINE not in wanted:
        raise SystemExit(f"[efficacy] --arms must include {report.BASELINE!r}: every gain is measured against it")
    return {name: arm for name, arm in table.items() if name in wanted}


def reuse_study(out: Path, earlier: Path, seed: int, shared: tuple[str, ...] = SHARED) -> None:
    """Links the world, base model, judge, pairs and base samples of ``earlier`` into ``out`` (a follow-up study at
    another arm budget reuses them; their settings are still checked, so a different world or base is refused)."""
    base_samples = f"eval/base/seed{seed}"
    optional = () if shared == SHARED else (base_samples,)  # round 2 samples the base model itself if need be
    for name in (*shared, base_samples):
        source, link = (earlier / name).resolve(), out / name
        if name in optional and not (source / "done.json").is_file():
            continue
        if not (source / "done.json").is_file():
            raise SystemExit(f"[efficacy] --reuse: {source} is not a finished stage; run that study first")
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source, target_is_directory=True)


def shared_stages(out: Path, sizes: dict, seed: int, until: str) -> tuple[Path, Path, Path] | None:
    """The stages both rounds share: the world, the base model and the judge (None when ``until`` stops there)."""
    import torch

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    world_dir = world_stage(out, sizes, seed)
    base = base_stage(out, sizes, seed)
    if until == "base":
        return None
    judge_dir = judge_stage(out, sizes, seed, base)
    return None if until == "judge" else (world_dir, base, judge_dir)


def run_study(out: Path, sizes: dict, seed: int = 0, until: str = "report", table: dict | None = None) -> Path | None:
    """Runs the stages in order up to and including ``until``; returns the report folder (None if not reached)."""
    seeds = [seed + i for i in range(sizes["seeds"])]
    table = table or arms.arm_table(sizes["lambda_structure"], sizes["lambda_detail"], sizes["sdpo_mu"])
    shared = shared_stages(out, sizes, seed, until)
    if shared is None:
        return None
    world_dir, base, judge_dir = shared
    pairs = pairs_stage(out, sizes, seed, base)
    if until in ("pairs", "budget"):
        return None
    arm_stages(out, sizes, table, seeds, base, pairs, world_dir, judge_dir)
    if until == "arms":
        return None
    return report_stage(out, sizes, table, seeds)


# ---- round 2 (issue 25): on-policy pairs, subject-wise arms, a second training round -------------------------------
def prompts_stage(out: Path, sizes: dict, seed: int) -> Path:
    from efficacy_stages import world

    run_stage(out / "prompts", "prompts", {**settings_of(sizes, ("onpolicy_scenes",)), "seed": seed},
              lambda staging: world.write_prompt_set(staging, sizes["onpolicy_scenes"], seed + 100))
    return out / "prompts"


def validation_stage(out: Path, sizes: dict, seed: int) -> Path:
    """Held-out-split scenes of another seed than the test scenes: the budget and the round-2 chain are chosen on
    them, so the test scenes only ever report."""
    from efficacy_stages import world

    def work(staging: Path) -> None:
        scenes = world.make_scenes(sizes["validation_scenes"], seed + 800, held_out=True)
        (staging / "held_out.json").write_text(json.dumps([world.scene_record(s) for s in scenes]))
    run_stage(out / "validation", "validation scenes", {**settings_of(sizes, ("validation_scenes",)), "seed": seed},
              work)
    return out / "validation"


def pair_set_stage(out: Path, name: str, sizes: dict, seed: int, prompts: Path, base: Path, judge_dir: Path) -> Path:
    """``pairs_r1/<name>``: the on-policy sets (``scorer``, ``oracle``: the same candidates, seed + 600) or the
    round-1 study's disrupted pairs with subject labels (``disrupted``)."""
    from efficacy_stages import onpolicy

    folder = out / "pairs_r1" / name
    common = {"maps": onpolicy.MAP_SETS, "focus": arms.FOCUS_STATIC, "seed": seed}
    if name == "disrupted":
        run_stage(folder, "pairs disrupted", {**settings_of(sizes, ("pairs",), base), **common},
                  partial(onpolicy.build_disrupted, sizes=sizes, pipeline=base / "pipeline", seed=seed))
        return folder
    keys = ("candidates", "sample_steps", "pair_margin")
    run_stage(folder, f"pairs {name}", {**settings_of(sizes, keys, prompts, base, judge_dir),
                                        **onpolicy.scorer_settings(name), **common},
              partial(onpolicy.build_onpolicy, prompts=prompts, pipeline=base / "pipeline", judge_dir=judge_dir,
                      sizes=sizes, scorer=name, seed=seed + 600), resumable=True)
    return folder


def agreement_stage(out: Path, sets: dict, prompts: Path, judge_dir: Path) -> Path:
    from efficacy_stages import onpolicy

    def work(staging: Path) -> None:
        result = onpolicy.agreement(sets["scorer"], sets["oracle"], prompts, judge_dir)
        (staging / "agreement.json").write_text(json.dumps(result, indent=1))
    run_stage(out / "agreement", "agreement", settings_of({}, (), sets["scorer"], sets["oracle"]), work)
    return out / "agreement"


def report_stage_round2(out: Path, sizes: dict, table: dict, seeds: list[int]) -> Path:
    """Rewritten on every run (and after each step of the study) from whatever has finished."""
    shutil.rmtree(out / "report", ignore_errors=True)
    run_stage(out / "report", "report", settings_of(sizes, ("bootstrap_draws",)),
              lambda staging: report.write_round2_report(staging, out, list(table), seeds, sizes))
    return out / "report"


def round2_study(out: Path, sizes: dict, seed: int = 0, until: str = "report", table: dict | None = None,
                 budgets: tuple[dict, ...] = round2.BUDGETS, budget_pairs: str = "oracle") -> Path | None:
    """Round 2 up to and including ``until`` (pairs: the pair sets and their agreement; budget: the DPO budget)."""
    from efficacy_stages import evaluation, onpolicy

    seeds = [seed + i for i in range(sizes["seeds"])]
    table = table or round2.arm_table(sizes["lambda_structure"], sizes["lambda_detail"])
    shared = shared_stages(out, sizes, seed, until)
    if shared is None:
        return None
    world_dir, base, judge_dir = shared
    prompts, validation = prompts_stage(out, sizes, seed), validation_stage(out, sizes, seed)
    sets = {name: pair_set_stage(out, name, sizes, seed, prompts, base, judge_dir) for name in round2.PAIR_SETS}
    agreement_stage(out, sets, prompts, judge_dir)
    report_stage_round2(out, sizes, table, seeds)
    if until == "pairs":
        return None
    sizes = {**sizes, "arm_pairs": min(sizes["pairs"], *(onpolicy.kept_pairs(sets[n]) for n in ("scorer", "oracle")))}
    choice = round2.budget_stage(out, sizes, budgets, base, sets[budget_pairs], validation, judge_dir, seeds[0])
    sizes = {**sizes, **round2.chosen_budget(choice)}
    report_stage_round2(out, sizes, table, seeds)
    if until == "budget":
        return None
    calls = [partial(evaluation.sample_stage, out, "base", seeds[0], None, sizes, base, world_dir, judge_dir)]
    for first in (True, False):
        for s in seeds:  # seed-major, the main comparison first; one process: the report after every seed
            calls += [partial(round2.train_and_sample, out, name, arm, s, sizes, base, sets[arm["pairs"]], world_dir,
                              judge_dir, choice) for name, arm in table.items() if (name in round2.FIRST_ARMS) == first]
            if sizes["jobs"] <= 1:
                calls.append(partial(report_stage_round2, out, sizes, table, seeds))
    run_calls(calls, sizes["jobs"])
    if until == "arms":
        return None
    chain_choice = round2.chain_stage(out, sizes, [c for c in round2.CHAINS if c in table], seeds, base, validation,
                                      judge_dir)
    if chain_choice is not None and "dpo" in table:
        chain = json.loads((chain_choice / "choice.json").read_text())["chain"]
        run_calls(round2.round2_calls(out, sizes, table, chain, seeds, base, prompts, world_dir, judge_dir, choice,
                                      seed), sizes["jobs"])
    return report_stage_round2(out, sizes, table, seeds)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Study folder (stages resume from it).")
    parser.add_argument("--smoke", action="store_true", help="Smallest sizes: checks every stage runs (no results).")
    parser.add_argument("--seed", type=int, default=0, help="World / model seed; arm seeds are seed, seed+1, ...")
    parser.add_argument("--jobs", type=int, default=1, help="Arms / sample sets trained or sampled side by side "
                        "(one process and one thread each; 2 on a 2-core machine). Results do not depend on it.")
    parser.add_argument("--report_only", action="store_true",
                        help="Only rewrite the report from the sample sets finished so far (safe while a study runs).")
    parser.add_argument("--until", choices=STAGES, default="report",
                        help="Stop after this stage (e.g. build the base model and pairs while arms are still edited).")
    parser.add_argument("--arms", default=None, help="Comma-separated arms to run and report (default: all; must "
                        "include dpo), e.g. dpo,focusdpo,lambda_s10 for a follow-up at another --arm_steps.")
    parser.add_argument("--reuse", type=Path, default=None, help="An earlier study folder whose world, base model, "
                        "judge, pairs and base samples this one links instead of rebuilding (same sizes required; "
                        "with --round2: world, base model, judge and base samples).")
    parser.add_argument("--round2", action="store_true", help="Round 2 (issue 25): on-policy pairs scored by the "
                        "project's scorer and by the judge, a DPO budget search, subject-wise arms, a second round "
                        "(docs/efficacy-round2.md).")
    parser.add_argument("--split_check", action="store_true", help="Round 2, after the arms: sample the base "
                        "model and seed 0 of dpo, dpo_oracle and subject_oracle on training scenes they trained on and "
                        "on new ones (does DPO move the scenes it fitted?), then rewrite the report.")
    parser.add_argument("--budgets", default=None, help="Round 2: a JSON list of budget points replacing the search "
                        "(each {arm_lr, arm_steps, lora_rank, beta}), e.g. to hold a budget found elsewhere.")
    parser.add_argument("--budget_pairs", choices=("oracle", "scorer"), default="oracle", help="Round 2: the pairs "
                        "the budget search trains DPO on (default: the judge-selected ones; the scorer's pairs agree "
                        "with the judge at chance level on this base model, docs/efficacy-round2.md).")
    for key, value in FULL.items():
        parser.add_argument(f"--{key}", type=type(value), default=None, help=f"default {value} (smoke {SMOKE[key]})")
    args = parser.parse_args(argv)
    sizes = dict(SMOKE if args.smoke else FULL)
    sizes.update({k: getattr(args, k) for k in FULL if getattr(args, k) is not None})
    args.sizes = {**sizes, "jobs": args.jobs}
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out, sizes, seed = Path(args.out), args.sizes, args.seed
    if args.round2:
        table = select_arms(round2.arm_table(sizes["lambda_structure"], sizes["lambda_detail"]), args.arms)
        budgets = tuple(json.loads(args.budgets)) if args.budgets else (
            round2.SMOKE_BUDGETS if args.smoke else round2.BUDGETS)
        if args.reuse is not None:
            reuse_study(out, args.reuse, seed, SHARED_ROUND2)
        if args.split_check:
            round2.split_check(out, sizes, seed)
        if args.report_only or args.split_check:
            folder = report_stage_round2(out, sizes, table, [seed + i for i in range(sizes["seeds"])])
        else:
            folder = round2_study(out, sizes, seed, args.until, table, budgets, args.budget_pairs)
    else:
        table = select_arms(arms.arm_table(sizes["lambda_structure"], sizes["lambda_detail"], sizes["sdpo_mu"]),
                            args.arms)
        if args.reuse is not None:
            reuse_study(out, args.reuse, seed)
        if args.report_only:
            folder = report_stage(out, sizes, table, [seed + i for i in range(sizes["seeds"])])
        else:
            folder = run_study(out, sizes, seed, args.until, table)
    print(f"[efficacy] report: {folder / 'report.md'}" if folder else f"[efficacy] stopped after stage {args.until!r}")


if __name__ == "__main__":
    from efficacy_stages.resume import SettingsChanged

    try:
        main()
    except SettingsChanged as error:
        raise SystemExit(f"[efficacy] {error}")

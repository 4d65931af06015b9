"""The efficacy study (benchmarks/efficacy.py) at its smoke size: every stage runs, resumes, refuses stale settings.

Quality is not tested here (the smoke models are untrained); the full study is a benchmark, not a test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "efficacy.py"


def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--smoke", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_smoke_runs_every_stage_then_resumes_and_refuses_changed_settings(tmp_path):
    out = tmp_path / "study"
    first = run(out, "--jobs", "2")  # arms and sample sets in two spawned workers (results do not depend on it)
    assert first.returncode == 0, first.stderr[-3000:]
    arms = ("sft", "dpo", "focusdpo", "no_complexity", "no_schedule", "no_prior", "no_confidence", "reference_error",
            "focusdpo_sdpo", "lambda_s3", "lambda_s10", "lambda_d3", "focusdpo_mosaic")
    for stage in ("world", "base", "judge", "pairs", "report", *(f"arms/{a}/seed0" for a in arms),
                  *(f"eval/{a}/seed0" for a in ("base", *arms))):
        assert (out / stage / "done.json").is_file(), stage
    assert (out / "base/pipeline/model_index.json").is_file()
    assert (out / "judge/judge.pt").is_file()
    for arm in arms:
        assert (out / f"arms/{arm}/seed0/run/pytorch_lora_weights.safetensors").is_file(), arm
        assert (out / f"eval/{arm}/seed0/samples.png").is_file(), arm
    scores = (out / "eval/focusdpo/seed0/scores.jsonl").read_text().splitlines()
    assert len(scores) == 2 and set(json.loads(scores[0])) == {"fidelity", "leakage", "missing", "extra"}
    # focus weights were on in the focus arms (logged), off in vanilla DPO
    focus_log = (out / "arms/focusdpo/seed0/run/metrics.jsonl").read_text()
    assert "focus/entropy" in focus_log
    assert "focus/entropy" not in (out / "arms/dpo/seed0/run/metrics.jsonl").read_text()
    report = (out / "report/report.md").read_text()
    assert all(f"| {a} | 1 |" in report for a in ("base", *arms))
    assert "Judge, exact identity" in report
    from PIL import Image

    figure = Image.open(out / "report/samples.png")  # references + base + every arm, one row each
    assert figure.height == 64 * (2 + len(arms))

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("done.json")}
    second = run(out)
    assert second.returncode == 0, second.stderr[-3000:]
    # only the report is rewritten (it always is: it reports every finished sample set)
    assert [line for line in second.stdout.splitlines() if ": running" in line] == ["[efficacy] report: running"]
    assert second.stdout.count("done, skipped") >= 2 * len(arms) + 5
    assert {p: p.stat().st_mtime_ns for p in out.rglob("done.json") if "report" not in p.parts} == \
        {p: t for p, t in stamps.items() if "report" not in p.parts}

    changed = run(out, "--arm_steps", "2")
    assert changed.returncode != 0
    assert "stage 'arm sft seed 0'" in changed.stderr and "arm_steps" in changed.stderr

    # a follow-up at another arm budget: the earlier world, base, judge, pairs and base samples are linked, not
    # rebuilt; only the chosen arms train and are reported
    follow_up = run(tmp_path / "longer", "--reuse", str(out), "--arms", "dpo,focusdpo", "--arm_steps", "2")
    assert follow_up.returncode == 0, follow_up.stderr[-3000:]
    ran = [line.split(": running")[0] for line in follow_up.stdout.splitlines() if ": running" in line]
    assert ran == ["[efficacy] arm dpo seed 0", "[efficacy] sampling dpo seed 0", "[efficacy] arm focusdpo seed 0",
                   "[efficacy] sampling focusdpo seed 0", "[efficacy] report"]
    rows = [line for line in (tmp_path / "longer/report/report.md").read_text().splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[2:5]] == ["| base", "| dpo", "| focusdpo"]
    assert not (tmp_path / "longer/arms/sft").exists()
    refused = run(tmp_path / "other", "--arms", "focusdpo,nonsense")
    assert refused.returncode != 0 and "unknown arm(s) nonsense; valid: sft, dpo," in refused.stderr

    check_round2(tmp_path / "round2", out)


ROUND2_ARMS = ("dpo", "subject", "subject_oracle", "disrupted_subject")  # one per pair set and mask source


def check_round2(out: Path, earlier: Path) -> None:
    """Round 2 (``--round2``) on the smoke study's world, base model and judge: every new stage runs, an interrupted
    arm resumes from its checkpoint (the same LoRA as uninterrupted), a rerun skips everything."""
    from datasets import load_from_disk
    from safetensors.torch import load_file

    first = run(out, "--round2", "--reuse", str(earlier), "--arms", ",".join(ROUND2_ARMS))
    assert first.returncode == 0, first.stderr[-3000:]
    assert all((out / name).is_symlink() for name in ("world", "base", "judge"))
    stages = ["prompts", "validation", "agreement", "budget/b0", "budget/choice", "round2/choice",
              *(f"pairs_r1/{s}" for s in ("scorer", "oracle", "disrupted")),
              *(f"pairs_r2/{c}/seed0" for c in ("dpo", "subject")),
              *(f"{kind}/{a}/seed0" for kind in ("arms", "eval") for a in (*ROUND2_ARMS, "dpo_r2", "subject_r2"))]
    for stage in stages:
        assert (out / stage / "done.json").is_file(), stage
    # on-policy pairs with per-subject labels; the oracle's cache holds the judge's quadrants as subject masks
    scorer = load_from_disk(str(out / "pairs_r1/scorer/subject"))
    assert {"subject_scores", "subject_masks", "focus_maps", "latents"} <= set(scorer.column_names)
    row = scorer.with_format("numpy")[0]
    k = len(row["references"])
    assert np.asarray(row["subject_scores"]).shape == (2, k) and row["subject_masks"].shape == (k, 2, 8, 8)
    masks = load_from_disk(str(out / "pairs_r1/oracle/oracle")).with_format("numpy")["subject_masks"]
    assert all(set(np.unique(m)) <= {0.0, 1.0} for m in masks)
    assert "efficacy_stages.oracle:judge_scores" in (out / "pairs_r1/oracle/pairs.yaml").read_text()
    assert {"scorer", "oracle", "same_winner"} <= set(json.loads((out / "agreement/agreement.json").read_text()))
    assert "subject/label_disagrees" in (out / "arms/subject/seed0/run/metrics.jsonl").read_text()
    assert "subject/" not in (out / "arms/dpo/seed0/run/metrics.jsonl").read_text()
    second_round = (out / "arms/subject_r2/seed0/recipe.yaml").read_text()
    assert "reference_mode: frozen_adapter" in second_round and "arms/subject/seed0/run" in second_round
    assert "dpo_lora: " in (out / "pairs_r2/subject/seed0/pairs.yaml").read_text()
    report_text = (out / "report/report.md").read_text()
    for heading in ("On-policy pairs", "The budget", "Round 1", "Round 2", "Wall time"):
        assert heading in report_text, heading
    assert "| subject_r2 | 1 |" in report_text and "| subject_r2 − subject | 1 |" in report_text
    assert (out / "report/effects.png").is_file() and "effects.png" in report_text

    # an interrupted arm: its staging folder with checkpoints is resumed, not restarted
    arm = out / "arms/dpo/seed0"
    lora = load_file(str(arm / "run/pytorch_lora_weights.safetensors"))
    settings = json.loads((arm / "done.json").read_text())["settings"]
    (arm / "done.json").unlink()
    (arm / "attempt.json").write_text(json.dumps(settings))
    (arm / "run/pytorch_lora_weights.safetensors").unlink()
    arm.rename(arm.with_name(".seed0.staging"))
    again = run(out, "--round2", "--arms", ",".join(ROUND2_ARMS))
    assert again.returncode == 0, again.stderr[-3000:]
    ran = [line for line in again.stdout.splitlines() if ": running" in line and "report" not in line]
    assert ran == ["[efficacy] arm dpo seed 0: running"], ran
    assert "resuming from checkpoint-1" in again.stdout
    resumed = load_file(str(arm / "run/pytorch_lora_weights.safetensors"))
    assert all(torch.equal(lora[key], resumed[key]) for key in lora)

    # the split check: the base model and the finished arms of SPLIT_ARMS, on trained and on new training scenes
    split = run(out, "--round2", "--arms", ",".join(ROUND2_ARMS), "--split_check")
    assert split.returncode == 0, split.stderr[-3000:]
    trained = json.loads((out / "split/trained/held_out.json").read_text())
    assert trained == json.loads((out / "prompts/scenes.json").read_text())[:2]
    checked = [a for a in round2.SPLIT_ARMS if a in ROUND2_ARMS]
    for scenes in ("trained", "unseen"):
        for arm in ("base", *checked):
            assert (out / f"split_eval/{scenes}/{arm}/seed0/scores.jsonl").is_file(), (scenes, arm)
    report_text = (out / "report/report.md").read_text()
    assert "**trained** scenes:" in report_text and "| dpo | 1 |" in report_text.split("Split check")[1]
    headroom = json.loads((out / "split/headroom/headroom.json").read_text())
    assert set(headroom) == {"scorer", "oracle"} and set(headroom["oracle"]) == {"chosen", "rejected"}
    assert "| oracle | chosen |" in report_text


# ---- pure parts of the study, hand-computed -------------------------------------------------------------------
sys.path.insert(0, str(ROOT / "benchmarks"))
from efficacy_stages import judge, report, resume, round2, world  # noqa: E402


def test_score_scene_matches_references_to_quadrants():
    # references: identity 0 = (shape 0, colour 0, pattern 0), identity 22 = (1, 1, 1)
    quadrants = np.array([[1, 0, 0, 0],    # exactly identity 0
                          [1, 1, 0, 1],    # identity 22 with identity 0's colour: leakage
                          [0, -1, -1, -1],  # empty
                          [1, 4, 5, 2]])   # an extra subject
    assert judge.score_scene([0, 22], quadrants) == {"fidelity": 0.5, "leakage": 0.5, "missing": 0.0, "extra": 1}
    only_one = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert judge.score_scene([0, 22], only_one) == {"fidelity": 0.5, "leakage": 0.0, "missing": 0.5, "extra": 0}


def test_paired_bootstrap_of_a_constant_gain_is_that_gain():
    base = [np.array([0.0, 1.0, 0.5, 0.25]), np.array([1.0, 0.0, 0.0, 0.5])]
    low, high = report.paired_bootstrap([b + 0.1 for b in base], base, draws=200, seed=0)
    assert (low, high) == pytest.approx((0.1, 0.1))
    # gains of 0 or 1 per scene (mean 0.5): the interval lies inside [0, 1], around 0.5, and is not a point
    low, high = report.paired_bootstrap([np.array([1.0, 0.0] * 10)], [np.zeros(20)], draws=500, seed=0)
    assert 0 < low < 0.5 < high < 1


def test_a_difference_counts_only_past_3_points_with_an_interval_off_zero_over_enough_seeds():
    assert report.counts(0.04, 0.01, 0.07, seeds=3, min_seeds=3)
    assert not report.counts(-0.04, -0.07, 0.01, seeds=3, min_seeds=3)  # the interval holds 0
    assert not report.counts(0.02, 0.01, 0.03, seeds=3, min_seeds=3)  # under 3 points
    assert not report.counts(0.04, 0.01, 0.07, seeds=1, min_seeds=3)  # too few seeds


def test_the_effects_figure_draws_a_counted_difference_in_red(tmp_path):
    from PIL import Image

    rows = [("a (3)", {"fidelity": (4.0, 1.0, 7.0, True), "leakage": (0.0, -1.0, 1.0, False)}),
            ("b (3)", {"fidelity": (0.5, -1.0, 2.0, False), "leakage": (0.0, -1.0, 1.0, False)})]
    report.effects_figure([("round 1", rows)], tmp_path)
    pixels = np.asarray(Image.open(tmp_path / "effects.png").convert("RGB")).astype(int)
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert red.any() and np.ptp(np.nonzero(red)[0]) < 10  # one row in red: the counted one


def test_split_and_pairs_follow_the_world_rules():
    assert all(world.scene_held_out(s.identities) for s in world.make_scenes(20, 1, held_out=True))
    assert not any(world.scene_held_out(s.identities) for s in world.make_scenes(20, 1, held_out=False))
    row = world.make_pairs(3, seed=0, tag="t")[0]
    winner, loser = (np.asarray(row[k].convert("RGB"), np.int16) for k in ("chosen", "rejected"))
    inside = np.asarray(row["prior_mask"]) > 0
    changed = np.abs(winner - loser).sum(-1) > 0
    assert changed.any() and not changed[~inside].any()  # the pair differs only inside its prior box
    assert len(row["references"]) == len(row["reference_masks"]) in (2, 3)
    assert row["references"][0].size == (world.REF_SIZE, world.REF_SIZE)


def test_a_finished_stage_is_skipped_and_other_settings_are_refused(tmp_path):
    calls = []
    assert resume.run_stage(tmp_path / "s", "demo", {"steps": 1}, calls.append)
    assert not resume.run_stage(tmp_path / "s", "demo", {"steps": 1}, calls.append)
    assert len(calls) == 1 and (tmp_path / "s" / "done.json").is_file()
    with pytest.raises(resume.SettingsChanged, match="stage 'demo'.*changed: steps"):
        resume.run_stage(tmp_path / "s", "demo", {"steps": 2}, calls.append)


def test_oracle_scores_and_masks_follow_the_judges_quadrants():
    quadrants = np.array([[1, 0, 0, 0], [1, 1, 0, 1], [0, -1, -1, -1], [1, 4, 5, 2]])
    # identity 0 exact (3 right); identity 22 = (1, 1, 1) read as (1, 0, 1): 2 right, its colour leaked from 0;
    # one extra subject (quadrant 3), its penalty shared by both references
    assert judge.subject_scores([0, 22], quadrants) == pytest.approx([1.0 - 0.5, (2 - 1) / 3 - 0.5])
    assert judge.assign([0, 22], quadrants) == [0, 1]
    only_one = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert judge.subject_scores([0, 22], only_one) == [-1.0, 1.0]  # identity 0 missing


def test_budget_choice_takes_the_first_point_that_moves_without_drift():
    def verdict(fidelity, leakage=0.0, missing=0.0, extra=0.0):
        point = {"fidelity": np.array([fidelity]), "leakage": np.array([leakage]), "missing": np.array([missing]),
                 "extra": np.array([extra])}
        zero = {m: np.array([0.0]) for m in point}
        return round2.budget_verdict(point, zero)

    small, drifting, moving, later = verdict(0.02), verdict(0.08, missing=0.05), verdict(0.0, -0.06), verdict(0.1)
    assert [v["qualifies"] for v in (small, drifting, moving, later)] == [False, False, True, True]
    assert round2.choose_budget([small, drifting, moving, later])[0] == 2
    assert round2.choose_budget([small, drifting])[0] == 0  # none qualifies: the largest move without drift
    assert round2.choose_budget([drifting])[0] == 0


def test_round2_chains_keep_one_label_source():
    table = round2.arm_table(1.0, 1.0)
    assert round2.round2_chains(table, "subject") == ["dpo", "subject"]
    assert round2.round2_chains(table, "subject_oracle") == ["dpo", "subject_oracle", "dpo_oracle"]

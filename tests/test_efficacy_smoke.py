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


# ---- pure parts of the study, hand-computed -------------------------------------------------------------------
sys.path.insert(0, str(ROOT / "benchmarks"))
from efficacy_stages import judge, report, resume, world  # noqa: E402


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

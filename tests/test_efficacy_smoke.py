"""The efficacy study (benchmarks/efficacy.py) at its smoke size: every stage runs, resumes, refuses stale settings.

Quality is not tested here (the smoke models are untrained); the full study is a benchmark, not a test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "efficacy.py"


def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--smoke", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_smoke_runs_every_stage_then_resumes_and_refuses_changed_settings(tmp_path):
    out = tmp_path / "study"
    first = run(out)
    assert first.returncode == 0, first.stderr[-3000:]
    arms = ("sft", "dpo", "focusdpo", "no_complexity", "no_schedule", "no_prior", "focusdpo_sdpo")
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
    assert all(f"| {a} |" in report for a in ("base", *arms)) and "no_confidence" in report

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("done.json")}
    second = run(out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert ": running" not in second.stdout and "done, skipped" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("done.json")} == stamps

    changed = run(out, "--arm_steps", "2")
    assert changed.returncode != 0
    assert "stage 'arm sft seed 0'" in changed.stderr and "arm_steps" in changed.stderr

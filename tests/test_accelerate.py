"""The tiny recipe under ``accelerate launch``: one process, and two gloo CPU processes (DDP)."""

import json

import pytest

from conftest import REPO, accelerate_launch


def launch(out, processes, port):
    accelerate_launch([str(REPO / "tests" / "ddp_probe.py"), "--config", str(REPO / "recipes" / "tiny_cpu.yaml"),
                       "--output_dir", str(out), "--max_steps", "3", "--toy_num_pairs", "24", "--logging_steps", "1",
                       "--save_steps", "100"], processes, port)
    return [json.loads((out / f"probe-rank{r}.json").read_text()) for r in range(processes)]


def logged(out):
    return {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m}


def test_one_process(tmp_path):
    (report,) = launch(tmp_path, 1, 29511)
    assert report["world"] == 1 and len(report["pairs"]) >= 6  # 3 steps x 2 pairs (+ prefetch)
    assert logged(tmp_path)[1]["loss"] == pytest.approx(0.693147, abs=1e-5)


def test_two_cpu_processes_share_weights_split_data_and_gather_metrics(tmp_path):
    rank0, rank1 = launch(tmp_path, 2, 29512)
    assert rank0["world"] == rank1["world"] == 2
    assert rank0["weights"] == rank1["weights"]  # gradients were all-reduced
    assert not set(rank0["pairs"]) & set(rank1["pairs"]) and len(rank0["pairs"]) >= 6 and len(rank1["pairs"]) >= 6
    logs = logged(tmp_path)
    for step, (a, b) in enumerate(zip(rank0["local"], rank1["local"]), start=1):
        for name in ("rewards/margins", "mse/policy_w", "rewards/accuracies"):
            assert logs[step][name] == pytest.approx((a[name] + b[name]) / 2, rel=1e-5, abs=1e-7), (step, name)

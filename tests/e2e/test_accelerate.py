"""The tiny recipe under ``accelerate launch``: one process, and two gloo CPU processes (DDP).

The two-process run must train, and train what one process trains over the same global batch: comparing the
ranks with each other alone passes when neither trained at all (an all-zero LoRA B on both).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, accelerate_launch

pytestmark = pytest.mark.e2e

STEPS = 3
PROBE = REPO / "tests" / "e2e" / "ddp_probe.py"  # the trainer, recording what each rank saw


def launch(out, processes, port, *extra):
    accelerate_launch([str(PROBE), "--config", str(REPO / "recipes" / "tiny_cpu.yaml"),
                       "--output_dir", str(out), "--max_steps", str(STEPS), "--toy_num_pairs", "24",
                       "--logging_steps", "1", "--save_steps", "100", *extra], processes, port)
    return [json.loads((out / f"probe-rank{r}.json").read_text()) for r in range(processes)]


def logged(out):
    return {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m}


def weights(out, rank=0):
    return load_file(out / f"probe-rank{rank}.safetensors")


def test_one_process(tmp_path):
    (report,) = launch(tmp_path, 1, 29511)
    assert report["world"] == 1 and len(report["pairs"]) >= 6  # 3 steps x 2 pairs (+ prefetch)
    assert logged(tmp_path)[1]["loss"] == pytest.approx(0.693147, abs=1e-5)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """One two-process run, shared by the tests below."""
    out = tmp_path_factory.mktemp("ddp")
    return out, launch(out, 2, 29512)


def test_two_processes_train_what_one_process_trains_over_the_same_global_batch(ddp, tmp_path):
    """2 ranks x 2 pairs against 1 process x 2 pairs x 2 accumulated micro-batches: the same pairs, noise and
    timesteps each step (all seeded by the pairs), so the LoRAs agree to float rounding."""
    out, (rank0, rank1) = ddp
    (single,) = launch(tmp_path / "one", 1, 29513, "--gradient_accumulation_steps", "2")
    assert rank0["world"] == rank1["world"] == 2
    assert not set(rank0["pairs"]) & set(rank1["pairs"]) and len(rank0["pairs"]) >= 6 and len(rank1["pairs"]) >= 6
    assert set(rank0["pairs"][:2 * STEPS]) | set(rank1["pairs"][:2 * STEPS]) == set(single["pairs"][:4 * STEPS])
    ddp, ddp1, one = weights(out), weights(out, 1), weights(tmp_path / "one")
    lora_b = [name for name in ddp if "lora_B" in name]
    assert lora_b and all(ddp[name].abs().max() > 0 for name in lora_b)  # trained: B starts at exactly zero
    assert logged(out)[STEPS]["loss"] != pytest.approx(0.693147, abs=1e-6)
    for name in ddp:
        assert torch.equal(ddp[name], ddp1[name]), name  # gradients were all-reduced
        torch.testing.assert_close(ddp[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


def test_two_processes_average_their_metrics(ddp):
    out, (rank0, rank1) = ddp
    logs = logged(out)
    for step, (a, b) in enumerate(zip(rank0["local"], rank1["local"]), start=1):
        for name in ("rewards/margins", "mse/policy_w", "rewards/accuracies"):
            assert logs[step][name] == pytest.approx((a[name] + b[name]) / 2, rel=1e-5, abs=1e-7), (step, name)

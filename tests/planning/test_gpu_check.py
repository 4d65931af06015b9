"""benchmarks/gpu_check.py without a GPU: its arguments, its table, its refusal, and its step on the CPU."""

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_result() -> dict:
    row = {"name": "FLUX.2 klein 4B, 512 px, 1 ref", "checkpointing": True, "tflops_model": 120.0,
           "tflops_executed": 160.0, "bytes": 20 * 2 ** 30, "activation_bytes": 4 * 2 ** 30, "step_s": 0.5,
           "pairs_per_s": 2.0, "mfu": 120.0 / 0.5 / 989.0, "max_allocated": 18 * 2 ** 30}
    oom = {**row, "name": "SDXL, 1024 px", "checkpointing": False, "error": "out of memory: CUDA out of memory"}
    for key in ("step_s", "pairs_per_s", "mfu", "max_allocated"):
        oom.pop(key)
    return {"device": "NVIDIA H100 80GB HBM3", "peak_tflops": 989.0, "torch": torch.__version__,
            "tiny": {"command": "focusdpo train --config recipes/tiny_cpu.yaml", "rc": 0, "seconds": 40.0,
                     "tail": ""}, "rows": [row, oom]}


def test_arguments_default_to_the_out_folder_of_the_device_run(gpu_check, monkeypatch):
    monkeypatch.setenv("OUT", "/tmp/device_out")
    args = gpu_check.parse_args([])
    assert (args.out, args.steps, args.budget_s) == ("/tmp/device_out", 5, 480)
    monkeypatch.delenv("OUT")
    assert gpu_check.parse_args(["--steps", "3"]).out == "gpu_check_out"


def test_table_and_files_from_a_fake_result(gpu_check, tmp_path):
    result = fake_result()
    table = gpu_check.format_table(result)
    assert "| FLUX.2 klein 4B, 512 px, 1 ref | on | 120.0 | 160.0 | 0.500 | 2.00 | 24.3 % | 18.0 | 20.0 | 1.11 |" \
        in table
    assert "out of memory" in table and "rc 0" in table and "estimates" in table
    gpu_check.write_outputs(tmp_path, result)
    assert (tmp_path / "gpu_check.json").is_file() and "MFU" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_it_exits_with_a_clear_message_without_cuda(gpu_check, tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu_check.main(["--out", str(tmp_path)])
    assert not (tmp_path / "gpu_check.json").exists()


def test_the_timed_step_and_its_plan_run_on_the_cpu(gpu_check):
    from focusdpo.planning.presets import tiny_preset

    _, settings = gpu_check.check_settings("sd15", 32, 0, checkpointing=False)
    settings = replace(settings, lora_rank=4, lora_alpha=4)
    measured = gpu_check.timed_steps(tiny_preset("sd"), settings, steps=1, device="cpu")
    planned = gpu_check.planned(tiny_preset("sd"), settings)
    assert measured["step_s"] > 0 and measured["max_allocated"] is None
    assert planned["tflops_executed"] == planned["tflops_model"] > 0 and planned["bytes"] > 0

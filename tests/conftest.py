"""Shared test setup: offline hub, one thread per process, paths to the shared third-party data."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def dreambench() -> Path:
    """The DreamBench subset in ../shared/data (real photos; never copied into the repo)."""
    path = SHARED_DATA / "dreambench"
    if not path.is_dir():
        pytest.skip(f"shared test data not found at {path}")
    return path


def accelerate_launch(script_args: list[str], processes: int = 1, port: int = 29500) -> subprocess.CompletedProcess:
    """``accelerate launch`` on CPU (gloo for 2+ processes); fails the test with the end of stderr."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    multi = ["--multi_gpu"] if processes > 1 else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), *script_args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result

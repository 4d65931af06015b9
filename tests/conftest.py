"""Shared test setup: offline hub, one thread per process, paths to the shared third-party data."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

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

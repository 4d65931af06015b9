"""Signals and kills: SIGTERM saves a checkpoint at the step boundary; a SIGKILL during a dataset save leaves the
previous dataset intact."""

import os
import signal
import subprocess
import sys
import time

import pytest

from focusdpo.commands import main as cli
from focusdpo.data.load import load_pairs
from focusdpo.training.run_folder import LOCK_NAME

from conftest import QUICK, REPO, tiny_argv

pytestmark = pytest.mark.e2e


def test_sigterm_saves_a_checkpoint_at_the_step_boundary_and_names_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = tiny_argv(tmp_path, *QUICK, "--max_steps", "10000", "--save_steps", "100000", "--logging_steps", "1")
    proc = subprocess.Popen([sys.executable, "-m", "focusdpo.train", *argv], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    deadline = time.time() + 240
    while not (tmp_path / "metrics.jsonl").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-2000:]
    saved = sorted(tmp_path.glob("checkpoint-*"))
    assert len(saved) == 1 and f"the state is saved in {saved[0]}" in err
    assert (saved[0] / "optimizer.pt").is_file() and not (tmp_path / LOCK_NAME).exists()


KILLED_SAVE = """
import os, signal, sys
from datasets import Dataset
from focusdpo.commands import main

def killed_save(self, path, **kwargs):  # half a dataset written, then SIGKILL: no cleanup code runs
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "state.json"), "w") as f:
        f.write('{"_data_files": [')
    os.kill(os.getpid(), signal.SIGKILL)

Dataset.save_to_disk = killed_save
main(["pairs", "--out", sys.argv[1], "--num_pairs", "5", "--resolution", "16"])
"""


def test_a_kill_while_saving_a_dataset_leaves_the_previous_one_intact(tmp_path):
    out = tmp_path / "pairs"
    cli(["pairs", "--out", str(out), "--num_pairs", "3", "--resolution", "16"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(out)], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(load_pairs(str(out))) == 3  # the previous dataset, untouched
    cli(["pairs", "--out", str(out), "--num_pairs", "5", "--resolution", "16"])  # the next save clears the debris
    assert len(load_pairs(str(out))) == 5 and [p.name for p in tmp_path.iterdir()] == ["pairs"]

"""Protected outputs: an output folder that is its own input is refused before computing; a full disk names the
folder and leaves nothing half-written."""

import errno

import pytest

from focusdpo.commands import main as cli
from focusdpo.config.recipe import parse_config
from focusdpo.errors import OutputError
from focusdpo.training.trainer import build_trainer

from conftest import QUICK, TINY_RECIPE, tiny_argv


@pytest.mark.e2e
def test_out_equal_to_the_input_is_refused_before_computing(tmp_path, capsys):
    cli(["pairs", "--out", str(tmp_path / "ds"), "--num_pairs", "2", "--resolution", "16"])
    for command in ("focus", "embed"):
        with pytest.raises(SystemExit) as exit_:
            cli([command, "--out", str(tmp_path / "ds"), "--config", TINY_RECIPE, "--dataset", str(tmp_path / "ds")])
        assert exit_.value.code == 2
        assert f"focusdpo: error: the output folder {tmp_path / 'ds'} is the input {tmp_path / 'ds'}" in \
            capsys.readouterr().err


@pytest.mark.e2e
def test_a_full_disk_names_the_folder_and_leaves_no_staging(tmp_path, monkeypatch):
    import torch

    trainer = build_trainer(*parse_config(tiny_argv(tmp_path, *QUICK, "--max_steps", "1", "--save_steps", "1")))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OutputError, match=f"no space left on the device of {tmp_path} "):
        trainer.train()
    assert not (tmp_path / ".staging").exists() and not list(tmp_path.glob("checkpoint-*"))


def test_only_the_main_process_of_a_run_takes_the_lock(tmp_path):
    import json
    import os
    import socket

    from focusdpo.atomic import output_lock

    lock = tmp_path / ".out.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))  # the main process, alive
    with output_lock(tmp_path / "out", take=False):  # another rank of the same run: not refused
        pass
    with pytest.raises(OutputError, match="another process is writing"), output_lock(tmp_path / "out"):
        pass
    assert json.loads(lock.read_text())["pid"] == os.getppid()  # the holder's lock is left alone

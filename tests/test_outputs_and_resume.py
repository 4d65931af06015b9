"""Writers delete only what they made, outputs never overlap inputs, and a resume without optimizer state is refused
unless accepted (each of these lost data or state silently before)."""

import json

import pytest

from focusdpo.atomic import OUTPUT_MARKER
from focusdpo.commands import main as cli
from focusdpo.commands.train import main as train
from focusdpo.data.load import load_pairs, save_dataset
from focusdpo.errors import OutputError, RunFolderError

from conftest import REPO


def tiny(out, *extra):
    return ["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "--output_dir", str(out), "--toy_num_pairs", "4",
            "--max_steps", "2", "--save_steps", "1", "--logging_steps", "1", "--sample_every_run", "false",
            "--lambda_structure", "0", "--lambda_detail", "0", *extra]


def users_folder(path):
    path.mkdir()
    (path / "thesis.txt").write_text("years of work")
    return path


def test_a_dataset_writer_refuses_a_folder_of_files_it_did_not_write(tmp_path):
    folder = users_folder(tmp_path / "mine")
    with pytest.raises(OutputError, match="holds files focusdpo did not write"):
        save_dataset(load_pairs("toy", toy_num_pairs=2, resolution=16), str(folder))
    assert (folder / "thesis.txt").read_text() == "years of work"
    save_dataset(load_pairs("toy", toy_num_pairs=2, resolution=16), str(tmp_path / "new"))
    assert (tmp_path / "new" / OUTPUT_MARKER).exists()
    save_dataset(load_pairs("toy", toy_num_pairs=3, resolution=16), str(tmp_path / "new"))  # its own: replaced
    assert len(load_pairs(str(tmp_path / "new"))) == 3


def test_the_toy_pairs_command_keeps_a_users_folder(tmp_path, capsys):
    folder = users_folder(tmp_path / "mine")
    with pytest.raises(SystemExit) as code:
        cli(["pairs", "--out", str(folder), "--num_pairs", "2"])
    assert code.value.code == 2 and "did not write" in capsys.readouterr().err
    assert (folder / "thesis.txt").exists()


@pytest.mark.parametrize("inside", [False, True])
def test_a_run_folder_that_is_or_lies_inside_the_dataset_is_refused_even_with_overwrite(tmp_path, inside):
    save_dataset(load_pairs("toy", toy_num_pairs=4, resolution=32), str(tmp_path / "pairs"))
    out = tmp_path / "pairs" / "run" if inside else tmp_path / "pairs"
    with pytest.raises(OutputError, match="the input"):
        train(tiny(out, "--dataset", str(tmp_path / "pairs"), "--overwrite_output_dir", "true"))
    assert len(load_pairs(str(tmp_path / "pairs"))) == 4


def test_overwrite_output_dir_clears_only_a_run_folder(tmp_path):
    folder = users_folder(tmp_path / "mine")
    with pytest.raises(RunFolderError, match="overwrite_output_dir clears only a run folder"):
        train(tiny(folder, "--overwrite_output_dir", "true"))
    assert (folder / "thesis.txt").exists()


@pytest.mark.e2e
def test_a_resume_without_optimizer_state_is_refused_unless_accepted(tmp_path):
    train(tiny(tmp_path, "--save_only_model", "true"))
    with pytest.raises(RunFolderError, match="holds no optimizer.pt or scheduler.pt.*resume_with_fresh_optimizer"):
        train(tiny(tmp_path, "--save_only_model", "true", "--max_steps", "3", "--resume_from_checkpoint", "latest"))
    train(tiny(tmp_path, "--save_only_model", "true", "--max_steps", "3", "--resume_from_checkpoint", "latest",
               "--resume_with_fresh_optimizer", "true"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert 3 in steps


def test_a_second_writer_into_the_same_folder_is_refused_while_the_first_one_lives(tmp_path, capsys):
    import os
    import subprocess
    import sys

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".pairs.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": other.pid}))
        with pytest.raises(SystemExit) as code:
            cli(["pairs", "--out", str(tmp_path / "pairs"), "--num_pairs", "2"])
        assert code.value.code == 2 and f"another process is writing {tmp_path / 'pairs'} (pid {other.pid}" in \
            capsys.readouterr().err
    finally:
        other.kill()
        other.wait()
    cli(["pairs", "--out", str(tmp_path / "pairs"), "--num_pairs", "2"])  # the dead owner's lock is taken over
    assert len(load_pairs(str(tmp_path / "pairs"))) == 2 and not (tmp_path / ".pairs.lock").exists()


def test_a_start_that_failed_before_its_first_checkpoint_does_not_block_a_plain_rerun(tmp_path):
    (tmp_path / OUTPUT_MARKER).touch()
    (tmp_path / "config.yaml").write_text("family: sd\n")  # what a start writes before a tracker login fails
    (tmp_path / "metrics.jsonl").write_text("")
    train(tiny(tmp_path))
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    with pytest.raises(RunFolderError, match="already holds a run"):  # a finished run still needs a decision
        train(tiny(tmp_path))


def test_building_a_tiny_pipeline_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    from focusdpo.models.tiny import tiny_sd_pipeline

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    tiny_sd_pipeline(0)
    assert list(tmp_path.iterdir()) == []


def test_a_recipe_with_a_key_given_twice_is_refused_naming_the_key(tmp_path):
    from focusdpo.config.recipe import parse_config
    from focusdpo.errors import ConfigError

    recipe = tmp_path / "twice.yaml"
    recipe.write_text((REPO / "recipes" / "tiny_cpu.yaml").read_text() + "beta: 10.0\n")
    with pytest.raises(ConfigError, match="the key 'beta' is given twice"):
        parse_config(["--config", str(recipe)])


def test_a_truncated_personalization_lora_is_refused_before_the_model_loads(tmp_path):
    from focusdpo.errors import LoraFileError
    from focusdpo.models.base import check_lora_file

    (tmp_path / "lora.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(LoraFileError, match="cannot be read"):
        check_lora_file(str(tmp_path / "lora.safetensors"), "sd", "personalization_lora")


def test_plot_skips_a_half_written_last_line(tmp_path, capsys):
    from focusdpo.training.plot import plot_run

    lines = [json.dumps({"step": s, "loss": 0.69 - 0.01 * s}) for s in (1, 2, 3)] + ['{"step": 4, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    assert plot_run(tmp_path).is_file()
    assert "skipped 1 line(s) that are not JSON (line 4)" in capsys.readouterr().err


def test_plot_of_a_log_without_training_lines_is_one_error_line(tmp_path, capsys):
    from focusdpo.commands import main as cli

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo\n\x00\x00garbage\n' + json.dumps({"step": 0}) + "\n")
    with pytest.raises(SystemExit) as exit_:
        cli(["plot", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("focusdpo: error: ")
    assert "holds no training log lines yet (no 'loss'; skipped 2 line(s) that are not JSON (line 1, ...))" in err


def test_a_prompt_file_that_is_not_utf8_is_named(tmp_path):
    from focusdpo.data.prompt_sets import load_prompt_set
    from focusdpo.errors import PromptSetError

    (tmp_path / "prompts.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(PromptSetError, match="prompts.jsonl is not UTF-8 text"):
        load_prompt_set(tmp_path / "prompts.jsonl")


def test_a_second_export_to_one_file_is_refused_while_the_first_lives(tmp_path):
    import os
    import socket

    from peft import LoraConfig

    from focusdpo.export import export_lora
    from focusdpo.models import load_backbone

    backbone = load_backbone("sd")
    backbone.denoiser.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=list(backbone.default_lora_targets)))
    backbone.save_lora(tmp_path)
    owner = os.getppid()  # a live process on this host that is not this one
    (tmp_path / ".lora_kohya.safetensors.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": owner}))
    with pytest.raises(OutputError, match=f"another process is writing {tmp_path / 'lora_kohya.safetensors'} "
                                          f"\\(pid {owner}"):
        export_lora(tmp_path, "sd")
    assert not (tmp_path / "lora_kohya.safetensors").exists()

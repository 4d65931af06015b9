"""Resuming: after a kill the run continues its loss trajectory and weight average; a resume checks its settings
against the checkpoint and steps past a damaged one."""

import shutil

import pytest
import torch
from transformers import TrainerCallback

from focusdpo.commands.train import main
from focusdpo.config.recipe import parse_config
from focusdpo.errors import ConfigError, RunFolderError
from focusdpo.training.trainer import build_trainer

from conftest import QUICK, losses_by_step, read_metrics, tiny_argv

pytestmark = pytest.mark.e2e


class CrashAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


def full_and_resumed_runs(tmp_path, argv: list[str], saved: str):
    """An uninterrupted 6-step run, and one killed at step 4 (``saved`` checked in checkpoint-3) then resumed."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    main(tiny_argv(full, *argv))
    trainer = build_trainer(*parse_config(tiny_argv(killed, *argv)), callbacks=[CrashAt(4)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (killed / "checkpoint-3" / saved).is_file()
    main(tiny_argv(killed, *argv, "--resume_from_checkpoint", str(killed / "checkpoint-3")))
    return full, killed


def test_resume_after_a_kill_continues_the_loss_trajectory(tmp_path):
    argv = ["--max_steps", "6", "--save_steps", "3", "--sample_every_run", "false"]
    full, killed = full_and_resumed_runs(tmp_path, argv, "optimizer.pt")
    expected, got = losses_by_step(full), losses_by_step(killed)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


def test_ema_survives_a_kill_and_is_what_the_run_writes(tmp_path):
    from safetensors.torch import load_file

    argv = ["--max_steps", "6", "--save_steps", "3", "--sample_every_run", "false", "--ema_decay", "0.9"]
    full, killed = full_and_resumed_runs(tmp_path, argv, "ema.safetensors")
    written, resumed = (load_file(str(out / "pytorch_lora_weights.safetensors")) for out in (full, killed))
    raw = load_file(str(full / "checkpoint-6" / "pytorch_lora_weights.safetensors"))  # the step-6 weights
    assert written.keys() == resumed.keys() == raw.keys()
    for key in written:
        torch.testing.assert_close(resumed[key], written[key], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(written[k], raw[k]) for k in written)  # the run wrote the average, not step 6
    main(tiny_argv(tmp_path / "plain", "--max_steps", "2", "--save_steps", "2", "--sample_every_run", "false"))
    with pytest.raises(ValueError, match="has no ema.safetensors"):  # a checkpoint saved without an EMA
        main(tiny_argv(tmp_path / "plain", "--max_steps", "3", "--save_steps", "2", "--sample_every_run", "false",
                       "--ema_decay", "0.9", "--resume_from_checkpoint", "latest"))


def test_automatic_beta_survives_a_kill(tmp_path):
    from safetensors.torch import load_file

    argv = ["--max_steps", "6", "--save_steps", "3", "--sample_every_run", "false",
            "--beta_target_gradient_factor", "0.45", "--beta_adapt_rate", "2.0"]
    full, killed = full_and_resumed_runs(tmp_path, argv, "auto_beta.json")
    expected, got = ({m["step"]: m["dpo/beta"] for m in read_metrics(out) if "loss" in m} for out in (full, killed))
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert len(set(expected.values())) > 2  # β moved
    for step in (4, 5, 6):  # the resumed steps start from checkpoint-3's β, not from beta
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    written, resumed = (load_file(str(out / "pytorch_lora_weights.safetensors")) for out in (full, killed))
    for key in written:
        torch.testing.assert_close(resumed[key], written[key], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step run with checkpoint-2 and checkpoint-4 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("run") / "run"
    main(tiny_argv(out, *QUICK, "--max_steps", "4"))
    return out


@pytest.mark.parametrize("extra, message", [
    (["--lora_rank", "8"], "lora_rank: 4 in the checkpoint, 8 now"),
    (["--resolution", "48"], "resolution: 32 in the checkpoint, 48 now"),
    (["--family", "flux2"], "family: 'sd' in the checkpoint, 'flux2' now"),
    (["--quantize_base", "int8_weight_only"], "quantize_base: 'none' in the checkpoint, 'int8_weight_only' now"),
    (["--lora_target_modules", "to_q"], r"lora_target_modules: \[\] in the checkpoint, \['to_q'\] now"),
    (["--learning_rate", "0.01"], "restores its optimizer and learning-rate schedule, so the change is refused .*"
                                  "learning_rate: 0.001 in the checkpoint, 0.01 now"),
    (["--lr_scheduler_type", "cosine"], "lr_scheduler_type: 'linear' in the checkpoint, 'cosine' now"),
])
def test_resume_with_settings_that_cannot_apply_is_refused(finished_run, no_model, extra, message):
    with pytest.raises(ConfigError, match=message):
        main(tiny_argv(finished_run, *QUICK, "--max_steps", "4", "--resume_from_checkpoint", "latest", *extra))


def test_resume_keeps_each_segments_config_and_reports_applied_changes(finished_run, tmp_path, capsys):
    run = shutil.copytree(finished_run, tmp_path / "run")
    main(tiny_argv(run, *QUICK, "--max_steps", "6", "--beta", "2500", "--resume_from_checkpoint", "latest"))
    assert "changed settings, applied from its step on: max_steps 4 -> 6, beta 5000.0 -> 2500.0" in \
        capsys.readouterr().err
    assert "beta: 5000.0" in (run / "config.segment-1.yaml").read_text()
    assert "beta: 2500.0" in (run / "config.yaml").read_text()
    assert (run / "checkpoint-6").is_dir()


def test_a_damaged_newest_checkpoint_names_the_file_and_the_previous_one(finished_run, tmp_path, capsys):
    run = shutil.copytree(finished_run, tmp_path / "run")
    weights = run / "checkpoint-4" / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a half-copied file
    with pytest.raises(RunFolderError, match=f"{weights} is damaged .* resume from {run / 'checkpoint-2'} instead"):
        main(tiny_argv(run, *QUICK, "--max_steps", "4", "--resume_from_checkpoint", str(run / "checkpoint-4")))
    main(tiny_argv(run, *QUICK, "--max_steps", "4", "--resume_from_checkpoint", "latest"))
    assert f"resuming from {run / 'checkpoint-2'}: the newer checkpoint-4 is damaged" in capsys.readouterr().err


def test_resuming_a_checkpoint_at_max_steps_trains_nothing(tmp_path, capsys):
    """A run killed between its last checkpoint and its final save resumes to the same result (the Trainer alone
    takes one more optimizer step when max_steps ends inside an epoch)."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    argv = tiny_argv(run, *QUICK, "--toy_num_pairs", "16", "--max_steps", "3", "--save_steps", "3")
    main(argv)
    (run / "pytorch_lora_weights.safetensors").unlink()
    main([*argv, "--resume_from_checkpoint", "latest"])
    assert "checkpoint-3 is at max_steps 3: nothing left to train" in capsys.readouterr().err
    assert not (run / "checkpoint-4").exists()
    written = load_file(str(run / "pytorch_lora_weights.safetensors"))
    saved = load_file(str(run / "checkpoint-3" / "pytorch_lora_weights.safetensors"))
    assert written.keys() == saved.keys()
    for key in written:
        torch.testing.assert_close(written[key], saved[key], rtol=0, atol=0)
    assert [m["step"] for m in read_metrics(run) if "loss" in m] == [1, 2, 3]

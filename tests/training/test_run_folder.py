"""Run folders and up-front checks: every bad input stops before the model loads with a message naming the field,
file or pair; no run a user made is overwritten or shared."""

import json
import os
import subprocess
import sys

import pytest

from focusdpo.commands.train import main
from focusdpo.config.recipe import parse_config
from focusdpo.data.toy import make_toy_pairs
from focusdpo.errors import ConfigError, LoraFileError, PairDataError, RunFolderError
from focusdpo.training.run_folder import LOCK_NAME, numerics_advice
from focusdpo.training.trainer import build_trainer

from conftest import QUICK, REPO, TINY_RECIPE, tiny_argv


@pytest.mark.parametrize("extra, error, message", [
    (["--reference_mode", "frozen_adapter", "--personalization_lora", "gone/lora"], LoraFileError,
     "personalization_lora: 'gone/lora' does not exist"),
    (["--lambda_detail", "1", "--dino_random_weights", "false", "--dino_weights", "gone.pth"], FileNotFoundError,
     "dino_weights file 'gone.pth' does not exist"),
    (["--lambda_detail", "1", "--dino_random_weights", "false"], ConfigError, "set dino_weights"),
    (["--family", "flux2", "--drop_text_encoders", "true"], ValueError, "drop_text_encoders: true needs prompt"),
    (["--max_references", "1"], PairDataError, "references but max_references=1"),
    (["--personalization_lora", "runs/uno"], ConfigError,
     "trained on only with reference_mode: frozen_adapter .* it would be ignored"),
])
def test_missing_inputs_are_refused_before_the_model_loads(tmp_path, no_model, extra, error, message):
    with pytest.raises(error, match=message):
        main(tiny_argv(tmp_path / "run", *QUICK, *extra))


def test_frozen_adapter_needs_an_existing_lora(tmp_path):
    with pytest.raises(ConfigError, match="needs personalization_lora"):
        parse_config(["--config", TINY_RECIPE, "--reference_mode", "frozen_adapter"])
    argv = ["--config", TINY_RECIPE, "--output_dir", str(tmp_path), "--reference_mode", "frozen_adapter",
            "--personalization_lora", str(tmp_path / "missing")]
    with pytest.raises(LoraFileError, match="personalization_lora: .*missing.* does not exist"):
        main(argv)


def test_structure_term_on_pairs_without_references_is_refused_before_the_model_loads(tmp_path):
    refs = make_toy_pairs(3, 32).map(lambda row, i: {"references": [] if i == 1 else row["references"],
                                                     "reference_masks": []}, with_indices=True)
    refs.save_to_disk(str(tmp_path / "pairs"))
    argv = ["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "--output_dir", str(tmp_path / "run"),
            "--dataset", str(tmp_path / "pairs"), "--lambda_structure", "1"]
    with pytest.raises(PairDataError, match="pair toy-00001 has no references: the structure term"):
        build_trainer(*parse_config(argv))


def test_numerics_advice_names_the_config_field():
    configs = parse_config(["--config", TINY_RECIPE])
    train_cfg, model_cfg, _, loss_cfg, focus_cfg = configs
    assert "lower learning_rate (now 0.001) or beta (now 5000.0)" in numerics_advice(train_cfg, model_cfg,
                                                                                     loss_cfg, focus_cfg)
    loss_cfg.beta_target_gradient_factor = 0.3  # the automatic β: the configured beta is only its start
    advice = numerics_advice(train_cfg, model_cfg, loss_cfg, focus_cfg, current_beta=12345.0)
    assert "beta_max (now 500000.0; the automatic β was 12345.0 at this step)" in advice
    assert "beta (now" not in advice
    model_cfg.lora_alpha, focus_cfg.top_n = float("nan"), 0  # set after validation, e.g. from Python
    advice = numerics_advice(train_cfg, model_cfg, loss_cfg, focus_cfg)
    assert "lora_alpha=nan" in advice and "top_n=0" in advice and "learning_rate" not in advice


# ---- output folders: never mixed, never shared -----------------------------------------------------------------------
def test_a_fresh_run_into_a_folder_holding_a_run_is_refused(tmp_path, no_model):
    (tmp_path / "checkpoint-8").mkdir()
    with pytest.raises(RunFolderError, match="already holds a run .*checkpoint-8.*overwrite_output_dir"):
        main(tiny_argv(tmp_path, *QUICK))
    assert (tmp_path / "checkpoint-8").is_dir() and not (tmp_path / LOCK_NAME).exists()


@pytest.mark.e2e
def test_overwrite_output_dir_clears_the_old_run_first(tmp_path):
    (tmp_path / "checkpoint-8").mkdir()
    main(tiny_argv(tmp_path, *QUICK, "--overwrite_output_dir", "true"))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_second_run_into_a_locked_folder_stops_naming_the_pid(tmp_path, no_model):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": other.pid}))
        with pytest.raises(RunFolderError, match=f"another run is training into .* \\(pid {other.pid} "):
            main(tiny_argv(tmp_path, *QUICK))
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, no_model):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout)}))
    with pytest.raises(AssertionError, match="model was loaded"):  # got past the lock
        main(tiny_argv(tmp_path, *QUICK))


def test_resume_latest_without_checkpoints_says_so(tmp_path, no_model):
    with pytest.raises(RunFolderError, match="holds no checkpoint-N folder"):
        main(tiny_argv(tmp_path, *QUICK, "--resume_from_checkpoint", "latest"))


def test_an_sdxl_lora_for_an_sd_base_is_refused_before_the_model_loads(tmp_path, no_model):
    from peft import LoraConfig

    from focusdpo.models import load_backbone
    from focusdpo.models.tiny import tiny_sd_pipeline

    tiny_sd_pipeline(seed=0).save_pretrained(tmp_path / "sd")
    sdxl = load_backbone("sdxl")
    sdxl.denoiser.add_adapter(LoraConfig(r=2, target_modules=["to_k"]))
    sdxl.save_lora(tmp_path / "sdxl_lora")
    with pytest.raises(LoraFileError, match="personalization_lora: .*sdxl_lora.* does not fit the unet of .*SDXL"):
        main(tiny_argv(tmp_path / "run", *QUICK, "--pretrained_path", str(tmp_path / "sd"), "--reference_mode",
                       "frozen_adapter", "--personalization_lora", str(tmp_path / "sdxl_lora")))

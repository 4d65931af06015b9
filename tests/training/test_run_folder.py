"""A catalogue of refused inputs and protected work: every bad input stops before the model loads with a
message naming the field, file, pair or line; no run, checkpoint or cache a user made is lost.

The tables are the catalogue; the behavioural tests below them cover what a table cannot (a second run,
a resume, a signal, a kill during a save, a full disk).
"""

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from datasets import Dataset
from PIL import Image

import focusdpo.training.trainer
from focusdpo.commands import main as cli
from focusdpo.errors import ConfigError
from focusdpo.config.recipe import parse_config
from focusdpo.data.collate import PairCollator
from focusdpo.errors import PairDataError
from focusdpo.data.load import load_pairs
from focusdpo.training.run_folder import LOCK_NAME, numerics_advice
from focusdpo.errors import RunFolderError
from focusdpo.errors import OutputError
from focusdpo.training.trainer import build_trainer
from focusdpo.commands.train import main
from focusdpo.training.trainer import MetricsFileCallback

from conftest import REPO

RECIPE = str(REPO / "recipes" / "tiny_cpu.yaml")
FAST = ["--max_steps", "2", "--toy_num_pairs", "4", "--save_steps", "2", "--sample_every_run", "false",
        "--lambda_structure", "0", "--lambda_detail", "0"]


def tiny(out, *extra):
    return ["--config", RECIPE, "--output_dir", str(out), *FAST, *extra]


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: a refusal must come before it."""
    def load_backbone(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was refused")
    monkeypatch.setattr(focusdpo.training.trainer, "load_backbone", load_backbone)


# ---- configuration: types and ranges, before data or models load ----------------------------------------
def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("yaml_text, message", [
    ("learning_rate: 0\n", "learning_rate=0 .*allow_zero_learning_rate"),
    ("learning_rate: .nan\n", "learning_rate=nan must be a finite number > 0"),
    ("learning_rate: [0.1, 0.2]\n", r"learning_rate=\[0.1, 0.2\] is a list, but learning_rate takes float"),
    ("per_device_train_batch_size: 0\n", "per_device_train_batch_size=0 must be an integer >= 1"),
    ("gradient_accumulation_steps: 0\n", "gradient_accumulation_steps=0 must be an integer >= 1"),
    ("max_steps: 0\n", "max_steps=0 must be an integer >= 1"),
    ("max_steps: null\n", "max_steps=None is null, but max_steps takes int"),
    ("lora_alpha: -4\n", "lora_alpha=-4 must be a finite number > 0"),
    ("lora_alpha: .nan\n", "lora_alpha=nan must be a finite number > 0"),
    ("lora_rank: 2.5\n", "lora_rank=2.5 is a float, but lora_rank takes int"),
    ("max_references: -1\n", "max_references=-1 must be an integer >= 0"),
    ("top_n: 0\n", "top_n=0 must be an integer >= 1"),
    ("dino_image_size: 0\n", "dino_image_size=0 must be an integer >= 14"),
    ("dino_image_size: 50\n", "dino_image_size=50 must be a multiple of 14"),
    ("family: [sd]\n", r"family=\['sd'\] is a list, but family takes str"),
    ("lora_target_modules: to_q\n", "lora_target_modules='to_q' is a str, but lora_target_modules takes list"),
    ("on_bad_pair: ignore\n", "on_bad_pair='ignore' is not valid; choose one of: error, skip"),
    ("learning_rat: 0.1\n", "unknown config key 'learning_rat' .*did you mean 'learning_rate'"),
])
def test_bad_config_values_are_named(tmp_path, yaml_text, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(["--config", write(tmp_path, yaml_text)])


@pytest.mark.parametrize("argv, message", [
    (["--learning_rat", "0.1"], "unknown option --learning_rat .*did you mean 'learning_rate'"),
    (["--config"], "--config needs a recipe file"),
    (["--config", "--max_steps", "3"], "--config needs a recipe file"),
    (["--max_steps", "0"], "max_steps=0"),
])
def test_bad_command_lines_are_named(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv)


def test_config_equals_file_is_read():
    assert parse_config([f"--config={RECIPE}"])[0].learning_rate == pytest.approx(1e-3)


def test_a_refused_input_ends_in_its_message_not_a_traceback(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["train", "--config", RECIPE, "--top_n", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "focusdpo: error: top_n=0 must be an integer >= 1\n"


def test_unknown_subcommand_says_so(capsys):
    with pytest.raises(SystemExit):
        cli(["trian"])
    assert "unknown command 'trian'; did you mean 'train'?" in capsys.readouterr().err


# ---- data: every pair checked up front, lines named ------------------------------------------------------
def png(colour="red", size=(16, 16), mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jsonl_folder(folder, lines, files=None):
    files = {"w.png": png("red"), "l.png": png("blue"), "r.png": png("green"), **(files or {})}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "pairs.jsonl").write_text("\n".join(line if isinstance(line, str) else json.dumps(line)
                                                  for line in lines) + "\n")
    return str(folder)


GOOD = {"prompt": "a dog", "chosen": "w.png", "rejected": "l.png"}


@pytest.mark.parametrize("line, files, message", [
    ('["a dog", "w.png", "l.png"]', {}, r"pairs.jsonl line 2: expected a JSON object .* got a list"),
    ({"prompt": "a dog", "chosen": "w.png"}, {}, r"line 2: missing key\(s\) \['rejected'\]"),
    ({**GOOD, "prompt": None}, {}, "line 2: prompt must be a non-empty string, got None"),
    ({**GOOD, "chosen": 3}, {}, "line 2: chosen must be a non-empty string, got 3"),
    ({**GOOD, "references": "r.png"}, {}, r"line 2: references must be a list .*write \['r.png'\]"),
    ({**GOOD, "prior_mask": [1]}, {}, r"line 2: prior_mask must be an image path or null"),
    ({**GOOD, "references": ["r.png"], "reference_masks": ["m.png"]}, {"m.png": png("white", (8, 8), "L")},
     r"pair line-2: reference_masks\[0\] is 8x8 but references\[0\] is 16x16"),
    ({**GOOD, "prior_mask": "m.png"}, {"m.png": png("white", (16, 8), "L")},
     "pair line-2: prior_mask is 16x8 but chosen is 16x16"),
    ({**GOOD, "references": ["r.png"] * 7}, {}, "pair line-2 has 7 references but max_references=6"),
    ({**GOOD, "rejected": "cut.png"}, {"cut.png": png("blue")[:-20]}, r"pair line-2: rejected .*cut.png.* truncated"),
])
def test_bad_pairs_are_named_by_line_or_pair(tmp_path, line, files, message):
    with pytest.raises(PairDataError, match=message):
        load_pairs(jsonl_folder(tmp_path, [GOOD, line], files), max_references=6)


def test_the_whole_dataset_is_checked_not_only_the_first_pairs(tmp_path):
    lines = [GOOD] * 20 + [{**GOOD, "chosen": "bad.png", "pair_id": "p21"}]
    with pytest.raises(PairDataError, match=r"pair p21: chosen image .*bad.png"):
        load_pairs(jsonl_folder(tmp_path, lines, {"bad.png": b"not an image"}))


def test_on_bad_pair_skip_logs_counts_and_drops(tmp_path, capsys):
    lines = [GOOD, {**GOOD, "chosen": "bad.png", "pair_id": "p2"}, GOOD]
    pairs = load_pairs(jsonl_folder(tmp_path, lines, {"bad.png": b"junk"}), on_bad_pair="skip")
    assert pairs["pair_id"] == ["line-1", "line-3"]
    err = capsys.readouterr().err
    assert "skipped: pair p2: chosen image" in err and "dropped 1 of 3 pairs" in err
    with pytest.raises(PairDataError, match="no pairs left: all 1 pairs are bad"):
        load_pairs(jsonl_folder(tmp_path, [{**GOOD, "chosen": "bad.png"}]), on_bad_pair="skip")


def test_pickapic_invalid_labels_are_counted_and_no_pairs_left_says_why(tmp_path, capsys):
    red, blue = png("red"), png("blue")
    Dataset.from_dict({"jpg_0": [red] * 4, "jpg_1": [blue] * 4, "label_0": [1.0, 0.5, 2.0, None],
                       "caption": ["a", "tie", "bad", "none"]}).to_parquet(str(tmp_path / "p.parquet"))
    assert load_pairs(str(tmp_path / "p.parquet"))["prompt"] == ["a"]
    assert "1 of 4 rows kept; dropped 1 ties (label_0 = 0.5) and 2 invalid label_0" in capsys.readouterr().err
    Dataset.from_dict({"jpg_0": [red] * 2, "jpg_1": [blue] * 2, "label_0": [0.5, 7.0],
                       "caption": ["tie", "bad"]}).to_parquet(str(tmp_path / "q.parquet"))
    with pytest.raises(PairDataError, match="no pairs left in .*q.parquet: of 2 rows, 1 ties .* and 1 invalid"):
        load_pairs(str(tmp_path / "q.parquet"))


def test_sixteen_bit_png_keeps_its_grey_level(tmp_path):
    grey = Image.fromarray(np.full((16, 16), 32896, np.uint16))  # 128 * 257: mid grey in 16 bits
    grey.save(tmp_path / "w.png")
    Image.fromarray(np.zeros((16, 16), np.uint16)).save(tmp_path / "l.png")
    pairs = load_pairs(jsonl_folder(tmp_path, [GOOD], {"w.png": (tmp_path / "w.png").read_bytes(),
                                                       "l.png": (tmp_path / "l.png").read_bytes()}))
    chosen = (PairCollator(16)([pairs[0]])["pixel_values"][0] + 1) / 2
    assert chosen.mean().item() == pytest.approx(128 / 255, abs=1e-3)  # PIL's own convert gives white (1.0)


def test_reading_a_dataset_writes_nothing_into_its_folder(tmp_path):
    cli(["pairs", "--out", str(tmp_path / "ds"), "--num_pairs", "2", "--resolution", "16"])
    before = sorted(os.listdir(tmp_path / "ds"))
    load_pairs(str(tmp_path / "ds"))
    assert sorted(os.listdir(tmp_path / "ds")) == before  # a read-only location would have failed here


# ---- inputs checked before the model loads ---------------------------------------------------------------
@pytest.mark.parametrize("extra, error, message", [
    (["--reference_mode", "frozen_adapter", "--personalization_lora", "gone/lora"], FileNotFoundError,
     "personalization_lora='gone/lora' does not exist"),
    (["--lambda_detail", "1", "--dino_random_weights", "false", "--dino_weights", "gone.pth"], FileNotFoundError,
     "dino_weights file 'gone.pth' does not exist"),
    (["--lambda_detail", "1", "--dino_random_weights", "false"], ConfigError, "set dino_weights"),
    (["--family", "flux2", "--drop_text_encoders", "true"], ValueError, "drop_text_encoders: true needs prompt"),
    (["--max_references", "1"], PairDataError, "references but max_references=1"),
])
def test_missing_inputs_are_refused_before_the_model_loads(tmp_path, no_model, extra, error, message):
    with pytest.raises(error, match=message):
        main(tiny(tmp_path / "run", *extra))


def test_caches_made_for_another_run_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    args = ["--config", RECIPE, "--toy_num_pairs", "2", "--max_steps", "1"]
    cli(["focus", "--out", str(tmp_path / "cached"), "--device", "cpu", *args])
    monkeypatch.setattr(focusdpo.training.trainer, "load_backbone", None)  # a model load would raise TypeError
    with pytest.raises(ValueError, match="cached focus maps were made as .* re-run `focusdpo focus`"):
        main(tiny(tmp_path / "run", "--dataset", str(tmp_path / "cached"), "--lambda_detail", "1", "--top_n", "1"))


def test_out_equal_to_the_input_is_refused_before_computing(tmp_path, capsys):
    cli(["pairs", "--out", str(tmp_path / "ds"), "--num_pairs", "2", "--resolution", "16"])
    for command in ("focus", "embed"):
        with pytest.raises(SystemExit) as exit_:
            cli([command, "--out", str(tmp_path / "ds"), "--config", RECIPE, "--dataset", str(tmp_path / "ds")])
        assert exit_.value.code == 2
        assert f"focusdpo: error: --out {tmp_path / 'ds'} is the input dataset itself" in capsys.readouterr().err


# ---- output folders: never mixed, never shared -----------------------------------------------------------
def test_a_fresh_run_into_a_folder_holding_a_run_is_refused(tmp_path, no_model):
    (tmp_path / "checkpoint-8").mkdir()
    with pytest.raises(RunFolderError, match="already holds a run .*checkpoint-8.*overwrite_output_dir"):
        main(tiny(tmp_path))
    assert (tmp_path / "checkpoint-8").is_dir() and not (tmp_path / LOCK_NAME).exists()


def test_overwrite_output_dir_clears_the_old_run_first(tmp_path):
    (tmp_path / "checkpoint-8").mkdir()
    main(tiny(tmp_path, "--overwrite_output_dir", "true"))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_second_run_into_a_locked_folder_stops_naming_the_pid(tmp_path, no_model):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": other.pid}))
        with pytest.raises(RunFolderError, match=f"another run \\(pid {other.pid} "):
            main(tiny(tmp_path))
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, no_model):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout)}))
    with pytest.raises(AssertionError, match="model was loaded"):  # got past the lock
        main(tiny(tmp_path))


# ---- resume: checked settings, intact checkpoints ---------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step run with checkpoint-2 and checkpoint-4 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("run") / "run"
    main(tiny(out, "--max_steps", "4"))
    return out


@pytest.mark.parametrize("extra, message", [
    (["--lora_rank", "8"], "lora_rank: 4 in the checkpoint, 8 now"),
    (["--resolution", "48"], "resolution: 32 in the checkpoint, 48 now"),
    (["--family", "flux2"], "family: 'sd' in the checkpoint, 'flux2' now"),
    (["--lora_target_modules", "to_q"], r"lora_target_modules: \[\] in the checkpoint, \['to_q'\] now"),
    (["--learning_rate", "0.01"], "restores its optimizer and learning-rate schedule, so the change is refused .*"
                                  "learning_rate: 0.001 in the checkpoint, 0.01 now"),
    (["--lr_scheduler_type", "cosine"], "lr_scheduler_type: 'linear' in the checkpoint, 'cosine' now"),
])
def test_resume_with_settings_that_cannot_apply_is_refused(finished_run, no_model, extra, message):
    with pytest.raises(ConfigError, match=message):
        main(tiny(finished_run, "--max_steps", "4", "--resume_from_checkpoint", "latest", *extra))


def test_resume_keeps_each_segments_config_and_reports_applied_changes(finished_run, tmp_path, capsys):
    run = shutil.copytree(finished_run, tmp_path / "run")
    main(tiny(run, "--max_steps", "6", "--beta", "2500", "--resume_from_checkpoint", "latest"))
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
        main(tiny(run, "--max_steps", "4", "--resume_from_checkpoint", str(run / "checkpoint-4")))
    main(tiny(run, "--max_steps", "4", "--resume_from_checkpoint", "latest"))
    assert f"resuming from {run / 'checkpoint-2'}: the newer checkpoint-4 is damaged" in capsys.readouterr().err


def test_resume_latest_without_checkpoints_says_so(tmp_path, no_model):
    with pytest.raises(RunFolderError, match="holds no checkpoint-N folder"):
        main(tiny(tmp_path, "--resume_from_checkpoint", "latest"))


# ---- signals, full disks, kills during a save ------------------------------------------------------------
def test_sigterm_saves_a_checkpoint_at_the_step_boundary_and_names_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = tiny(tmp_path, "--max_steps", "10000", "--save_steps", "100000", "--logging_steps", "1")
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


def test_a_full_disk_names_the_folder_and_leaves_no_staging(tmp_path, monkeypatch):
    import torch

    trainer = build_trainer(*parse_config(tiny(tmp_path, "--max_steps", "1", "--save_steps", "1")))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OutputError, match=f"no space left on the device of {tmp_path} "):
        trainer.train()
    assert not (tmp_path / ".staging").exists() and not list(tmp_path.glob("checkpoint-*"))


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


# ---- numerics: advice names the field; metrics stay valid JSON -------------------------------------------
def test_metrics_jsonl_holds_strict_json(tmp_path):
    from transformers import TrainerState

    args = type("Args", (), {"output_dir": str(tmp_path)})()
    MetricsFileCallback().on_log(args, TrainerState(), None, logs={"loss": float("nan"), "grad_norm": float("inf"),
                                                                   "learning_rate": 0.1})
    record = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert record["loss"] is None and record["non_finite"] == {"loss": "nan", "grad_norm": "inf"}


def test_numerics_advice_names_the_config_field():
    configs = parse_config(["--config", RECIPE])
    train_cfg, model_cfg, _, loss_cfg, focus_cfg = configs
    assert "lower learning_rate (now 0.001) or beta (now 5000.0)" in numerics_advice(train_cfg, model_cfg,
                                                                                     loss_cfg, focus_cfg)
    model_cfg.lora_alpha, focus_cfg.top_n = float("nan"), 0  # set after validation, e.g. from Python
    advice = numerics_advice(train_cfg, model_cfg, loss_cfg, focus_cfg)
    assert "lora_alpha=nan" in advice and "top_n=0" in advice and "learning_rate" not in advice

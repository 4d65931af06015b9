"""What a run checks before the model loads: its output folder, its lock, what it resumes, its inputs.

- A fresh run refuses a non-empty ``output_dir`` (``overwrite_output_dir: true`` clears it first), so
  checkpoints of two runs never mix and ``latest`` never resumes the wrong one.
- A lock file names the process training into the folder; a second run into it stops at once.
- ``resume_from_checkpoint`` is resolved to an intact checkpoint, and the new settings are compared with
  the checkpoint's own ``focusdpo_config.yaml``: what cannot apply is refused, naming both values.
- Personalization LoRA, feature weights and the dataset's caches are checked against the run's settings.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from focusdpo.atomic import LOCK_NAME, OUTPUT_MARKER, check_out_is_not_input, mark_output, release_lock, take_lock
from focusdpo.caches import check_encoder_key
from focusdpo.config.recipe import config_fields
from focusdpo.data.load import first_pair_without_references
from focusdpo.errors import ConfigError, PairDataError, RunFolderError
from focusdpo.models import resolve_grid
from focusdpo.models.base import LORA_WEIGHTS_NAME, check_lora_file

CHECKPOINT_CONFIG = "focusdpo_config.yaml"

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")

# Settings that shape the trained weights: a checkpoint cannot continue under other values.
FIXED_ON_RESUME = ("family", "pretrained_path", "tiny_seed", "quantize_base", "lora_rank", "lora_alpha",
                   "lora_target_modules", "reference_mode", "personalization_lora", "resolution")

# The optimizer and schedule come back from the checkpoint, so a new value would be silently ignored: refused.
RESTORED_ON_RESUME = ("learning_rate", "lr_scheduler_type", "warmup_steps", "optim", "weight_decay",
                      "adam_beta1", "adam_beta2", "adam_epsilon")

NOT_COMPARED = ("output_dir", "resume_from_checkpoint", "overwrite_output_dir", "logging_dir", "run_name",
                "resume_with_fresh_optimizer")

# What a checkpoint needs for the optimizer and the learning-rate schedule to continue (the Trainer's file names)
OPTIMIZER_STATE = ("optimizer.pt", "scheduler.pt")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


# ---- the output folder ------------------------------------------------------------------------------
def prepare_output_dir(out: Path, resuming: bool, overwrite: bool, inputs: tuple = ()) -> Path | None:
    """Create ``out``, check it is writable, lock it, and refuse (or, with ``overwrite``, clear) a folder
    that already holds a run. ``out`` may not be, hold or lie inside one of the run's ``inputs``, and
    ``overwrite`` clears only a folder focusdpo wrote. Returns the lock file (main process) or None (other
    processes)."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"output_dir={str(out)!r} is a file, not a folder: choose another output_dir")
    check_out_is_not_input(out, *inputs)
    if not is_main_process():
        return None
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise RunFolderError(f"output_dir={str(out)!r} is not writable ({e.strerror}): choose a folder you "
                             "can write to") from None
    lock = acquire_lock(out)
    held = [p.name for p in out.iterdir() if p.name not in (LOCK_NAME, OUTPUT_MARKER)]
    if held and not resuming and failed_start(out):
        clear(out, held, "a start that failed before its first checkpoint left")
        held = []
    if held and not resuming:
        if not overwrite or not is_run_folder(out):
            release_lock(lock)
            shown = ", ".join(sorted(held)[:5]) + (", ..." if len(held) > 5 else "")
            if overwrite:
                raise RunFolderError(f"output_dir={str(out)!r} holds files focusdpo did not write ({shown}): "
                                     "overwrite_output_dir clears only a run folder; choose a new output_dir")
            raise RunFolderError(f"output_dir={str(out)!r} already holds a run ({shown}): resume it with "
                                 "--resume_from_checkpoint latest, choose a new output_dir, or set "
                                 "overwrite_output_dir: true to delete it first")
        clear(out, held, "overwrite_output_dir: cleared")
    mark_output(out)
    return lock


def is_run_folder(out: Path) -> bool:
    """A folder a focusdpo run wrote: its marker, or (runs of earlier versions) checkpoint-N folders or the
    config.yaml + metrics.jsonl a run writes first."""
    return ((out / OUTPUT_MARKER).exists() or bool(checkpoints(out))
            or ((out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()))


def failed_start(out: Path) -> bool:
    """A run folder focusdpo wrote that holds neither a checkpoint nor trained weights: what a start that failed
    (a tracker login, a bad input found late, a kill before the first save) leaves; a plain rerun replaces it."""
    trained = [LORA_WEIGHTS_NAME, "unet", "transformer"]
    return (out / OUTPUT_MARKER).exists() and not checkpoints(out) and not any((out / n).exists() for n in trained)


def clear(out: Path, names: list[str], why: str) -> None:
    for name in names:
        path = out / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    print(f"[focusdpo] {why} {len(names)} entries of {out}: {', '.join(sorted(names)[:5])}", file=sys.stderr)


def acquire_lock(out: Path) -> Path:
    """Create ``out/.focusdpo.lock`` holding this host and pid; refuse while another live run holds it."""
    return take_lock(out / LOCK_NAME, f"another run is training into {out}", "choose another output_dir",
                     RunFolderError)


# ---- checkpoints --------------------------------------------------------------------------------------
def checkpoints(out: Path) -> list[Path]:
    """``checkpoint-N`` folders of a run, newest first."""
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*") if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found, reverse=True) if p.is_dir()]


def checkpoint_damage(checkpoint: Path) -> str | None:
    """None for an intact checkpoint, else which file is damaged and how (headers only: fast)."""
    from safetensors import safe_open

    state = checkpoint / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError) as e:
        return f"{state} cannot be read ({e})"
    weights = list(checkpoint.rglob("*.safetensors"))
    if not weights:
        return f"{checkpoint} holds no .safetensors weights"
    for path in weights:
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception as e:  # safetensors raises its own SafetensorError for short or garbled files
            return f"{path} is damaged ({e})"
    for path in [*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth"), *checkpoint.glob("*.bin")]:
        try:
            zipfile.ZipFile(path).close()  # torch.save writes zip archives; a truncated one has no directory
        except (OSError, zipfile.BadZipFile) as e:
            return f"{path} is damaged ({e})"
    return None


def check_optimizer_state(checkpoint: Path, fresh_optimizer: bool) -> None:
    """A checkpoint without optimizer or scheduler state (``save_only_model``, a deleted file) resumes only when the
    user accepts that both restart; say so either way."""
    missing = [name for name in OPTIMIZER_STATE if not (checkpoint / name).is_file()]
    if not missing:
        return
    what = (f"{checkpoint} holds no {' or '.join(missing)} (a save_only_model checkpoint, or deleted): resuming "
            "keeps its weights and step count but restarts AdamW's moments from zero and the learning-rate schedule")
    if not fresh_optimizer:
        raise RunFolderError(f"{what}. Accept that with --resume_with_fresh_optimizer true, or resume from a "
                             "checkpoint that has them")
    print(f"[focusdpo] {what} (resume_with_fresh_optimizer)", file=sys.stderr)


def resolve_resume(out: Path, resume: str | None) -> str | None:
    """The checkpoint to resume from: ``latest`` (or ``true``) picks the newest intact one, saying so when
    it skips a damaged one; an explicit folder must exist and be intact."""
    if resume is None or resume in ("", "false", "False"):
        return None
    if resume in ("latest", "true", "True"):
        found = checkpoints(out)
        if not found:
            raise RunFolderError(f"resume_from_checkpoint={resume} but {out} holds no checkpoint-N folder: "
                                 "start without resume_from_checkpoint, or give the run's output_dir")
        for path in found:
            damage = checkpoint_damage(path)
            if damage is None:
                if path != found[0]:
                    print(f"[focusdpo] resuming from {path}: the newer {found[0].name} is damaged "
                          f"({checkpoint_damage(found[0])})", file=sys.stderr)
                return str(path)
        raise RunFolderError(f"no intact checkpoint in {out}: {checkpoint_damage(found[0])}; start a new run")
    path = Path(resume)
    if not path.is_dir():
        raise RunFolderError(f"resume_from_checkpoint={resume!r} does not exist: give a checkpoint-N folder "
                             "or 'latest'")
    damage = checkpoint_damage(path)
    if damage is not None:
        intact = [p for p in checkpoints(path.parent) if p != path and checkpoint_damage(p) is None]
        older = [p for p in intact if step_of(p) < step_of(path)] or intact
        hint = f"resume from {older[0]} instead" if older else "no other intact checkpoint exists"
        raise RunFolderError(f"checkpoint {path} is damaged: {damage}; {hint}")
    return str(path)


def step_of(checkpoint: Path) -> int:
    match = CHECKPOINT_PATTERN.match(checkpoint.name)
    return int(match.group(1)) if match else -1


# ---- resuming with other settings ---------------------------------------------------------------------
def check_resume_settings(checkpoint: str, configs) -> None:
    """Compare the run's settings with those saved in ``checkpoint``: refuse what cannot apply (naming both
    values), refuse schedule changes (the checkpoint's optimizer and schedule are restored), report the rest."""
    import yaml

    check_optimizer_state(Path(checkpoint), configs[0].resume_with_fresh_optimizer)
    saved_file = Path(checkpoint) / CHECKPOINT_CONFIG
    if not saved_file.is_file():
        print(f"[focusdpo] {checkpoint} has no {CHECKPOINT_CONFIG} (an older run): settings not compared",
              file=sys.stderr)
        return
    saved, now = yaml.safe_load(saved_file.read_text()), config_fields(*configs)
    changed = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k] and k not in NOT_COMPARED}
    fixed = [f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in changed.items() if k in FIXED_ON_RESUME]
    if fixed:
        raise ConfigError(f"cannot resume {checkpoint} with other weight-shaping settings ({'; '.join(fixed)}): "
                          "set them back, or start a new run in a new output_dir")
    restored = [f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in changed.items()
                if k in RESTORED_ON_RESUME]
    if restored:
        raise ConfigError(f"resuming {checkpoint} restores its optimizer and learning-rate schedule, so the "
                          f"change is refused rather than ignored ({'; '.join(restored)}): set them back to "
                          "resume, or start a new run in a new output_dir")
    applied = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
    if applied:
        print(f"[focusdpo] resuming {checkpoint} with changed settings, applied from its step on: {applied}"
              + (" (the learning-rate schedule is stretched to the new max_steps)" if "max_steps" in changed
                 else ""), file=sys.stderr)


def keep_segment_configs(out: Path) -> None:
    """Before a resumed run writes ``config.yaml``, keep the previous segment's as ``config.segment-K.yaml``."""
    current = out / "config.yaml"
    if current.is_file():
        count = len(list(out.glob("config.segment-*.yaml")))
        os.replace(current, out / f"config.segment-{count + 1}.yaml")


# ---- inputs -----------------------------------------------------------------------------------------
def check_inputs(model_cfg, data_cfg, focus_cfg, dataset, loss_cfg=None) -> None:
    """Files and caches the run needs, checked before the model loads."""
    if model_cfg.personalization_lora and model_cfg.reference_mode != "frozen_adapter":
        raise ConfigError(f"personalization_lora={model_cfg.personalization_lora!r} is trained on only with "
                          f"reference_mode: frozen_adapter (the policy and the reference both keep it); with "
                          f"reference_mode: {model_cfg.reference_mode} it would be ignored: set reference_mode: "
                          "frozen_adapter, or remove personalization_lora")
    if model_cfg.reference_mode == "frozen_adapter":
        check_lora_file(model_cfg.personalization_lora, model_cfg.family, "personalization_lora",
                        model_cfg.personalization_lora_loader, model_cfg.pretrained_path)
    columns = dataset.column_names
    if model_cfg.drop_text_encoders and "prompt_embeds" not in columns:
        raise ValueError("drop_text_encoders: true needs prompt embeddings cached in the dataset: run "
                         "`focusdpo embed --config <recipe> --out DIR` and train on DIR")
    if "encoder_key" in columns:

        for key in dataset.unique("encoder_key"):
            check_encoder_key(key, model_cfg, data_cfg)
    if loss_cfg is not None and loss_cfg.preference_unit == "subject":
        check_subject_inputs(dataset)
    if focus_cfg.enabled or (loss_cfg is not None and loss_cfg.preference_unit == "subject"):
        check_focus_inputs(model_cfg, data_cfg, focus_cfg, dataset, loss_cfg)


def check_objective(loss_cfg, focus_cfg) -> None:
    """Settings of two sections that only work together, refused before the pairs or the model load."""
    if loss_cfg.objective == "sft" and focus_cfg.enabled:
        raise ConfigError("objective: sft trains on the winners' plain error; focus weights are for DPO: set "
                          "lambda_structure: 0 and lambda_detail: 0, or objective: dpo")


def check_subject_inputs(dataset) -> None:
    """``preference_unit: subject``: every pair has references and finite per-subject scores ``(2, K)``, K its
    reference count. Counts come from arrow's list lengths: no image is read."""
    import numpy as np
    import pyarrow.compute as pc

    if "subject_scores" not in dataset.column_names:
        raise PairDataError("preference_unit: subject needs per-subject scores (a subject_scores column: [chosen "
                            "scores, rejected scores], one per reference): generate the pairs with `focusdpo pairs`, "
                            "which writes them, or add the column to your import; else use preference_unit: image")
    counts = pc.list_value_length(dataset.data.column("references")).to_numpy(zero_copy_only=False)
    for index, (pair_id, scores) in enumerate(zip(dataset["pair_id"], dataset["subject_scores"])):
        k = int(np.nan_to_num(counts[index]))
        array = np.asarray(scores if scores is not None else [], dtype=np.float64)
        if k == 0:
            raise PairDataError(f"pair {pair_id} has no references: preference_unit: subject compares the images "
                                "subject by subject; drop the pair or use preference_unit: image")
        if array.shape != (2, k) or not np.isfinite(array).all():
            raise PairDataError(f"pair {pair_id}: subject_scores must be two rows [chosen, rejected] of {k} finite "
                                f"scores (one per reference), got {scores!r}: fix the pair's scores or drop it")


def check_focus_inputs(model_cfg, data_cfg, focus_cfg, dataset, loss_cfg=None) -> None:

    if focus_cfg.lambda_structure and (pair := first_pair_without_references(dataset)):  # cached maps too
        raise PairDataError(f"pair {pair} has no references: the structure term (lambda_structure) needs at least "
                            "one; add references, or set lambda_structure: 0 (lambda_detail then weights by "
                            "image complexity alone)")
    masked = loss_cfg is not None and loss_cfg.preference_unit == "subject"
    if "focus_maps" in dataset.column_names:
        from focusdpo.focus.mapper import check_cache_key

        if masked and "subject_masks" not in dataset.column_names:
            raise PairDataError("preference_unit: subject needs the subject masks beside the cached focus maps: "
                                "re-run `focusdpo focus` with this recipe (it writes subject_masks for the subject "
                                "unit), or train on the pairs without the focus cache")
        grid = resolve_grid(model_cfg, data_cfg.resolution)
        for key in dataset.unique("focus_key"):
            check_cache_key(key, focus_cfg, tuple(grid), masked)
        return
    from focusdpo.features.dino import check_feature_weights

    check_feature_weights(focus_cfg)  # the extractor loads at the first step: fail before the model loads


# ---- numerics advice ----------------------------------------------------------------------------------
def numerics_advice(args, model_cfg, loss_cfg, focus_cfg, current_beta: float | None = None) -> str:
    """What to change after a non-finite loss, naming config fields: a value that cannot work if one is
    set (e.g. changed after validation), else the two fields that scale the update. With the automatic β,
    ``current_beta`` is the value the loss used, and the field to lower is its ceiling ``beta_max``."""
    import math

    suspects = []
    if not (math.isfinite(model_cfg.lora_alpha) and model_cfg.lora_alpha > 0):
        suspects.append(f"lora_alpha={model_cfg.lora_alpha} (must be finite and > 0)")
    if focus_cfg.enabled and focus_cfg.top_n < 1:
        suspects.append(f"top_n={focus_cfg.top_n} (must be >= 1)")
    for name in ("lambda_structure", "lambda_detail"):
        if not math.isfinite(getattr(focus_cfg, name)):
            suspects.append(f"{name}={getattr(focus_cfg, name)} (must be finite)")
    if suspects:
        return f"fix {', '.join(suspects)} (see `focusdpo train --help`)"
    if loss_cfg.beta_target_gradient_factor is None:
        beta = f"beta (now {loss_cfg.beta})"
    else:  # the configured beta is only where the automatic β started
        beta = f"beta_max (now {loss_cfg.beta_range[1]}; the automatic β was {current_beta} at this step)"
    return f"lower learning_rate (now {args.learning_rate}) or {beta}, or set nan_policy: skip"

"""What keeps a run from learning from, or saving, non-finite values: the step guards of the trainer.

A mixin for :class:`~focusdpo.train.FocusDPOTrainer`. Before every optimizer step the gradient norm is
computed over the trainable parameters (one pass, also the clipping pass); a non-finite loss or norm then
stops the run (saving the weights only if they are finite) or skips the step without a trace. It also
watches ``mse/winner_drift`` for the known Diffusion-DPO failure. See docs/stability.md.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .run_checks import numerics_advice

ZERO_GRADIENT_STEPS = 3  # this many all-zero gradient steps at the start of a run: it trains nothing, said loudly


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/inf; the message names the step, the pairs and the last good state."""


class SkippedStepCallback(TrainerCallback):
    """Right after the Trainer stepped its LR scheduler: put it back if the optimizer step was skipped."""

    def __init__(self, trainer: "StepGuards"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.restore_after_skipped_step()


class StepGuards:
    """Mixin for a transformers ``Trainer`` with a ``loss_config`` (``nan_policy``, ``winner_drift_window``)."""

    def init_guards(self) -> None:
        self._step_metrics: dict[str, list] = defaultdict(list)  # this optimizer step's, until it is kept
        self._step_pair_ids: list[str] = []
        self._skip_pending = False  # a micro-batch of this step had a non-finite loss (nan_policy: skip)
        self._skipped_state = None  # (scheduler state, learning rates) to restore after a skipped step
        self._skipped_steps = self._skipped_in_window = 0
        self._kept_loss = [0.0, 0]  # sum and count of kept micro-batch losses this session (train_loss)
        self._drift: list[float] = []
        self._drift_warned = False
        self._zero_gradient_steps = 0  # consecutive all-zero gradient steps since the start; -1 once one was not

    def stop_non_finite(self, what: str, model, pair_ids: list[str]) -> None:
        """Save the weights as the last good state if they are finite (else name the previous checkpoint); raise."""
        step = self.state.global_step
        if all(bool(torch.isfinite(p).all()) for p in self.trainable_parameters(model)):
            self._save_checkpoint(model, trial=None)  # the optimizer has not stepped on the bad batch
            saved = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            where = f"The last good state is saved in {saved}; resume from it with --resume_from_checkpoint {saved}"
        else:
            previous = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            where = ("The trainable weights are no longer finite, so nothing was saved; " +
                     (f"the last good state is {previous}; resume from it with --resume_from_checkpoint {previous}"
                      if previous else "no earlier checkpoint exists: restart the run"))
        raise NonFiniteLossError(
            f"{what} at step {step} on process {self.args.process_index} (pairs {pair_ids}). {where}, after you "
            f"{numerics_advice(self.args, self.model_config, self.loss_config, self.focus_config)}")

    # ---- the optimizer step: gradient norm, clipping and the gradient guard -----------------------
    # The Trainer's own `_clip_grad_norm` / `_get_grad_norm` walk model.parameters(), the frozen base included,
    # and clip a NaN norm into NaN weights. These two private hooks are the only place to act between backward
    # and optimizer.step; both clip the trainable parameters only (clip_trainable).
    def _clip_grad_norm(self, model):
        return self.clip_trainable(model, self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:
            grad_norm = self.clip_trainable(model, float("inf"))
        return self.guard_step(model, grad_norm)

    def clip_trainable(self, model, max_norm: float):
        """The trainable gradients' norm, after clipping them to ``max_norm`` (accelerate's ``clip_grad_norm_``
        unscales fp16 gradients first and handles FSDP/DeepSpeed)."""
        return self.accelerator.clip_grad_norm_(self.trainable_parameters(model), max_norm)

    def trainable_parameters(self, model=None) -> list[torch.nn.Parameter]:
        """The policy's trainable parameters, found once (the set never changes during a run)."""
        if getattr(self, "_trainable", None) is None:
            self._trainable = self.accelerator.unwrap_model(self.model).trainable_parameters()
        return self._trainable

    def guard_step(self, model, grad_norm):
        """Before ``optimizer.step``: keep the step, stop on a non-finite gradient norm, or skip the step.

        A skipped step leaves no trace: no gradients reach the optimizer (AdamW then changes no weight and no
        moment), the LR scheduler is put back after the Trainer steps it, and its metrics are dropped.
        """
        pair_ids, self._step_pair_ids = self._step_pair_ids, []
        norm = None if grad_norm is None else float(grad_norm)  # None: DeepSpeed; the step's one host sync
        finite = norm is None or math.isfinite(norm)
        skip, self._skip_pending = self._skip_pending or not finite, False
        step_metrics, self._step_metrics = self._step_metrics, defaultdict(list)
        if not skip:
            for name, values in step_metrics.items():
                self._metrics[name].extend(values)
            self._kept_loss[0] += sum(step_metrics.get("_loss", []))
            self._kept_loss[1] += len(step_metrics.get("_loss", []))
            self.watch_zero_gradients(norm)
            return grad_norm
        if not finite and self.loss_config.nan_policy == "stop":
            self.stop_non_finite(f"gradient norm is {float(grad_norm)}", model, pair_ids)
        for param in self.trainable_parameters(model):
            param.grad = None
        self._skipped_state = (copy.deepcopy(self.lr_scheduler.state_dict()),
                               [group["lr"] for group in self.optimizer.param_groups])
        self._skipped_steps += 1
        self._skipped_in_window += 1
        what = "loss" if finite else f"gradient norm ({float(grad_norm)})"
        print(f"[focusdpo] non-finite {what} at step {self.state.global_step} (pairs {pair_ids}); step skipped",
              file=sys.stderr)
        return None

    def watch_zero_gradients(self, norm: float | None) -> None:
        """Say loudly when the first ``ZERO_GRADIENT_STEPS`` optimizer steps all had exactly zero gradients: such a
        run trains nothing (a LoRA that lost its gradients, a frozen adapter, an all-zero loss) yet would finish
        with rc 0 and every file written."""
        if norm is None or self._zero_gradient_steps < 0:
            return
        self._zero_gradient_steps = self._zero_gradient_steps + 1 if norm == 0 else -1
        if self._zero_gradient_steps == ZERO_GRADIENT_STEPS:
            message = (f"the gradients of every trainable parameter were exactly zero for the first "
                       f"{ZERO_GRADIENT_STEPS} optimizer steps: this run is not training. Check that the DPO LoRA is "
                       "trainable (lora_rank > 0, lora_target_modules exist in the denoiser), that the loss depends "
                       "on it, and that pair_weight is not zero everywhere")
            print(f"[focusdpo] WARNING: {message}", file=sys.stderr)
            warnings.warn(message, stacklevel=2)

    def restore_after_skipped_step(self) -> None:
        """Undo the LR scheduler's step on a skipped optimizer step (called from on_step_end)."""
        if self._skipped_state is not None:
            state, lrs = self._skipped_state
            self.lr_scheduler.load_state_dict(state)
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr
            self._skipped_state = None

    def average_kept_steps(self, logs: dict) -> None:
        """The Trainer averages skipped steps in as zero losses: average the kept ones instead."""
        kept = self._metrics.pop("_loss", [])
        if self._skipped_in_window:
            if kept:
                logs["loss"] = sum(kept) / len(kept)
            else:  # only skipped steps since the last log: there is no loss to report
                del logs["loss"]
        self._skipped_in_window = 0
        logs["train/skipped_steps"] = self._skipped_steps

    def watch_winner_drift(self, drift: float) -> None:
        """Warn once when e_θ(w) − e_ref(w) stays positive and grows over ``winner_drift_window`` logs."""
        window = self.loss_config.winner_drift_window
        self._drift = [*(self._drift[-window:] if window else []), drift]
        if not self._drift_warned and winner_drift_growing(self._drift, self.loss_config.winner_drift_window):
            self._drift_warned = True
            if self.is_world_process_zero():
                warnings.warn(f"mse/winner_drift (policy − reference error on the winners) has been positive and "
                              f"growing for {window} logged values up to step "
                              f"{self.state.global_step}: the policy is getting worse on the preferred images too "
                              "(the known Diffusion-DPO failure). Set sdpo_mu (e.g. 0.1) for the winner-preserving "
                              "safeguard, or lower the learning rate or beta", stacklevel=2)


def winner_drift_growing(history: list[float], window: int) -> bool:
    """The last ``window`` values are all positive and their second half averages above their first half."""
    recent = history[-window:] if window > 0 else []
    if len(recent) < max(window, 2) or min(recent) <= 0:
        return False
    half = window // 2
    return sum(recent[half:]) / (window - half) > sum(recent[:half]) / half

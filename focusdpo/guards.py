"""What keeps a run from learning from, or saving, non-finite values: the step guards of the trainer.

A mixin for :class:`~focusdpo.train.FocusDPOTrainer`. Before every optimizer step the gradient norm is
computed over the trainable parameters (one pass, also the clipping pass); a non-finite loss or norm then
stops the run (saving the weights only if they are finite) or skips the step without a trace. It also
watches ``mse/winner_drift`` for the known Diffusion-DPO failure. See docs/stability.md.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .grad_buffer import flat_optimizer_state
from .run_checks import numerics_advice

# The Trainer's optimizers whose update of a value reads only that value's gradient and state: stepping the LoRA
# as one flat tensor is then the per-tensor step (Adafactor factors per matrix, 8-bit ones quantize per block).
ELEMENTWISE_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop")


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
        """The trainable gradients' norm, after clipping them to ``max_norm``: one op on the policy's gradient buffer
        while every gradient is its view (:mod:`~focusdpo.grad_buffer`), else the public
        ``accelerator.clip_grad_norm_`` (FSDP, DeepSpeed, DTensors, a wrapper that replaced the gradients)."""
        buffer = getattr(self.model, "gradients", None)
        if buffer is None:
            return self.accelerator.clip_grad_norm_(self.trainable_parameters(model), max_norm)
        buffer.collect_()
        self.accelerator.unscale_gradients()  # fp16: the GradScaler's gradients, as clip_grad_norm_ does first
        return buffer.clip_(max_norm)

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, over one flat parameter holding the LoRA's values where the optimizer is
        elementwise (each value's update reads only its own gradient and moments, so the flat step equals the
        per-tensor one) and the Trainer would put them all in one weight-decay group; else the Trainer's own."""
        decays = self.trainables_decayed() if self.flat_optimizer_applies() else None
        values = self.model.shared_values() if decays is not None else None
        if values is None:
            return super().create_optimizer(model)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        # the Trainer's two groups (decayed, not), one of them empty: checkpoints and LR schedulers keep their shape
        groups = [{"params": [values] if decays else [], "weight_decay": self.args.weight_decay},
                  {"params": [] if decays else [values], "weight_decay": 0.0}]
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        sizes = self.model.gradients.sizes()  # checkpoints of a per-tensor optimizer (earlier versions) resume
        self.optimizer.register_load_state_dict_pre_hook(lambda _, state: flat_optimizer_state(state, sizes))
        return self.optimizer

    def flat_optimizer_applies(self) -> bool:
        if self.optimizer is not None or self.optimizer_cls_and_kwargs is not None or self.args.optim_args:
            return False
        return getattr(self.model, "contiguous_gradients", False) and self.args.optim in ELEMENTWISE_OPTIMIZERS

    def trainables_decayed(self) -> bool | None:
        """Whether the Trainer would put every trainable parameter in its weight-decay group (True) or every one in
        its no-decay group (False); None where they would be split between the two."""
        names = [name for name, param in self.model.named_parameters() if param.requires_grad]
        decayed = set(self.get_decay_parameter_names(self.model)).intersection(names)
        return None if 0 < len(decayed) < len(names) else bool(decayed)

    def trainable_parameters(self, model) -> list[torch.nn.Parameter]:
        if getattr(self, "_trainable", None) is None:
            self._trainable = [p for p in model.parameters() if p.requires_grad]
        return self._trainable

    def guard_step(self, model, grad_norm):
        """Before ``optimizer.step``: keep the step, stop on a non-finite gradient norm, or skip the step.

        A skipped step leaves no trace: no gradients reach the optimizer (AdamW then changes no weight and no
        moment), the LR scheduler is put back after the Trainer steps it, and its metrics are dropped.
        """
        pair_ids, self._step_pair_ids = self._step_pair_ids, []
        finite = grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm)).all())  # None: DeepSpeed
        skip, self._skip_pending = self._skip_pending or not finite, False
        step_metrics, self._step_metrics = self._step_metrics, defaultdict(list)
        if not skip:
            for name, values in step_metrics.items():
                self._metrics[name].extend(values)
            self._kept_loss[0] += sum(step_metrics.get("_loss", []))
            self._kept_loss[1] += len(step_metrics.get("_loss", []))
            return grad_norm
        if not finite and self.loss_config.nan_policy == "stop":
            self.stop_non_finite(f"gradient norm is {float(grad_norm)}", model, pair_ids)
        buffer = getattr(self.model, "gradients", None)
        if buffer is not None:
            buffer.detach()
        else:
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

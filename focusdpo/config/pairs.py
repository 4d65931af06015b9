"""Settings of ``focusdpo pairs --config recipe.yaml``: a :class:`PairGenConfig` plus the trainer's
:class:`~focusdpo.config.ModelConfig` (the generator) and :class:`~focusdpo.config.FocusConfig` (the feature
backbone the candidates are scored with: the same features and definitions the evaluator uses; its ``top_n``
too). ``guidance_scale`` (ModelConfig) is SD/SDXL's classifier-free guidance or FLUX.1's guidance embedding.

Every field is checked when the dataclass is built, before any model loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from focusdpo.config.checks import check_choice, check_positive
from focusdpo.config.focus import FocusConfig
from focusdpo.config.recipe import check_config_keys
from focusdpo.config.training import ModelConfig
from focusdpo.errors import ConfigError

LAYOUTS = ("auto", "uno", "xverse", "jsonl", "dreambench")
MISSING_POLICIES = ("skip", "error")

STRATEGIES = ("select", "disrupt")

LOSER_RULES = ("worst", "second", "median")

DISRUPT_SUBJECTS = ("lowest", "highest", "random")

DTYPES = ("auto", "fp32", "bf16", "fp16")


def check_unit(name: str, value, low: float = 0.0, high: float = 1.0) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low <= value <= high:
        raise ConfigError(f"{name}={value!r} must be a number in [{low}, {high}]")


@dataclass
class PairGenConfig:
    """Which prompts, how many candidates, how they are scored and selected, and where the pairs go."""

    prompts: str = field(default="", metadata={
        "help": "Prompt file: UNO/XVerseBench JSON, the project's jsonl, or DreamBench's prompts_and_classes.txt."})
    prompt_layout: str = field(default="auto", metadata={"help": f"Prompt file layout: {', '.join(LAYOUTS)}."})
    data_root: str | None = field(default=None, metadata={
        "help": "Folder that relative image paths start from; empty: the prompt file's folder."})
    missing_references: str = field(default="error", metadata={
        "help": "Entries whose images are missing: 'error' (stop before generating) or 'skip' (listed in the "
                "summary)."})
    unique_token: str = field(default="", metadata={"help": "DreamBench prompts: identifier before the class."})
    max_items: int = field(default=0, metadata={"help": "Use only the first N prompt entries (0 = all)."})
    out: str = field(default="", metadata={"help": "Output folder: shards/, dataset/ (the pairs), summary.json."})
    strategy: str = field(default="select", metadata={
        "help": "'select': best vs worse candidate; 'disrupt': best candidate vs the same image with one "
                "subject inpainted as another instance of its class (DIP-style, prior_mask stored)."})
    num_candidates: int = field(default=4, metadata={"help": "Candidates sampled per prompt (>= 2 for select)."})
    seed: int = field(default=0, metadata={
        "help": "Base seed; candidate j of entry i uses seed + i·num_candidates + j (recorded with the pair)."})
    resolution: int = field(default=32, metadata={"help": "Generated image size in pixels (square)."})
    steps: int = field(default=8, metadata={"help": "Denoising steps per candidate."})
    batch_size: int = field(default=4, metadata={"help": "Candidates generated per forward batch."})
    dpo_lora: str | None = field(default=None, metadata={
        "help": "DPO LoRA of an earlier round (a training output_dir or .safetensors), applied on top of "
                "model.personalization_lora: iterative rounds."})
    device: str = field(default="auto", metadata={"help": "'auto' (this process's accelerator or CPU), 'cpu', 'cuda'."})
    dtype: str = field(default="auto", metadata={
        "help": f"{', '.join(DTYPES)}; auto: bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on CPU."})
    loser_rule: str = field(default="worst", metadata={
        "help": f"select: which candidate loses: {', '.join(LOSER_RULES)} score."})
    margin_threshold: float = field(default=0.0, metadata={
        "help": "Keep a pair only when winner − loser score reaches this (scores lie in [-1, 1], so [0, 2])."})
    fidelity_weight: float = field(default=1.0, metadata={"help": "Weight of the mean per-subject fidelity."})
    min_fidelity_weight: float = field(default=0.0, metadata={"help": "Weight of the worst subject's fidelity."})
    leakage_weight: float = field(default=0.5, metadata={"help": "Weight of cross-subject leakage (subtracted)."})
    clip_weight: float = field(default=0.0, metadata={"help": "Weight of CLIP text alignment (needs clip_model)."})
    clip_model: str | None = field(default=None, metadata={"help": "Local transformers CLIPModel folder."})
    scorer: str | None = field(default=None, metadata={
        "help": "User scorer 'module:function': f(images: list[PIL], item: PromptItem) -> N floats in [-1, 1]."})
    scorer_weight: float = field(default=1.0, metadata={"help": "Weight of the user scorer's score."})
    min_similarity: float = field(default=0.3, metadata={"help": "Region floor of a subject (scoring)."})
    peak_ratio: float = field(default=0.8, metadata={"help": "Region: share of the subject's own peak (scoring)."})
    inpaint_path: str | None = field(default=None, metadata={
        "help": "disrupt: local diffusers inpainting pipeline folder (SD inpaint); empty: a tiny random one."})
    inpaint_prompt: str = field(default="a {cls}", metadata={
        "help": "disrupt: inpainting prompt; {cls} becomes the subject's class."})
    inpaint_steps: int = field(default=8, metadata={"help": "disrupt: inpainting steps."})
    inpaint_strength: float = field(default=1.0, metadata={"help": "disrupt: inpainting strength in (0, 1]."})
    disrupt_subject: str = field(default="lowest", metadata={
        "help": f"disrupt: which subject's region is replaced: {', '.join(DISRUPT_SUBJECTS)} fidelity."})
    region_source: str = field(default="mapper", metadata={
        "help": "disrupt: 'mapper' (the subject's scored region) or 'masks' (the entry's reference_masks, "
                "taken as target-image masks)."})
    region_dilation: int = field(default=1, metadata={"help": "disrupt: grow the region by N feature cells."})
    min_fidelity_drop: float = field(default=0.0, metadata={
        "help": "disrupt: keep the pair only when the region's fidelity fell by more than this."})
    items_per_shard: int = field(default=8, metadata={
        "help": "Items per written shard: a killed run loses at most this many items' work."})

    def __post_init__(self):
        check_choice("prompt_layout", self.prompt_layout, LAYOUTS)
        check_choice("missing_references", self.missing_references, MISSING_POLICIES)
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("loser_rule", self.loser_rule, LOSER_RULES)
        check_choice("disrupt_subject", self.disrupt_subject, DISRUPT_SUBJECTS)
        check_choice("region_source", self.region_source, ("mapper", "masks"))
        check_choice("dtype", self.dtype, DTYPES)
        for name in ("num_candidates", "steps", "batch_size", "inpaint_steps", "items_per_shard"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be an integer >= 1")
        if self.strategy == "select" and self.num_candidates < 2:
            raise ConfigError(f"num_candidates={self.num_candidates}: strategy 'select' needs >= 2 candidates")
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"resolution={self.resolution} must be a positive multiple of 8")
        check_unit("margin_threshold", self.margin_threshold, 0.0, 2.0)
        check_unit("inpaint_strength", self.inpaint_strength)
        if self.inpaint_strength == 0:
            raise ConfigError("inpaint_strength=0 changes nothing: use a value in (0, 1]")
        check_unit("min_similarity", self.min_similarity, -1.0, 1.0)
        check_unit("peak_ratio", self.peak_ratio)
        check_unit("min_fidelity_drop", self.min_fidelity_drop, 0.0, 2.0)
        for name in ("fidelity_weight", "min_fidelity_weight", "leakage_weight", "clip_weight", "scorer_weight"):
            check_positive(name, getattr(self, name), allow_zero=True)
        if self.clip_weight > 0 and not self.clip_model:
            raise ConfigError("clip_weight > 0 needs clip_model: a local transformers CLIPModel folder")
        if self.scorer and ":" not in self.scorer:
            raise ConfigError(f"scorer={self.scorer!r} must be 'module:function'")
        if "{cls}" not in self.inpaint_prompt:
            raise ConfigError(f"inpaint_prompt={self.inpaint_prompt!r} must contain {{cls}} (the subject's class)")

    def score_weights(self) -> dict[str, float]:
        """The non-zero score weights, normalised to sum 1 (so a combined score lies in [-1, 1])."""
        raw = {"fidelity": self.fidelity_weight, "min_fidelity": self.min_fidelity_weight,
               "leakage": self.leakage_weight, "clip": self.clip_weight,
               "user": self.scorer_weight if self.scorer else 0.0}
        total = sum(raw.values())
        if total <= 0:
            raise ConfigError("all score weights are 0: set fidelity_weight (or another weight) > 0")
        return {k: v / total for k, v in raw.items() if v > 0}


PAIR_CONFIG_CLASSES = (PairGenConfig, ModelConfig, FocusConfig)


def read_pair_recipe(path: str) -> dict:
    """A YAML pair recipe as a dict; unknown keys are refused with a suggestion (as for training recipes)."""

    return check_config_keys(path, PAIR_CONFIG_CLASSES)


def build_pair_configs(values: dict) -> tuple[PairGenConfig, ModelConfig, FocusConfig]:
    """Split a flat ``field: value`` mapping over the three dataclasses (each validates itself)."""
    out = []
    for cls in PAIR_CONFIG_CLASSES:
        names = {f.name for f in fields(cls)}
        out.append(cls(**{k: v for k, v in values.items() if k in names}))
    pair_cfg = out[0]
    if not pair_cfg.prompts:
        raise ConfigError("prompts is empty: give the prompt file (prompts: path/to/file.json)")
    if not pair_cfg.out:
        raise ConfigError("out is empty: give the output folder (out: data/pairs/round1)")
    return tuple(out)

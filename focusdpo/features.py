"""DINOv2 patch features through timm: load a backbone, preprocess images, return ``(B, C, h, w)``.

Features are L2-normalised over channels, so a dot product between two patch vectors is their
cosine similarity (what ``correspondence.py`` consumes). Patch size is 14 px for every DINOv2.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

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
    """
    param = next(model.parameters())
    out = []
    for chunk in images.split(batch_size):
        x = preprocess(chunk, image_size)
        h, w = x.shape[-2] // PATCH, x.shape[-1] // PATCH
        tokens = model.forward_features(x.to(device=param.device, dtype=param.dtype))
        tokens = tokens[:, model.num_prefix_tokens:].float()  # (b, h*w, C), row-major
        feats = tokens.transpose(1, 2).unflatten(2, (h, w))
        out.append(F.normalize(feats, dim=1))
    return torch.cat(out)

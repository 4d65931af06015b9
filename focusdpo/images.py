"""Image conversions used everywhere: PIL ↔ float tensors in [0, 1], square crops and resizes.

One convention: a float image is ``(3, H, W)`` (or ``(C, H, W)``) in [0, 1]; the generators' ``[-1, 1]`` pixels are
converted where they are produced.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL → float ``(C, H, W)`` in [0, 1] (C = 1 for masks)."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1).contiguous()


def to_pil(image: torch.Tensor) -> Image.Image:
    """``(3, H, W)`` float in [0, 1] → RGB PIL image (values outside are clipped)."""
    array = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def square(image: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
    """Resize the short side to ``size`` and centre-crop to ``size × size`` (the training crop)."""
    return ImageOps.fit(image, (size, size), method=resample)


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """``(3, H, W)`` → ``(3, size, size)`` bicubic with antialiasing, clamped to [0, 1] (no crop)."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    out = F.interpolate(image[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return out[0].clamp(0, 1)

"""Image conversions used everywhere: opening files upright, PIL ↔ float tensors in [0, 1], square crops and resizes.

One convention: a float image is ``(3, H, W)`` (or ``(C, H, W)``) in [0, 1]; the generators' ``[-1, 1]`` pixels are
converted where they are produced. Every image file is seen as it is displayed, turned as its EXIF orientation says
(phone photos are stored sideways with orientation 6 or 8): :func:`open_upright` decodes it so and
:func:`displayed_size` reads that size from the header, so checks and loaders agree on one size.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps

QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations displayed turned by 90°: width and height swap


def open_upright(source) -> Image.Image:
    """Decode ``source`` (a path or a binary file) fully, so corrupt or truncated pixel data fails here, and turn
    it as its EXIF orientation says (:func:`PIL.ImageOps.exif_transpose`)."""
    image = Image.open(source)
    image.load()
    return ImageOps.exif_transpose(image)


def displayed_size(image: Image.Image, source=None) -> tuple[int, int]:
    """Width and height of ``image`` (opened, not decoded) as :func:`open_upright` returns it, from the header
    alone; ``source``, the open binary file, finds a PNG's EXIF written after its pixels."""
    width, height = image.size
    return (height, width) if header_orientation(image, source) in QUARTER_TURNS else (width, height)


def header_orientation(image: Image.Image, source=None) -> int:
    """The EXIF orientation without decoding pixels. PIL's PNG reader decodes the whole image to look for EXIF
    written after the pixels, so the base reader is used (EXIF and XMP read with the header) and such a late chunk
    is found by walking the chunk headers of ``source``."""
    exif = Image.Image.getexif(image)
    if image.format == "PNG" and "exif" not in image.info and source is not None:
        late = png_late_exif(source)
        if late is not None:
            exif = Image.Exif()
            exif.load(late)
    return exif.get(ExifTags.Base.Orientation, 1)


def png_late_exif(source) -> bytes | None:
    """The data of a PNG's eXIf chunk, found by reading each chunk's 8-byte header and seeking past its data."""
    source.seek(8)  # the PNG signature
    while len(header := source.read(8)) == 8:
        length, kind = struct.unpack(">I4s", header)
        if kind == b"eXIf":
            return source.read(length)
        if kind == b"IEND":
            return None
        source.seek(length + 4, io.SEEK_CUR)  # the data and its CRC
    return None


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

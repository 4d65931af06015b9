"""Instance disruption (DIP-style losers): repaint one subject's region as another instance of its class.

The loser is the winner with the region inpainted and composited back through the mask, so it equals the
winner exactly outside the region; the region becomes the pair's ``prior_mask``. A pair is kept only when the
region's fidelity to the replaced subject fell (checked by the caller with the same scores as selection).

Inpainting pipelines: any diffusers pipeline whose class name has ``Inpaint`` (SD/SDXL inpaint, FLUX.1 Kontext
inpaint) or ``FluxFillPipeline``, called with ``prompt, image, mask_image``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from focusdpo.errors import ConfigError


def is_inpainter(pipeline) -> bool:
    name = type(pipeline).__name__
    return "Inpaint" in name or name == "FluxFillPipeline"


def check_inpainter(pipeline) -> None:
    if not is_inpainter(pipeline):
        raise ConfigError(f"inpaint_path holds a {type(pipeline).__name__}, which is not an inpainting pipeline; "
                          "give a StableDiffusionInpaintPipeline (or SDXL inpaint, FluxFillPipeline, "
                          "FluxKontextInpaintPipeline) folder")


def load_inpainter(path: str | None, device=None, dtype=None):
    """A local diffusers inpainting pipeline folder, or the tiny random SD inpainter when ``path`` is empty."""
    if not path:
        pipeline = tiny_inpaint_pipeline()
    else:
        import diffusers

        index = Path(path) / "model_index.json"
        if not index.is_file():
            raise ConfigError(f"inpaint_path={path!r} is not a diffusers pipeline folder (no model_index.json)")
        import json
        name = json.loads(index.read_text()).get("_class_name", "")
        if "Inpaint" not in name and name != "FluxFillPipeline":
            raise ConfigError(f"inpaint_path={path!r} holds a {name}, which is not an inpainting pipeline; give a "
                              "StableDiffusionInpaintPipeline, FluxFillPipeline or FluxKontextInpaintPipeline folder")
        pipeline = getattr(diffusers, name).from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    check_inpainter(pipeline)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device) if device is not None else pipeline


def tiny_inpaint_pipeline(seed: int = 0):
    """A random SD inpainting pipeline from the tiny SD parts, with a 9-channel UNet (latent + mask + masked)."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    from focusdpo.models.tiny import TEXT_DIM, tiny_sd_pipeline

    base = tiny_sd_pipeline(seed)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=9,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
                                cross_attention_dim=TEXT_DIM, norm_num_groups=32)
    parts = {k: v for k, v in base.components.items() if k != "unet"}
    return StableDiffusionInpaintPipeline(unet=unet, **parts)


def region_mask(regions: torch.Tensor, size: int, dilation: int = 0) -> torch.Tensor:
    """A feature-grid region ``(h, w)`` bool → pixel mask ``(size, size)`` bool, grown by ``dilation`` cells."""
    grid = regions.float()[None, None]
    if dilation:
        grid = F.max_pool2d(grid, 2 * dilation + 1, stride=1, padding=dilation)
    return F.interpolate(grid, size=(size, size), mode="nearest")[0, 0] > 0.5


def composite(winner: Image.Image, painted: Image.Image, mask: torch.Tensor) -> Image.Image:
    """``painted`` inside ``mask`` ``(H, W)`` bool, ``winner`` outside: exact outside, byte for byte."""
    keep = mask.cpu().numpy()[..., None]
    out = np.where(keep, np.asarray(painted.convert("RGB").resize(winner.size)), np.asarray(winner.convert("RGB")))
    return Image.fromarray(out.astype(np.uint8))


@torch.no_grad()
def inpaint_instance(inpainter, winner: Image.Image, mask: torch.Tensor, prompt: str, seed: int, steps: int,
                     strength: float = 1.0) -> Image.Image:
    """Repaint ``mask`` of ``winner`` with ``prompt`` and composite it back (see :func:`composite`)."""
    side = winner.size[0]
    painted = inpainter(prompt=prompt, image=winner, mask_image=mask_image(mask), height=side, width=side,
                        num_inference_steps=steps, strength=strength,
                        generator=torch.Generator().manual_seed(int(seed)), output_type="pil").images[0]
    return composite(winner, painted, mask)


def mask_image(mask: torch.Tensor) -> Image.Image:
    """``(H, W)`` bool → an ``L`` image (255 inside), the pair's ``prior_mask``."""
    return Image.fromarray(mask.cpu().numpy().astype(np.uint8) * 255, mode="L")

"""Feature extractors the evaluator scores with: the papers' DINO and CLIP, and the project's patch backbone.

* DINO (DreamBench convention): DINO v1 ViT-S/16 (timm ``vit_small_patch16_224.dino``), the CLS token
  after the final norm, on Resize 256 (bicubic, shorter side) -> CenterCrop 224 -> ImageNet mean/std.
* CLIP-I / CLIP-T: a transformers ``CLIPModel`` folder (ViT-B/32 in the papers) with its own processor.
* Per-subject scores: the project's patch backbone (``FocusConfig``), ``extractor(images01) -> (B, C, h, w)``.

Weights are local files only; nothing here downloads.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2

DINO_V1_MODEL = "vit_small_patch16_224.dino"


def dino_v1_transform() -> v2.Compose:
    """The DreamBench DINO preprocessing on ``(B, 3, H, W)`` float images in [0, 1]."""
    return v2.Compose([v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(224), v2.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def load_dino_v1(weights: str | None, device=None, model=None):
    """DINO v1 ViT-S/16 from a local weights file (or a given timm ``model``, for tests) as an embedder.

    Returns ``embed(images01) -> (B, 384)`` unit-norm CLS embeddings, with ``.name``.
    """
    import timm

    if model is None:
        path = Path(weights or "").expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"dino_v1_weights={weights!r} is not a file: give a local {DINO_V1_MODEL} "
                                    "checkpoint (.safetensors/.pth), or drop 'dino' from metrics")
        model = timm.create_model(DINO_V1_MODEL, pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay=dict(file=str(path)))
    model = model.requires_grad_(False).eval().to(device)
    transform = dino_v1_transform()

    @torch.no_grad()
    def embed(images: torch.Tensor) -> torch.Tensor:
        tokens = model.forward_features(transform(images.float()).to(device))  # final norm applied
        return F.normalize(tokens[:, 0].float(), dim=-1)  # CLS

    embed.name = f"{DINO_V1_MODEL} CLS (Resize256-bicubic/CenterCrop224)"
    return embed


class ClipScorer:
    """CLIP image and text embeddings from a local transformers ``CLIPModel`` folder (with its processor)."""

    def __init__(self, folder: str | None, device=None, model=None, processor=None):
        """From a local folder; or from a built ``model`` and ``processor`` (benchmarks with random weights)."""
        from transformers import CLIPModel, CLIPProcessor

        if model is None:
            if not (Path(folder or "").expanduser() / "config.json").is_file():
                raise FileNotFoundError(f"clip_model={folder!r} is not a CLIPModel folder (no config.json): give a "
                                        "local save_pretrained folder of CLIP ViT-B/32, or drop clip_i/clip_t from "
                                        "metrics")
            model = CLIPModel.from_pretrained(folder, local_files_only=True)
            processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        self.model = model.requires_grad_(False).eval().to(device)
        self.processor = processor
        self.device = device
        self.name = f"CLIPModel {Path(folder).name if folder else type(model).__name__}"

    @staticmethod
    def _pooled(out) -> torch.Tensor:
        # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> ``(B, D)`` unit-norm image embeddings."""
        pixels = self.processor(images=list(images.float().clamp(0, 1)), return_tensors="pt",
                                do_rescale=False)["pixel_values"]
        return F.normalize(self._pooled(self.model.get_image_features(pixel_values=pixels.to(self.device))), dim=-1)

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> ``(B, D)`` unit-norm text embeddings (truncated to the model's context)."""
        tokens = self.processor(text=prompts, return_tensors="pt", padding=True, truncation=True)
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return F.normalize(self._pooled(self.model.get_text_features(**tokens)), dim=-1)


def load_subject_extractor(focus_cfg, device=None):
    """The project's patch backbone (``FocusConfig.feature_backbone``) for per-subject scores:
    ``extractor(images01) -> (B, C, h, w)`` unit-norm, with ``.name`` (named in every report)."""
    from focusdpo.features.dino import load_feature_extractor

    extractor = load_feature_extractor(focus_cfg, device=device)
    if focus_cfg.dino_random_weights and not (focus_cfg.dino_weights or focus_cfg.feature_weights):
        extractor.name += " (random weights: scores test plumbing only)"
    return extractor

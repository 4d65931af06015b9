"""Tiny generators with random weights, built in-process from real diffusers/transformers classes.

They power the embedded default run and the tests: no downloads, ~1 s to build. Tokenizers are
character-level CLIP BPE tokenizers written to a temporary folder (transformers 5 reads them from disk).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TEXT_DIM = 32

MAX_TOKENS = 128  # character-level: room for three-subject prompts


def char_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the printable ASCII characters (no merges)."""
    chars = [chr(c) for c in range(33, 127)]
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] +
                                            ["<|startoftext|>", "<|endoftext|>"])}
    with tempfile.TemporaryDirectory(prefix="focusdpo-tokenizer-") as folder:  # read once, then removed
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_TOKENS)


def text_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_DIM,
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


def tiny_vae() -> AutoencoderKL:
    """Downsamples by 2: 32 px images → 16×16 latents."""
    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=32)


def tiny_unet(sdxl: bool = False) -> UNet2DConditionModel:
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=TEXT_DIM + 6 * 8) if sdxl else {}
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
                                cross_attention_dim=2 * TEXT_DIM if sdxl else TEXT_DIM, norm_num_groups=32,
                                **extra)


def tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False, steps_offset=1)
    return StableDiffusionPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(text_config(len(tokenizer))),
                                   tokenizer=tokenizer, unet=tiny_unet(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def tiny_sdxl_pipeline(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    config = text_config(len(tokenizer))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False, steps_offset=1)
    return StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(config), tokenizer=tokenizer,
                                     text_encoder_2=CLIPTextModelWithProjection(config), tokenizer_2=tokenizer,
                                     unet=tiny_unet(sdxl=True), scheduler=scheduler)

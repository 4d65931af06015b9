"""Tiny FLUX.2 [klein] and FLUX.1 Kontext pipelines with random weights, built from the real diffusers classes.

They back the tests and the embedded ``family: flux2`` / ``family: flux_kontext`` runs: no downloads, ~1 s to
build. Sizes: 32 px images → 16×16 VAE latents (scale factor 2) → 8×8 packed tokens (2×2 patches).

- FLUX.2 [klein]: ``AutoencoderKLFlux2`` (4 latent channels → 16 after the 2×2 patchify, with non-identity
  BatchNorm statistics so that skipping the pipeline's normalisation would show), ``Flux2Transformer2DModel``
  without guidance embedding (as Klein), a 27-layer Qwen3 of width 16 so the pipeline's default hidden layers
  ``(9, 18, 27)`` work (``joint_attention_dim = 3·16``), and a byte-level Qwen2 tokenizer with a chat template.
- FLUX.1 Kontext: ``AutoencoderKL`` with FLUX's shift/scale factors, ``FluxTransformer2DModel`` with guidance
  embedding (as FLUX.1-dev/Kontext), a CLIP text model (pooled projection) and a T5 encoder.
"""

from __future__ import annotations

import torch
from diffusers import (AutoencoderKL, AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                       Flux2Transformer2DModel, FluxKontextPipeline, FluxTransformer2DModel)
from transformers import (CLIPTextModel, Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM, T5Config, T5EncoderModel,
                          T5Tokenizer)

from focusdpo.models.tiny import TEXT_DIM, char_tokenizer, text_config

QWEN_WIDTH = 16

QWEN_LAYERS = 27  # the Klein pipeline stacks hidden states (9, 18, 27) by default

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler config (FLUX.2 uses the same resolution-dependent shift parameters)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def qwen_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE over the 256 byte symbols (no merges), with Qwen's chat special tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def t5_tokenizer() -> T5Tokenizer:
    """A unigram T5 tokenizer whose pieces are the printable ASCII characters (with and without ▁)."""
    chars = [chr(c) for c in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [("▁" + c, -2.5) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def tiny_flux2_vae() -> AutoencoderKLFlux2:
    vae = AutoencoderKLFlux2(block_out_channels=(32, 64), latent_channels=4, layers_per_block=1,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             norm_num_groups=32, sample_size=32)
    with torch.no_grad():  # a released VAE has real statistics: make the normalisation matter
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def tiny_flux2_pipeline(seed: int = 0) -> Flux2KleinPipeline:
    """A FLUX.2 [klein]-shaped pipeline: 16 packed latent channels, 64 tokens at 32 px."""
    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=QWEN_WIDTH, intermediate_size=32, num_hidden_layers=QWEN_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id))
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * QWEN_WIDTH, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    return Flux2KleinPipeline(scheduler=flow_scheduler(), vae=tiny_flux2_vae(), text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=transformer)


def tiny_flux_kontext_pipeline(seed: int = 0) -> FluxKontextPipeline:
    """A FLUX.1 Kontext-shaped pipeline (also stands in for FLUX.1-dev + a personalization LoRA)."""
    torch.manual_seed(seed)
    clip_tokenizer = char_tokenizer()
    t5 = t5_tokenizer()
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=32, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                        use_post_quant_conv=False)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(t5), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1,
                                             num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0,
                                             decoder_start_token_id=0))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
        axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    return FluxKontextPipeline(scheduler=flow_scheduler(), vae=vae,
                               text_encoder=CLIPTextModel(text_config(len(clip_tokenizer))), tokenizer=clip_tokenizer,
                               text_encoder_2=text_encoder_2, tokenizer_2=t5, transformer=transformer)

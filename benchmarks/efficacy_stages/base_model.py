"""The base model: a tiny FLUX.2 [klein] trained from scratch on the world.

1. A tiny ``AutoencoderKLFlux2`` (≈0.16 M params, 4 latent channels, downsampling 2) trained on renders and
   references; its BatchNorm running statistics are then set to the patchified latents' statistics, because
   the Klein pipeline normalises latents with them.
2. A ``Flux2KleinPipeline`` folder: that VAE, a ≈2 M-param ``Flux2Transformer2DModel`` (4 heads × 32, 2 double +
   4 single blocks), the tiny random Qwen3 text encoder of ``focusdpo.models.tiny_flux`` (the prompt is constant).
3. The transformer trained by flow matching through the project's trainer (``objective: sft``, full fine-tune),
   then saved back into a full pipeline folder that every tool loads with ``pretrained_path``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel

from focusdpo.commands.caches import embed_main
from focusdpo.models.tiny_flux import QWEN_WIDTH, flow_scheduler, tiny_flux2_pipeline
from focusdpo.data.load import save_dataset

from . import recipes, world


def to_pixels(images) -> torch.Tensor:
    """PIL images → ``(N, 3, H, W)`` in [-1, 1]."""
    array = np.stack([np.asarray(img.convert("RGB"), np.float32) for img in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


def build_vae() -> AutoencoderKLFlux2:
    return AutoencoderKLFlux2(block_out_channels=(16, 32), latent_channels=4, layers_per_block=1,
                              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                              norm_num_groups=8, sample_size=32, mid_block_add_attention=False)


def vae_batch(rng: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    scenes = [world.render(world.random_scene(rng, None)) for _ in range(size)]
    refs = [world.reference(int(i))[0] for i in rng.integers(0, world.NUM_IDENTITIES, size)]
    return to_pixels(scenes), to_pixels(refs)


def train_vae(steps: int, batch: int, seed: int) -> AutoencoderKLFlux2:
    """Reconstruction + a small KL term; scenes and references (both sizes the pipeline encodes) every step."""
    torch.manual_seed(seed)
    vae, rng = build_vae(), np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    for _ in range(steps):
        loss = 0.0
        for pixels in vae_batch(rng, batch):
            posterior = vae.encode(pixels).latent_dist
            recon = vae.decode(posterior.sample()).sample
            loss = loss + torch.nn.functional.mse_loss(recon, pixels) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return vae.eval()


@torch.no_grad()
def set_latent_statistics(vae: AutoencoderKLFlux2, seed: int, count: int = 256) -> None:
    """BatchNorm running mean/var := per-channel statistics of the patchified scene latents."""
    scenes, _ = vae_batch(np.random.default_rng(seed + 1), count)
    latents = Flux2KleinPipeline._patchify_latents(vae.encode(scenes).latent_dist.mode())  # private: the only
    # implementation of Klein's patch layout (the same one the pipeline normalises)
    vae.bn.running_mean.copy_(latents.mean(dim=(0, 2, 3)))
    vae.bn.running_var.copy_(latents.var(dim=(0, 2, 3)))


def build_transformer(seed: int) -> Flux2Transformer2DModel:
    torch.manual_seed(seed)
    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4,
                                   attention_head_dim=32, num_attention_heads=4, joint_attention_dim=3 * QWEN_WIDTH,
                                   timestep_guidance_channels=64, axes_dims_rope=(8, 8, 8, 8), guidance_embeds=False)


def save_pipeline(vae, transformer, seed: int, out: Path) -> None:
    text = tiny_flux2_pipeline(seed)
    Flux2KleinPipeline(scheduler=flow_scheduler(), vae=vae, text_encoder=text.text_encoder, tokenizer=text.tokenizer,
                       transformer=transformer).save_pretrained(str(out))


def build_base(out: Path, sizes: dict, seed: int) -> None:
    """Writes ``out/vae_pipeline`` (untrained transformer), ``out/base_embedded`` (training scenes with cached
    latents, through ``focusdpo embed --latents``), ``out/pretrain`` (the SFT run) and ``out/pipeline``."""
    vae = train_vae(sizes["vae_steps"], sizes["vae_batch"], seed)
    set_latent_statistics(vae, seed)
    save_pipeline(vae, build_transformer(seed), seed, out / "vae_pipeline")
    save_dataset(world.make_pairs(sizes["base_scenes"], seed + 100, "base"), str(out / "base_pairs"))
    embedding = {"pretrained_path": str(out / "vae_pipeline"), "output_dir": str(out / "pretrain")}
    embed_main(["--out", str(out / "base_embedded"), "--latents", "--device", "cpu", "--config",
                str(recipes.write_recipe(out / "embed.yaml", {**embedding, "dataset": str(out / "base_pairs")}))])
    recipe = recipes.write_recipe(out / "pretrain.yaml", {
        **embedding, "dataset": str(out / "base_embedded"), "drop_text_encoders": True,
        "objective": "sft", "lora_rank": 0, "reference_mode": "frozen_copy",
        "learning_rate": sizes["base_lr"], "max_steps": sizes["base_steps"],
        "per_device_train_batch_size": sizes["base_batch"], "save_steps": max(sizes["base_steps"], 1),
        "lr_scheduler_type": "cosine", "warmup_steps": min(50, sizes["base_steps"] // 10), "seed": seed,
        "ema_decay": sizes["base_ema_decay"]})  # the trainer writes the EMA's weights when > 0
    recipes.train(recipe)
    shutil.copytree(out / "vae_pipeline", out / "pipeline")
    shutil.rmtree(out / "pipeline" / "transformer")
    shutil.copytree(out / "pretrain" / "transformer", out / "pipeline" / "transformer")

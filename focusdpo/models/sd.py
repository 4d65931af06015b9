"""SD 1.x/2.x (ε or v-prediction) and SDXL (two text encoders, added time ids) on a UNet.

Built on the pipeline's own helpers: ``encode_prompt`` for text, ``_get_add_time_ids`` for SDXL
micro-conditioning, the scheduler's ``add_noise``/``get_velocity`` for the forward process.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from focusdpo.models.base import Backbone, DenoiseInputs


def flow_equivalent_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(N,)`` u of DDPM timesteps: the flow σ with the same SNR, ``√(1−ᾱ_t) / (√ᾱ_t + √(1−ᾱ_t))``, so a focus
    schedule means the same noise level on UNets and flow transformers (docs/design.md, the noise level u)."""
    alpha_bar = alphas_cumprod.to(t.device)[t].double()
    signal, noise = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return (noise / (signal + noise)).float()


def repeat_pairs(x: torch.Tensor) -> torch.Tensor:
    """``(B, ...)`` → ``(2B, ...)`` as ``[x; x]``: winner and loser share noise, timestep and prompt."""
    return torch.cat([x, x], dim=0)


class StableDiffusionBackbone(Backbone):
    """Stable Diffusion 1.x/2.x with a ``UNet2DConditionModel``."""

    family = "sd"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, pipeline):
        super().__init__(pipeline)
        # Training noise comes from a DDPM scheduler with the checkpoint's own betas and parameterisation.
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not supported; "
                             "focusdpo trains 'epsilon' and 'v_prediction' UNets")

    def loss_grid(self, resolution: int) -> tuple[int, int]:
        side = resolution // self.pipeline.vae_scale_factor
        return side, side

    def use_channels_last(self) -> None:
        self.denoiser.to(memory_format=torch.channels_last)
        self.channels_last = True

    @torch.no_grad()
    def latent_distribution(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [-1, 1] → the VAE posterior, mean and std stacked on the channel axis,
        ``(N, 2C, H/f, W/f)`` (float32, before the VAE's shift and scale). This, not a sample, is what
        ``embed --latents`` caches."""
        dist = self.pipeline.vae.encode(pixels.to(self.device, self.vae_dtype)).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1).float()

    def sample_latents(self, distribution: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One scaled draw ``(N, C, h, w)`` from a posterior ``(N, 2C, h, w)`` (mean ‖ std), from ``generator``:
        drawn every step, so cached and live encodings give the same latents and no epoch reuses one sample."""
        channels = self.denoiser.config.in_channels
        if distribution.shape[1] != 2 * channels:
            raise ValueError(f"cached latents have {distribution.shape[1]} channels but this UNet needs the VAE "
                             f"posterior's mean and std ({2 * channels}): re-run `focusdpo embed --latents`")
        mean, std = distribution.chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=generator).to(mean)  # the CPU generator: same draw on any device
        config = self.pipeline.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return (mean + std * noise - shift) * config.scaling_factor  # = dist.sample(), then the pipeline's scaling

    def latent_cache(self, batch: dict, generator: torch.Generator) -> dict[str, list[torch.Tensor]]:
        posterior = self.latent_distribution(batch["pixel_values"])
        return {"latents": list(torch.stack(posterior.chunk(2), dim=1))}  # per pair: [chosen, rejected]

    @torch.no_grad()
    def text_cache(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipeline.encode_prompt(prompts, self.text_device, 1, do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds}

    def text_conditioning(self, batch: dict, pairs: int, resolution: int) -> dict:
        """Prompt conditioning for ``[w; l]``: the embeddings cached by ``focusdpo embed``, else the text encoder's
        (``resolution`` is used by SDXL's size ids)."""
        cached = self.cached_prompt_embeds(batch, pairs)
        if cached is None:
            return self.encode_prompts(batch["prompts"], resolution)
        return {"encoder_hidden_states": repeat_pairs(cached.float())}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], resolution: int) -> dict:
        """Prompt conditioning for ``[w; l]`` from the text encoder."""
        return {"encoder_hidden_states": repeat_pairs(self.text_cache(prompts)["prompt_embeds"].to(self.device))}

    def prepare(self, batch: dict, generator: torch.Generator) -> DenoiseInputs:
        posterior = batch.get("latents")  # cached by `focusdpo embed --latents`: the posterior, not a sample
        if posterior is None:
            posterior = self.latent_distribution(batch["pixel_values"])
        latents = self.sample_latents(posterior.to(self.device, torch.float32), generator)
        pairs = latents.shape[0] // 2
        resolution = latents.shape[-1] * self.pipeline.vae_scale_factor
        noise = repeat_pairs(torch.randn((pairs, *latents.shape[1:]), generator=generator)).to(latents)
        num_train = self.noise_scheduler.config.num_train_timesteps
        t = repeat_pairs(torch.randint(0, num_train, (pairs,), generator=generator)).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        target = noise if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, t)
        kwargs = {"sample": noisy, "timestep": t, **self.text_conditioning(batch, pairs, resolution)}
        self.add_size_conditioning(kwargs, batch, resolution)
        return DenoiseInputs(kwargs, target, noise_level=self.flow_equivalent_sigma(t))

    def flow_equivalent_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """``u`` of DDPM timesteps ``t`` ``(N,)`` under this checkpoint's scheduler (:func:`flow_equivalent_sigma`)."""
        return flow_equivalent_sigma(self.noise_scheduler.alphas_cumprod, t)

    def add_size_conditioning(self, kwargs: dict, batch: dict, resolution: int) -> None:
        """SDXL's per-image size/crop ids; SD 1.x/2.x UNets take none."""

    def predict(self, denoiser: torch.nn.Module, inputs: DenoiseInputs) -> torch.Tensor:
        kwargs = dict(inputs.model_kwargs)
        sample = kwargs.pop("sample").to(self.dtype)
        if self.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        cond = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in
                kwargs.pop("added_cond_kwargs", {}).items()}
        hidden = kwargs.pop("encoder_hidden_states").to(self.dtype)
        extra = {"added_cond_kwargs": cond} if cond else {}
        return denoiser(sample, kwargs["timestep"], encoder_hidden_states=hidden, return_dict=False, **extra)[0]


class StableDiffusionXLBackbone(StableDiffusionBackbone):
    """SDXL: two text encoders (pooled embeddings from the second) and added size/crop time ids."""

    family = "sdxl"

    @torch.no_grad()
    def text_cache(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(prompts, device=self.text_device, num_images_per_prompt=1,
                                                           do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def text_conditioning(self, batch: dict, pairs: int, resolution: int) -> dict:
        cached = self.cached_prompt_embeds(batch, pairs)
        pooled = self.cached_prompt_embeds(batch, pairs, "pooled_prompt_embeds")
        if (cached is None) != (pooled is None):
            raise ValueError("cached SDXL text conditioning needs both batch['prompt_embeds'] and "
                             "batch['pooled_prompt_embeds']: re-run `focusdpo embed`")
        if cached is None:
            return self.encode_prompts(batch["prompts"], resolution)
        return self.conditioning(cached.float(), pooled.float(), resolution)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], resolution: int) -> dict:
        text = self.text_cache(prompts)
        return self.conditioning(text["prompt_embeds"].to(self.device), text["pooled_prompt_embeds"].to(self.device),
                                 resolution)

    def conditioning(self, embeds: torch.Tensor, pooled: torch.Tensor, resolution: int) -> dict:
        """UNet kwargs for ``[w; l]`` from per-pair embeddings ``(B, L, D)`` and pooled ``(B, D)``."""
        prompts = embeds.shape[0]
        size = (resolution, resolution)
        projection_dim = self.pipeline.text_encoder_2.config.projection_dim
        time_ids = self.pipeline._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype,
                                                   text_encoder_projection_dim=projection_dim)
        time_ids = time_ids.to(self.device).repeat(2 * prompts, 1)
        return {"encoder_hidden_states": repeat_pairs(embeds),
                "added_cond_kwargs": {"text_embeds": repeat_pairs(pooled), "time_ids": time_ids}}

    def add_size_conditioning(self, kwargs: dict, batch: dict, resolution: int) -> None:
        """``time_ids`` = (original size, crop top-left, target size) per image, as the SDXL pipeline builds them,
        from the optional ``original_size`` / ``crop_top_left`` columns ``(2B, 2)``; defaults: the resolution
        and (0, 0)."""
        if batch.get("original_size") is None and batch.get("crop_top_left") is None:
            return
        time_ids = kwargs["added_cond_kwargs"]["time_ids"]
        size = time_ids.new_tensor([resolution, resolution]).expand(len(time_ids), 2)
        original = batch.get("original_size")
        crop = batch.get("crop_top_left")
        original = size if original is None else torch.as_tensor(original).to(time_ids)
        crop = torch.zeros_like(size) if crop is None else torch.as_tensor(crop).to(time_ids)
        kwargs["added_cond_kwargs"]["time_ids"] = torch.cat([original, crop, size], dim=1)

    def to(self, device, dtype: torch.dtype | None = None) -> "StableDiffusionXLBackbone":
        """As for every backbone, but a VAE whose config says ``force_upcast`` stays in float32 (the SDXL VAE
        overflows in fp16/bf16; the diffusers SDXL DPO script keeps it in fp32 to avoid NaN losses)."""
        super().to(device, dtype)
        if self.pipeline.vae.config.get("force_upcast", False):
            self.pipeline.vae.to(torch.float32)
        return self

"""One sampler for pair generation, validation and evaluation, at any size, deterministic per seed.

- Flow families (``flux2``, ``flux_kontext``): a plain Euler loop over the backbone's own helpers (text
  encoding, VAE encoding, packing, position ids, the denoiser call the trainer uses), so references are passed
  exactly as in training (FLUX.2/Klein multi-reference tokens, Kontext image tokens with the configured ids)
  and any resolution divisible by the pack factor works. ``Flux2KleinPipeline.__call__`` refuses references
  under 64 px and Kontext's ``__call__`` treats a list of images as a batch, so the pipelines' ``__call__`` is
  not used. σ schedule: ``linspace(1, 1/steps, steps)`` shifted like the trainer shifts σ, then 0. No
  classifier-free guidance (FLUX.1's guidance embedding gets the backbone's ``guidance_scale``).
- SD / SDXL: the pipeline's ``__call__`` (references are not model inputs there: a personalization LoRA or a
  DreamBooth checkpoint carries the subject).

Every image ``i`` starts from noise drawn by its own ``torch.Generator().manual_seed(seeds[i])`` on the CPU, so
an image depends only on its prompt, references, seed and settings, not on which batch or process made it.
LoRAs (a personalization LoRA and/or a DPO LoRA of an earlier round) go on with :func:`apply_loras`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from focusdpo.images import square, to_pil, to_tensor
from focusdpo.models.base import Backbone, DenoiseInputs


def apply_loras(backbone: Backbone, personalization_lora: str | Path | None = None,
                dpo_lora: str | Path | None = None, loader: str = "strict") -> list[str]:
    """Load the given LoRAs as adapters ``personalization`` / ``dpo`` and activate all of them (scale 1 each).

    Uses the backbone's readers (``strict``: diffusers/peft files, mismatched keys refused; ``pipeline``: the
    pipeline's ``load_lora_weights``). Returns the active adapter names.
    """
    names = []
    for name, path in (("personalization", personalization_lora), ("dpo", dpo_lora)):
        if path:
            backbone.add_lora_adapter(path, name, loader if name == "personalization" else "strict")
            names.append(name)
    if names:
        backbone.denoiser.set_adapters(names)
    return names


def seed_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """``(N, *shape)`` standard normal noise, row ``i`` from ``manual_seed(seeds[i])`` on the CPU."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def to_pil_images(pixels: torch.Tensor) -> list[Image.Image]:
    """``(N, 3, H, W)`` in [-1, 1] → RGB PIL images."""
    return [to_pil((image + 1) / 2) for image in pixels]


def reference_tensor(images: list[Image.Image], size: int) -> torch.Tensor:
    """Reference images → ``(K, 3, size, size)`` in [0, 1] (short side resized, centre crop)."""
    if not images:
        return torch.zeros(0, 3, size, size)
    return torch.stack([to_tensor(square(img.convert("RGB"), size)) for img in images])


@torch.no_grad()
def sample_images(backbone: Backbone, prompts: list[str], references: list[list[Image.Image]] | None,
                  seeds: list[int], resolution: int, steps: int, batch_size: int = 4,
                  guidance_scale: float | None = None,
                  text: dict[str, torch.Tensor] | None = None) -> list[Image.Image]:
    """Generate ``len(prompts)`` square images of ``resolution`` px; image ``i`` from ``seeds[i]``.

    ``references``: one list of PIL images per prompt (flow families; ignored by SD/SDXL), or None.
    ``guidance_scale``: SD/SDXL classifier-free guidance (default: the pipeline's); flow families use the
    backbone's ``guidance_scale`` for a guidance embedding. Runs in chunks of ``batch_size``; within a chunk every
    sample must have the same number of references (pad-and-mask is exact, so mixed counts also work).
    ``text``: precomputed conditioning ``backbone.text_cache(prompts)`` (flow families; column → ``(N, ...)``), so a
    run whose text encoders were dropped can still sample.
    Returns RGB PIL images in prompt order.
    """
    if len(seeds) != len(prompts) or (references is not None and len(references) != len(prompts)):
        raise ValueError(f"{len(prompts)} prompts need as many seeds ({len(seeds)}) and reference lists "
                         f"({'none' if references is None else len(references)})")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if text is not None and not backbone.is_flow:
        raise ValueError(f"precomputed text conditioning is for the flow families, not {backbone.family}")
    references = references if references is not None else [[] for _ in prompts]
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        if backbone.is_flow:
            part = None if text is None else {name: values[chunk] for name, values in text.items()}
            images += sample_flow(backbone, prompts[chunk], references[chunk], seeds[chunk], resolution, steps, part)
        else:
            images += sample_unet(backbone, prompts[chunk], seeds[chunk], resolution, steps, guidance_scale)
    return images


def sample_unet(backbone: Backbone, prompts, seeds, resolution, steps, guidance_scale) -> list[Image.Image]:
    """SD/SDXL through the pipeline, one CPU generator per image (noise then moves to the UNet's device)."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    extra = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    pipe = backbone.pipeline
    pipe.set_progress_bar_config(disable=True)  # the caller's bar counts items
    latent_side = resolution // pipe.vae_scale_factor
    latents = seed_noise(seeds, (pipe.unet.config.in_channels, latent_side, latent_side))
    with backbone.text_encoders_on_device():
        out = pipe(prompt=list(prompts), height=resolution, width=resolution, num_inference_steps=steps,
                   generator=generators, latents=latents.to(backbone.device, pipe.unet.dtype), output_type="pil",
                   **extra)
    return out.images


def flow_sigmas(backbone, steps: int, seq_len: int) -> torch.Tensor:
    """``steps + 1`` descending σ from 1 to 0, shifted like the trainer's σ for ``seq_len`` target tokens."""
    sigmas = backbone.shift_sigmas(torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64), seq_len)
    return torch.cat([sigmas.float(), torch.zeros(1)])


def flow_condition(backbone, prompts, references, resolution: int, h: int, w: int, text: dict | None = None) -> dict:
    """Text and reference conditioning as the model kwargs of :meth:`FlowMatchingBackbone.prepare`."""
    size = backbone.reference_size or resolution
    batch = {"prompts": list(prompts), "references": [reference_tensor(r, size) for r in references],
             "pair_ids": [str(i) for i in range(len(prompts))], **(text or {})}
    generator = torch.Generator().manual_seed(0)  # the VAE encodes references by their mode: unused
    refs, keep, ref_ids = backbone.reference_tokens(batch, len(prompts), h, w, generator)
    text = backbone.encode_text(batch, len(prompts))
    ids = backbone.target_ids(h, w).to(backbone.device)
    kwargs = {"grid_size": (h, w), "target_ids": ids, **text, "img_ids": ids}
    if refs is not None:
        kwargs["references"] = refs
        kwargs["img_ids"] = torch.cat([ids, ref_ids.to(ids)], dim=0)
        if not bool(keep.all()):
            text_len = text["encoder_hidden_states"].shape[1]
            mask = torch.ones(len(prompts), text_len + h * w + refs.shape[1], dtype=torch.bool, device=backbone.device)
            mask[:, text_len + h * w:] = keep
            kwargs["attention_mask"] = mask[:, None, None, :]
    if backbone.denoiser.config.get("guidance_embeds", False):
        kwargs["guidance"] = torch.full((len(prompts),), backbone.guidance_scale, device=backbone.device)
    return kwargs


def sample_flow(backbone, prompts, references, seeds, resolution, steps, text=None) -> list[Image.Image]:
    """Euler steps ``x ← x + (σ_next − σ)·v`` on the packed token grid, then the family's decoder."""
    backbone.check_image_size((resolution, resolution), "images")
    h = w = resolution // backbone.pack_factor
    channels = backbone.denoiser.config.in_channels
    with backbone.text_encoders_on_device():
        kwargs = flow_condition(backbone, prompts, references, resolution, h, w, text)
    x = seed_noise(seeds, (channels, h, w)).to(backbone.device)
    sigmas = flow_sigmas(backbone, steps, h * w).to(backbone.device)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        step = {**kwargs, "tokens": backbone.pack(x), "timestep": sigma.expand(len(prompts))}
        velocity = backbone.predict(backbone.denoiser, DenoiseInputs(step, None, sigma)).float()
        x = x + (sigma_next - sigma) * velocity
    return to_pil_images(backbone.decode(x, resolution))

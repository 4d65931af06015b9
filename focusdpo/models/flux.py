"""Flow-matching transformers with in-context reference tokens: FLUX.2 (dev / [klein]) and FLUX.1 Kontext.

Both adapters go through the pipelines' own helpers (``_encode_vae_image``, ``_pack_latents``, the position-id
builders, ``encode_prompt``) and differ only in how latents are packed and how references are addressed.

Forward process (rectified flow, as FLUX is trained): ``x_t = (1 − σ)·x0 + σ·ε``, target ``ε − x0``.
σ is drawn per pair from a density over [0, 1] (``uniform``, ``logit_normal``, ``mode``; diffusers'
``compute_density_for_timestep_sampling``) read as the diffusers training scripts read it: ``u`` indexes the
descending schedule, so ``σ = 1 − u`` (a positive ``logit_mean`` favours low noise). ``flow_shift_mode`` then
shifts σ: ``pipeline`` as the family's pipeline shifts its inference sigmas when the scheduler has
``use_dynamic_shifting`` (FLUX.2 and Klein: ``compute_empirical_mu`` at the pipeline's default step count;
FLUX.1 / Kontext: ``calculate_shift``; both through ``scheduler.time_shift``), the scheduler's static ``shift``
otherwise; ``none`` leaves σ as drawn (what the diffusers dreambooth scripts train with); ``static`` applies
``flow_shift``. The transformer gets σ itself as ``timestep`` (it multiplies by 1000 inside) and
``noise_level = σ``.

Tokens: ``[target (L); reference 1 (l); …; reference K (l)]``. Every reference shares the target's timestep
modulation and is noise-free. The prediction is the first ``L`` tokens, unpacked to the packed token grid
``(N, C_packed, h, w)``, which is the loss grid where focus weights live; reference tokens never reach the loss.

Batch rules (the transformers read one set of position ids for the whole batch):

- every reference in a batch must have one size (or set ``reference_size`` to resize them all);
- samples may have different reference counts K: by default they are padded to the batch's largest K and the
  padded tokens are masked out of attention (exactly the unpadded result); ``mixed_reference_counts="error"``
  refuses such batches instead (bucket batches by K upstream);
- K = 0 for the whole batch runs the transformer on the target tokens alone.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling

from focusdpo.config.checks import check_choice as _check_choice
from focusdpo.config.training import FLOW_DENSITIES, FLOW_SHIFT_MODES, MIXED_REFERENCE_COUNTS, REFERENCE_ID_SCHEMES
from focusdpo.models.base import Backbone, DenoiseInputs
from focusdpo.models.sd import repeat_pairs

DENSITY_ALIASES = {"uniform": "none"}  # diffusers' name for uniform u


def fit_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the short side to ``size`` (bicubic, antialiased) and centre-crop to ``size × size``."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    out = F.interpolate(images.float(), size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return out[..., top:top + size, left:left + size].clamp(0, 1).to(images.dtype)


class FlowMatchingBackbone(Backbone):
    """Shared flow-matching DPO plumbing; subclasses supply packing, position ids and text conditioning."""

    transformer_class: str  # the diffusers transformer class this family expects
    right_family: str  # what to tell users whose checkpoint is of the other family
    lora_suffixes: tuple[str, ...]

    def __init__(self, pipeline, *, flow_density: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, flow_shift_mode: str = "pipeline", flow_shift: float | None = None,
                 guidance_scale: float | None = None,
                 max_references: int = 6, reference_size: int | None = None,
                 mixed_reference_counts: str = "pad", max_sequence_length: int = 512):
        super().__init__(pipeline)
        found = type(pipeline.transformer).__name__
        if found != self.transformer_class:
            raise ValueError(f"family={self.family!r} expects a {self.transformer_class}, but this pipeline "
                             f"({type(pipeline).__name__}) has a {found}; {self.right_family}")
        for name, module in pipeline.components.items():  # frozen encoders: no dropout (T5 has 0.1 in train mode)
            if isinstance(module, torch.nn.Module) and name != self.denoiser_name:
                module.eval()
        _check_choice("flow_density", flow_density, FLOW_DENSITIES)
        _check_choice("mixed_reference_counts", mixed_reference_counts, MIXED_REFERENCE_COUNTS)
        if logit_std <= 0:
            raise ValueError(f"logit_std={logit_std} must be > 0")
        _check_choice("flow_shift_mode", flow_shift_mode, FLOW_SHIFT_MODES)
        if (flow_shift_mode == "static") != (flow_shift is not None and flow_shift > 0):
            raise ValueError(f"flow_shift={flow_shift} with flow_shift_mode={flow_shift_mode!r}: 'static' needs a "
                             "flow_shift > 0 (1.0 = no shift); the other modes take none")
        if max_references < 0:
            raise ValueError(f"max_references={max_references} must be >= 0")
        if reference_size is not None and reference_size % self.pack_factor:
            raise ValueError(f"reference_size={reference_size} must be a multiple of {self.pack_factor} "
                             "(VAE downsampling × 2×2 packing)")
        self.flow_density, self.logit_mean, self.logit_std = flow_density, logit_mean, logit_std
        self.mode_scale = mode_scale
        self.flow_shift_mode, self.flow_shift = flow_shift_mode, flow_shift
        if guidance_scale is None:  # the value the pipeline samples with
            guidance_scale = inspect.signature(type(pipeline).__call__).parameters["guidance_scale"].default
        self.guidance_scale = float(guidance_scale)
        self.max_references = max_references
        self.reference_size = reference_size
        self.mixed_reference_counts = mixed_reference_counts
        self.max_sequence_length = max_sequence_length

    # ---- geometry -------------------------------------------------------------------------------
    @property
    def pack_factor(self) -> int:
        """Pixels per token side: VAE downsampling × 2×2 patch packing."""
        return self.pipeline.vae_scale_factor * 2

    def loss_grid(self, resolution: int) -> tuple[int, int]:
        side = resolution // self.pack_factor
        return side, side

    @property
    def default_lora_targets(self) -> tuple[str, ...]:
        return self.lora_suffixes

    # ---- family hooks ---------------------------------------------------------------------------
    def encode_grid(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``(M, 3, H, W)`` in [-1, 1] → normalised packed latents on the token grid ``(M, C_packed, h, w)``.

        The pipelines' ``_encode_vae_image`` takes the posterior's mode (argmax), so encoding is deterministic and
        a cached grid equals the live one: unlike the UNets' sampled latents, there is no per-step draw to keep."""
        raise NotImplementedError

    def pack(self, grid: torch.Tensor) -> torch.Tensor:
        """``(M, C, h, w)`` → tokens ``(M, h·w, C)`` in the pipeline's token order."""
        raise NotImplementedError

    def unpack(self, tokens: torch.Tensor, ids: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Target tokens ``(N, h·w, C)`` → grid ``(N, C, h, w)``."""
        raise NotImplementedError

    def target_ids(self, h: int, w: int) -> torch.Tensor:
        raise NotImplementedError

    def reference_ids(self, sizes: list[tuple[int, int]], h: int, w: int) -> torch.Tensor:
        """Position ids ``(Σ l_k, D)`` of K references with token grids ``sizes`` after an ``h × w`` target."""
        raise NotImplementedError

    def encode_text(self, batch: dict, pairs: int) -> dict:
        """Per-pair text conditioning as transformer kwargs (not yet repeated over ``[w; l]``)."""
        raise NotImplementedError

    # Transformer kwarg -> dataset column of cached text conditioning (see focusdpo.caches).
    text_cache_columns = {"encoder_hidden_states": "prompt_embeds", "pooled_projections": "pooled_prompt_embeds"}

    @torch.no_grad()
    def text_cache(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Per-pair prompt embeddings to store in the dataset, so the text encoders can stay unloaded."""
        text = self.encode_text({"prompts": prompts}, len(prompts))
        return {column: text[kwarg] for kwarg, column in self.text_cache_columns.items() if kwarg in text}

    @torch.no_grad()
    def latent_cache(self, batch: dict, generator: torch.Generator) -> dict[str, list[torch.Tensor]]:
        pixels = batch["pixel_values"]
        self.check_image_size(pixels.shape[-2:], "pixel_values")
        grid = self.encode_grid(pixels, generator)
        cache = {"latents": list(torch.stack(grid.chunk(2), dim=1))}  # per pair: [chosen, rejected]
        references = self.reference_latents(batch, len(batch["pair_ids"]), generator)
        if references is not None:  # pairs without references get (0, C, hr, wr): one array shape per column
            side = (self.reference_size or pixels.shape[-1]) // self.pack_factor
            empty = grid.new_zeros(0, grid.shape[1], side, side)
            cache["reference_latents"] = [r if r.ndim == 4 else empty for r in references]
        return cache

    # ---- preparing a batch ----------------------------------------------------------------------
    per_sample_text_keys = ("encoder_hidden_states", "pooled_projections")  # one row per pair: repeat to [w; l]

    @torch.no_grad()
    def prepare(self, batch: dict, generator: torch.Generator) -> DenoiseInputs:
        grid = batch.get("latents")
        if grid is None:
            pixels = batch["pixel_values"]
            self.check_image_size(pixels.shape[-2:], "pixel_values")
            grid = self.encode_grid(pixels, generator)
        grid = grid.to(self.device, torch.float32)
        pairs, (h, w) = grid.shape[0] // 2, grid.shape[-2:]
        refs, ref_keep, ref_ids = self.reference_tokens(batch, pairs, h, w, generator)

        noise = repeat_pairs(torch.randn((pairs, *grid.shape[1:]), generator=generator)).to(grid)
        sigma = repeat_pairs(self.sample_sigmas(pairs, h * w, generator)).to(grid)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * grid + s * noise
        target = noise - grid

        text = {k: repeat_pairs(v) if k in self.per_sample_text_keys else v
                for k, v in self.encode_text(batch, pairs).items()}
        ids = self.target_ids(h, w).to(self.device)
        kwargs = {"tokens": self.pack(noisy), "timestep": sigma, "grid_size": (h, w), "target_ids": ids, **text}
        if refs is not None:
            kwargs["references"] = repeat_pairs(refs)
            ids = torch.cat([ids, ref_ids.to(ids)], dim=0)
            if not bool(ref_keep.all()):  # padded references: mask their keys out of every attention
                text_len = text["encoder_hidden_states"].shape[1]
                keep = torch.ones(pairs, text_len + h * w + refs.shape[1], dtype=torch.bool, device=self.device)
                keep[:, text_len + h * w:] = ref_keep
                kwargs["attention_mask"] = repeat_pairs(keep)[:, None, None, :]
        kwargs["img_ids"] = ids
        if self.denoiser.config.get("guidance_embeds", False):
            kwargs["guidance"] = torch.full((2 * pairs,), self.guidance_scale, device=self.device)
        return DenoiseInputs(kwargs, target, noise_level=sigma)

    def check_image_size(self, size, what: str) -> None:
        if size[0] % self.pack_factor or size[1] % self.pack_factor:
            raise ValueError(f"{what} are {size[0]}x{size[1]} px; FLUX needs sides divisible by {self.pack_factor} "
                             "(VAE downsampling × 2×2 packing): choose another resolution")

    def sample_sigmas(self, pairs: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """σ per pair: ``1 − u`` with ``u`` from the density (diffusers' scripts index the descending schedule with
        it), then shifted by ``flow_shift_mode`` for ``seq_len`` target tokens."""
        u = compute_density_for_timestep_sampling(DENSITY_ALIASES.get(self.flow_density, self.flow_density), pairs,
                                                  self.logit_mean, self.logit_std, self.mode_scale,
                                                  generator=generator)
        return self.shift_sigmas(1.0 - u.clamp(0.0, 1.0), seq_len)

    def shift_sigmas(self, sigma: torch.Tensor, seq_len: int) -> torch.Tensor:
        config = self.pipeline.scheduler.config
        if self.flow_shift_mode == "none":
            return sigma
        if self.flow_shift_mode == "pipeline" and config.get("use_dynamic_shifting", False):
            return self.pipeline.scheduler.time_shift(self.pipeline_mu(seq_len), 1.0, sigma)
        shift = self.flow_shift if self.flow_shift_mode == "static" else config.get("shift", 1.0)
        return shift * sigma / (1 + (shift - 1) * sigma)

    def pipeline_mu(self, seq_len: int) -> float:
        """The resolution-dependent shift μ FLUX.1 / Kontext pipelines use for ``seq_len`` image tokens."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.pipeline.scheduler.config
        return calculate_shift(seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                               config.get("base_shift", 0.5), config.get("max_shift", 1.15))

    def reference_tokens(self, batch: dict, pairs: int, h: int, w: int, generator: torch.Generator):
        """Per-sample reference tokens ``(B, K·l, C)``, which of them are real ``(B, K·l)``, and their ids.

        Returns ``(None, None, None)`` when no sample has a reference.
        """
        grids = self.reference_latents(batch, pairs, generator)
        if grids is None:
            return None, None, None
        counts = [int(g.shape[0]) for g in grids]
        k_max = max(counts, default=0)
        if k_max == 0:
            return None, None, None
        tokens = self.pack(torch.cat([g for g in grids if len(g)]))  # (ΣK, l, C)
        per_ref = tokens.shape[1]
        out = tokens.new_zeros(pairs, k_max, per_ref, tokens.shape[-1])
        keep = torch.zeros(pairs, k_max, dtype=torch.bool, device=self.device)
        start = 0
        for i, k in enumerate(counts):
            out[i, :k] = tokens[start:start + k]
            keep[i, :k] = True
            start += k
        sizes = {tuple(g.shape[-2:]) for g in grids if len(g)}
        if len(sizes) > 1:
            raise ValueError(f"cached reference latents in one batch have different grids {sorted(sizes)}; "
                             "re-run `focusdpo embed --latents` with reference_size set")
        ids = self.reference_ids([sizes.pop()] * k_max, h, w)
        return out.flatten(1, 2), keep.repeat_interleave(per_ref, dim=1), ids

    def reference_latents(self, batch: dict, pairs: int, generator: torch.Generator) -> list[torch.Tensor] | None:
        """Per-pair reference latent grids ``[(K_i, C, hr, wr)]``: cached ones, or all images in one VAE call."""
        cached = batch.get("reference_latents")
        source = cached if cached is not None else batch.get("references")
        if source is None:
            return None
        if len(source) != pairs:
            raise ValueError(f"batch has {pairs} pairs but {len(source)} reference lists")
        counts = [int(r.shape[0]) for r in source]
        self.check_reference_counts(counts, batch.get("pair_ids") or [str(i) for i in range(pairs)])
        if cached is not None:
            return [torch.as_tensor(r).to(self.device, torch.float32) for r in cached]
        images = [r for r in source if r.shape[0]]
        if not images:
            return [torch.zeros(0) for _ in source]
        if self.reference_size is not None:
            images = [fit_square(r, self.reference_size) for r in images]
        sizes = sorted({tuple(r.shape[-2:]) for r in images})
        if len(sizes) > 1:
            raise ValueError(f"references in one batch have different sizes {sizes}; FLUX shares one set of "
                             "position ids per batch: set reference_size to resize them all")
        self.check_image_size(sizes[0], "references")
        latents = self.encode_grid(torch.cat(images).to(self.device) * 2 - 1, generator)  # one VAE call
        return list(latents.split(counts))

    def check_reference_counts(self, counts: list[int], pair_ids: list[str]) -> None:
        k_max = max(counts, default=0)
        if k_max > self.max_references:
            worst = pair_ids[counts.index(k_max)]
            raise ValueError(f"pair {worst} has {k_max} references but {self.family} supports at most "
                             f"{self.max_references} here (max_references); drop references or raise the limit")
        if len(set(counts)) > 1 and self.mixed_reference_counts == "error":
            raise ValueError(f"pairs in one batch have different reference counts {dict(zip(pair_ids, counts))}; "
                             "batch pairs with the same K (bucket by K, or per_device_train_batch_size: 1), or "
                             "set mixed_reference_counts: pad")

    # ---- running the transformer ----------------------------------------------------------------
    def denoiser_kwargs(self, denoiser: torch.nn.Module, inputs: DenoiseInputs) -> dict:
        kw = inputs.model_kwargs
        dtype = self.dtype
        hidden = kw["tokens"]
        if "references" in kw:
            hidden = torch.cat([hidden, kw["references"]], dim=1)
        call = {"hidden_states": hidden.to(dtype), "timestep": kw["timestep"].to(dtype),
                "encoder_hidden_states": kw["encoder_hidden_states"].to(dtype), "txt_ids": kw["txt_ids"],
                "img_ids": kw["img_ids"], "guidance": kw["guidance"].to(dtype) if "guidance" in kw else None,
                "return_dict": False}
        if "pooled_projections" in kw:
            call["pooled_projections"] = kw["pooled_projections"].to(dtype)
        if "attention_mask" in kw:
            call["joint_attention_kwargs"] = {"attention_mask": kw["attention_mask"]}
        return call

    def predict_tokens(self, denoiser: torch.nn.Module, inputs: DenoiseInputs) -> torch.Tensor:
        """All output tokens ``(N, L + K·l, C)``: target first, then the references."""
        return denoiser(**self.denoiser_kwargs(denoiser, inputs))[0]

    def tokens_to_grid(self, tokens: torch.Tensor, inputs: DenoiseInputs) -> torch.Tensor:
        """Keep the first ``L`` (target) tokens and unpack them to the loss grid."""
        h, w = inputs.model_kwargs["grid_size"]
        ids = inputs.model_kwargs["target_ids"]
        return self.unpack(tokens[:, : h * w], ids, h, w)

    def predict(self, denoiser: torch.nn.Module, inputs: DenoiseInputs) -> torch.Tensor:
        return self.tokens_to_grid(self.predict_tokens(denoiser, inputs), inputs)


    # ---- LoRA files and sampling ----------------------------------------------------------------


class Flux2Backbone(FlowMatchingBackbone):
    """FLUX.2 [dev] (Mistral3 text stack) and FLUX.2 [klein] (Qwen3): 2×2-patchified, BatchNorm-normalised
    latents; reference k gets time coordinate 10·(k+1) from the pipeline's ``_prepare_image_ids``."""

    family = "flux2"
    transformer_class = "Flux2Transformer2DModel"
    right_family = "a FLUX.1 / Kontext checkpoint is family 'flux_kontext'"
    # FLUX.2's double-stream `to_out` is a ModuleList (target `to_out.0`); the single blocks fuse q/k/v/mlp.
    lora_suffixes = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                     "to_qkv_mlp_proj")

    def __init__(self, pipeline, *, text_encoder_out_layers: tuple[int, ...] | None = None, **kwargs):
        super().__init__(pipeline, **kwargs)
        if type(pipeline).__name__ == "Flux2KleinKVPipeline":
            raise ValueError("Flux2KleinKVPipeline trains with its KV-cache attention processors, which focusdpo "
                             "does not set up; load the checkpoint as Flux2KleinPipeline")
        self.text_encoder_out_layers = text_encoder_out_layers

    @property
    def default_lora_targets(self) -> tuple[str, ...]:
        """The suffixes above plus each single block's ``attn.to_out`` by full name (a bare ``to_out`` suffix
        would also hit the double blocks' ModuleList)."""
        singles = tuple(f"single_transformer_blocks.{i}.attn.to_out"
                        for i in range(len(self.denoiser.single_transformer_blocks)))
        return self.lora_suffixes + singles

    def pipeline_mu(self, seq_len: int) -> float:
        """FLUX.2 pipelines shift with ``compute_empirical_mu`` (it depends on the step count: the pipeline's
        default ``num_inference_steps`` is used), not FLUX.1's ``calculate_shift``."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        steps = inspect.signature(type(self.pipeline).__call__).parameters["num_inference_steps"].default
        return compute_empirical_mu(seq_len, steps)

    def encode_grid(self, pixels, generator):
        return self.pipeline._encode_vae_image(pixels.to(self.device, self.vae_dtype), generator).float()

    def decode(self, grid: torch.Tensor, resolution: int) -> torch.Tensor:
        """Normalised patchified grid ``(N, 4C, h, w)`` → pixels ``(N, 3, H, W)`` in [-1, 1]: undoes
        :meth:`encode_grid` with the pipeline's own unpatchify (the only implementation of its latent layout)."""
        vae = self.pipeline.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(grid)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(grid)
        latents = self.pipeline._unpatchify_latents(grid * std + mean)
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]

    def pack(self, grid):
        return self.pipeline._pack_latents(grid)

    def unpack(self, tokens, ids, h, w):
        return self.pipeline._unpack_latents_with_ids(tokens, ids.expand(tokens.shape[0], -1, -1), h, w)

    def target_ids(self, h, w):
        return self.pipeline._prepare_latent_ids(torch.empty(1, 1, h, w))[0]

    def reference_ids(self, sizes, h, w):
        return self.pipeline._prepare_image_ids([torch.empty(1, 1, *s) for s in sizes])[0]

    def text_kwargs(self) -> dict:
        layers = self.text_encoder_out_layers
        return {"max_sequence_length": self.max_sequence_length,
                **({} if layers is None else {"text_encoder_out_layers": tuple(layers)})}

    def encode_text(self, batch, pairs):
        embeds, text_ids = self.pipeline.encode_prompt(batch.get("prompts"), device=self.text_device,
                                                       prompt_embeds=self.cached_prompt_embeds(batch, pairs),
                                                       **self.text_kwargs())
        return {"encoder_hidden_states": embeds.float().to(self.device), "txt_ids": text_ids[0].to(self.device)}


class FluxKontextBackbone(FlowMatchingBackbone):
    """FLUX.1 Kontext, or FLUX.1-dev with in-context references (UNO/DreamO/MOSAIC-style personalization).

    ``reference_ids`` chooses how references are told apart in RoPE space (target ids are ``(0, row, col)``):

    - ``kontext``: Kontext's own offset on the first axis, one index per reference: ``(k+1, row, col)``
      (K = 1 is exactly the pipeline's ids);
    - ``diagonal``: UNO's diagonal placement: reference k starts at ``(h + Σ_{j<k} h_j, w + Σ_{j<k} w_j)``;
    - ``width``: MOSAIC-style placement to the left of the target, at negative columns
      ``col − Σ_{j≤k} w_j``.
    """

    family = "flux_kontext"
    transformer_class = "FluxTransformer2DModel"
    right_family = "a FLUX.2 checkpoint is family 'flux2'"
    lora_suffixes = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    def __init__(self, pipeline, *, reference_ids: str = "kontext", **kwargs):
        super().__init__(pipeline, **kwargs)
        _check_choice("reference_ids", reference_ids, REFERENCE_ID_SCHEMES)
        self.reference_id_scheme = reference_ids

    def decode(self, grid: torch.Tensor, resolution: int) -> torch.Tensor:
        """Packed grid ``(N, 4C, h, w)`` → pixels ``(N, 3, H, W)`` in [-1, 1] (undoes :meth:`encode_grid`)."""
        pipe, vae = self.pipeline, self.pipeline.vae
        latents = pipe._unpack_latents(self.pack(grid), resolution, resolution, pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]

    def encode_grid(self, pixels, generator):
        latents = self.pipeline._encode_vae_image(pixels.to(self.device, self.vae_dtype), generator)  # (x−shift)·scale
        n, c, hl, wl = latents.shape
        tokens = self.pipeline._pack_latents(latents, n, c, hl, wl)  # (n, hl/2·wl/2, 4c)
        return tokens.transpose(1, 2).reshape(n, 4 * c, hl // 2, wl // 2).float()

    def pack(self, grid):
        return grid.flatten(2).transpose(1, 2)  # the grid already holds `_pack_latents` channels, row-major

    def unpack(self, tokens, ids, h, w):
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def target_ids(self, h, w):
        return self.pipeline._prepare_latent_image_ids(1, h, w, self.device, torch.float32)

    def reference_ids(self, sizes, h, w):
        ids, off_h, off_w, left = [], h, w, 0
        for k, (rh, rw) in enumerate(sizes):
            ref = self.pipeline._prepare_latent_image_ids(1, rh, rw, self.device, torch.float32)
            if self.reference_id_scheme == "kontext":
                ref[:, 0] = k + 1
            elif self.reference_id_scheme == "diagonal":
                ref[:, 1] += off_h
                ref[:, 2] += off_w
                off_h, off_w = off_h + rh, off_w + rw
            else:  # width
                left += rw
                ref[:, 2] -= left
            ids.append(ref)
        return torch.cat(ids)

    def encode_text(self, batch, pairs):
        cached = self.cached_prompt_embeds(batch, pairs)
        pooled = self.cached_prompt_embeds(batch, pairs, "pooled_prompt_embeds")
        if (cached is None) != (pooled is None):
            raise ValueError("cached FLUX.1 text conditioning needs both batch['prompt_embeds'] (T5) and "
                             "batch['pooled_prompt_embeds'] (CLIP)")
        embeds, pooled, text_ids = self.pipeline.encode_prompt(
            prompt=batch.get("prompts"), prompt_2=None, device=self.text_device, prompt_embeds=cached,
            pooled_prompt_embeds=pooled, max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds.float().to(self.device),
                "pooled_projections": pooled.float().to(self.device), "txt_ids": text_ids.float().to(self.device)}


# ---- checkpoint loaders for models/__init__.py (check_family matches saved class names by prefix) -------------
def _saved_class(path) -> str:
    return json.loads((Path(path) / "model_index.json").read_text()).get("_class_name", "")


class Flux2:
    """Loads any FLUX.2 pipeline directory (FLUX.2 [dev] or [klein]) as its own pipeline class."""

    accepted = ("Flux2Pipeline", "Flux2KleinPipeline")

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        import diffusers

        saved = _saved_class(path)
        if saved not in cls.accepted:
            raise ValueError(f"{path} holds a {saved} checkpoint; family='flux2' trains {' or '.join(cls.accepted)}"
                             " (FLUX.1 / Kontext checkpoints are family 'flux_kontext')")
        return getattr(diffusers, saved).from_pretrained(str(path), **kwargs)


class Flux:
    """Loads a FLUX.1 Kontext or FLUX.1-dev/schnell pipeline directory as a ``FluxKontextPipeline``."""

    accepted = ("FluxKontextPipeline", "FluxPipeline")

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        from diffusers import FluxKontextPipeline

        saved = _saved_class(path)
        if saved not in cls.accepted:
            hint = "; FLUX.2 checkpoints are family 'flux2'" if saved.startswith("Flux2") else ""
            raise ValueError(f"{path} holds a {saved} checkpoint; family='flux_kontext' trains "
                             f"{' or '.join(cls.accepted)}{hint}")
        return FluxKontextPipeline.from_pretrained(str(path), **kwargs)

"""The interface every backbone adapter implements, shared by ε/v-prediction UNets and flow transformers.

An adapter owns a diffusers pipeline (VAE, text stack, scheduler) and its trainable denoiser. Training
asks it for two things: :meth:`Backbone.prepare` turns a ``[w; l]`` batch into model inputs with shared
noise and timestep per pair, and :meth:`Backbone.predict` runs a denoiser (policy or reference) on
them. Predictions and targets live on the *loss grid* ``(N, C, h, w)``, which is also where focus
weights live: the latent grid for UNets, the packed token grid for transformers.
"""

from __future__ import annotations

import functools
import json
import re
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from focusdpo.errors import LoraFileError
from focusdpo.models.families import FAMILIES, Family
from focusdpo.models.quantize import cast_unquantized, is_quantized
from focusdpo.atomic import atomic_write

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


@dataclass
class DenoiseInputs:
    """One prepared ``[w; l]`` batch (``N = 2B`` rows)."""

    model_kwargs: dict = field(repr=False)  # everything the denoiser call needs, family-specific
    target: torch.Tensor  # (N, C, h, w) regression target on the loss grid
    noise_level: torch.Tensor  # (N,) u in [0, 1], 1 = pure noise; drives the focus schedule


def sort_safetensors_header(path: Path) -> None:
    """Rewrite a .safetensors file's JSON header with sorted keys: safetensors writes its ``__metadata__`` mapping in
    hash order (a Rust HashMap), so two identical saves differ in bytes otherwise. The format: an 8-byte
    little-endian header length, the header padded with spaces to a multiple of 8, then the tensor bytes, whose
    offsets count from the header's end (so the header may change length)."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    atomic_write(path, lambda staging: staging.write_bytes(len(header).to_bytes(8, "little") + header +
                                                            data[8 + length:]))


def lora_denoisers(keys) -> set[str]:
    """The denoisers a LoRA's keys name (diffusers' format prefixes them ``unet.`` / ``transformer.``); empty for
    other layouts (kohya's ``lora_unet_…``, XLabs, BFL, peft keys without a prefix), which the keys do not place."""
    return {key.split(".", 1)[0] for key in keys} & {facts.denoiser for facts in FAMILIES.values()}


def check_lora_family(keys, family: str, source, fix: str = "it is a LoRA for {fits}: give one made for family "
                      "{family!r}, or set family to the LoRA's") -> None:
    """Refuse a LoRA whose keys name another family's denoiser (an SD ``unet.…`` LoRA for FLUX, or the reverse);
    ``fix`` may name ``{fits}`` (the families it is for) and ``{family}``."""
    if not keys:
        raise LoraFileError(f"{source} holds no tensors: it is not a LoRA; download or copy it again")
    held, wanted = lora_denoisers(keys), FAMILIES[family].denoiser
    if held and wanted not in held:
        other = min(held)
        fits = " or ".join(name for name, facts in FAMILIES.items() if facts.denoiser == other)
        raise LoraFileError(f"{source} holds {other} LoRA weights, not the {wanted} weights of family {family!r}: "
                            + fix.format(fits=fits, family=family))


def lora_files(path: str | Path, field: str, loader: str = "strict") -> list[Path]:
    """The files a LoRA path is read from: the file itself, a folder's ``pytorch_lora_weights.safetensors`` or, for
    the pipeline's loader (which picks a folder's own file name), the folder's .safetensors files."""
    path = Path(path)
    if not path.exists():
        raise LoraFileError(f"{field}: {str(path)!r} does not exist; give a LoRA folder (holding {LORA_WEIGHTS_NAME}) "
                            "or the .safetensors file")
    if path.is_file():
        return [path]
    if (path / LORA_WEIGHTS_NAME).is_file():
        return [path / LORA_WEIGHTS_NAME]
    if loader != "strict":
        return sorted(path.glob("*.safetensors"))
    raise LoraFileError(f"{field}: {path} holds no {LORA_WEIGHTS_NAME}; give the run folder of a trained LoRA or its "
                        ".safetensors file")


def check_lora_file(path: str | Path, family: str, field: str, loader: str = "strict",
                    pretrained_path: str | Path | None = None) -> None:
    """A LoRA a command is given exists, its safetensors header reads, its keys are for ``family`` and, given the
    base model's folder, its layers fit that model's denoiser: checked before the model loads, since a cut download
    or another model's LoRA (an SDXL LoRA for SD 1.5, the same family to the keys) would otherwise fail only after."""
    from safetensors import safe_open

    denoiser_name = FAMILIES[family].denoiser
    denoiser = denoiser_on_meta(pretrained_path, denoiser_name) if pretrained_path else None
    for file in (f for f in lora_files(path, field, loader) if loader == "strict" or f.suffix == ".safetensors"):
        try:
            with safe_open(str(file), framework="pt") as f:
                shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except Exception as e:  # safetensors raises its own SafetensorError for short or garbled files
            raise LoraFileError(f"{field}: {file} cannot be read ({e}): it is cut short or not a safetensors file; "
                                "download or copy it again") from None
        check_lora_family(list(shapes), family, f"{field}: {file}")
        if denoiser is not None:
            check_lora_fits(shapes, denoiser, f"{field}: {file}", f"the {denoiser_name} of {pretrained_path}")


# diffusers' LoRA keys: <denoiser>.<module>.lora_A|lora_B[.<adapter>].weight (older files: lora.down / lora.up)
LORA_KEY = re.compile(r"^(?:unet|transformer)\.(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora\.down|lora\.up)"
                      r"(?:\.[^.]+)?\.weight$")


@functools.lru_cache(maxsize=2)
def denoiser_on_meta(pretrained_path: str | Path, denoiser: str):
    """The denoiser saved under ``pretrained_path``, built from its ``config.json`` on the ``meta`` device: module
    names and shapes without weights or memory, in seconds even for a 12 B transformer. None when the folder does
    not say its class (the checks after loading still apply)."""
    import diffusers

    folder = Path(pretrained_path) / denoiser
    try:
        cls = getattr(diffusers, json.loads((folder / "config.json").read_text())["_class_name"])
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    with torch.device("meta"):
        return cls.from_config(cls.load_config(str(folder)))


def check_lora_fits(shapes: dict[str, tuple], denoiser: torch.nn.Module, source: str, model: str) -> None:
    """Every LoRA layer in ``shapes`` (key → shape) names a module of ``denoiser`` and matches its sizes: the down
    matrix ``(r, in, …)`` its input, the up matrix ``(out, r, …)`` its output (Linear and Conv weights alike)."""
    modules, misfits = dict(denoiser.named_modules()), []
    for key, shape in shapes.items():
        match = LORA_KEY.match(key)
        if match is None:
            continue
        weight = getattr(modules.get(match["module"]), "weight", None)
        side = 1 if match["kind"] in ("lora_A", "lora.down") else 0
        if weight is None or len(shape) < 2 or shape[side] != weight.shape[side]:
            misfits.append(f"{key} {list(shape)} vs " + (f"module {list(weight.shape)}" if weight is not None
                                                          else "no such module"))
    if misfits:
        raise LoraFileError(f"{source} does not fit {model}: {len(misfits)} of its LoRA weights name modules it "
                            f"lacks or have other sizes (first: {misfits[0]}). It is a LoRA for another model of "
                            "this family (e.g. SDXL vs SD 1.5, or another transformer size): give one trained on "
                            "this base model")


class Backbone(ABC):
    """A model family: builds inputs, runs the denoiser, reads and writes its LoRA in diffusers format."""

    family: str
    default_lora_targets: tuple[str, ...]

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.offload_text_encoders = False  # True: text encoders stay on the CPU and encode there
        self.channels_last = False  # True: UNet inputs are fed channels-last (see use_channels_last)

    @property
    def facts(self) -> Family:
        return FAMILIES[self.family]

    @property
    def is_flow(self) -> bool:
        return self.facts.flow

    @property
    def takes_references(self) -> bool:
        return self.facts.takes_references

    @property
    def denoiser_name(self) -> str:
        """``unet`` or ``transformer``: the pipeline attribute and LoRA key prefix."""
        return self.facts.denoiser

    # Read live from the first parameter (a frozen base weight: LoRA weights are registered after their base layer), so
    # they stay right when accelerate or DeepSpeed moves or casts the model. diffusers' own ``.device``/``.dtype`` walk
    # every submodule looking for offloading hooks on each access, and a step reads them a dozen times.
    @property
    def device(self) -> torch.device:
        """Where the denoiser runs."""
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's compute dtype (its frozen base weights). A quantized base's Linear weights are skipped
        (``quantize_base``): their dtype is the one they were quantized from, and ``.to(dtype)`` leaves it."""
        return next(p.dtype for p in self.denoiser.parameters() if p.is_floating_point() and not is_quantized(p))

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.pipeline.vae.parameters()).dtype

    @property
    def text_device(self) -> torch.device:
        """Where prompts are encoded (their embeddings then move to the denoiser's device)."""
        return torch.device("cpu") if self.offload_text_encoders else self.device

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    @abstractmethod
    def prepare(self, batch: dict, generator: torch.Generator) -> DenoiseInputs:
        """Encode images and prompts of a collated batch; draw shared noise and timestep per pair."""

    @abstractmethod
    def predict(self, denoiser: torch.nn.Module, inputs: DenoiseInputs) -> torch.Tensor:
        """Run ``denoiser`` on prepared inputs; returns ``(N, C, h, w)`` like ``inputs.target``."""

    @abstractmethod
    def loss_grid(self, resolution: int) -> tuple[int, int]:
        """``(h, w)`` of the loss grid for square images of ``resolution`` pixels."""

    def latent_cache(self, batch: dict, generator: torch.Generator) -> dict[str, list[torch.Tensor]]:
        """Per-pair VAE latents to store in the dataset: ``latents`` ``(2, C', h, w)`` = [chosen, rejected] and,
        for in-context transformers, ``reference_latents`` ``(K, C, hr, wr)``. What ``C'`` holds is the family's
        choice, read back by its :meth:`prepare`: the posterior's mean and std for UNets (a fresh sample is drawn
        every step), the posterior's mode for FLUX (their pipelines encode with the mode)."""
        raise NotImplementedError

    def text_cache(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Per-pair prompt embeddings to cache in the dataset (``focusdpo embed``): columns ``prompt_embeds``
        ``(N, L, D)`` and, where the family has one, ``pooled_prompt_embeds`` ``(N, D)``."""
        raise NotImplementedError(f"{self.family} cannot cache prompt embeddings")

    def cached_prompt_embeds(self, batch: dict, pairs: int, key: str = "prompt_embeds") -> torch.Tensor | None:
        embeds = batch.get(key)
        if embeds is None:
            return None
        embeds = torch.as_tensor(embeds)
        if embeds.shape[0] != pairs:
            raise ValueError(f"batch[{key!r}] has {embeds.shape[0]} rows for {pairs} pairs: cache one row per "
                             "pair (not per [w; l] image)")
        return embeds.to(self.device)

    def to(self, device, dtype: torch.dtype | None = None) -> "Backbone":
        """Move the frozen components (VAE, text encoders) and the denoiser; cast frozen parts to ``dtype``."""
        for name, module in self.pipeline.components.items():
            if self.offload_text_encoders and name.startswith("text_encoder"):
                continue
            if isinstance(module, torch.nn.Module):
                cast = dtype not in (None, torch.float32) and name != self.denoiser_name
                module.to(device, dtype) if cast else module.to(device)  # a dtype argument warns in diffusers
        return self

    def cast_denoiser(self, dtype: torch.dtype) -> None:
        """``denoiser.to(dtype)``; a base quantized as it loaded (``quantize_base``) layer by layer, its quantized
        weights kept (diffusers refuses ``.to(dtype)`` on it)."""
        if getattr(self.denoiser, "is_quantized", False):
            cast_unquantized(self.denoiser, dtype)
        else:
            self.denoiser.to(dtype)

    def use_channels_last(self) -> None:
        """Store the denoiser's convolution weights channels-last and feed it channels-last inputs (UNets)."""
        raise ValueError(f"channels_last is for UNet families (sd, sdxl); the {self.family} {self.denoiser_name} has "
                         "no convolutions on its token path: remove channels_last from the recipe")

    def lora_state_dict(self, adapter_name: str = "default", state_dict: dict | None = None) -> dict[str, torch.Tensor]:
        """The adapter's LoRA weights; from ``state_dict`` (the denoiser's full one) when given: under
        FSDP/ZeRO-3 the parameters are shards and only a gathered state dict holds the whole LoRA."""
        return get_peft_model_state_dict(self.denoiser, state_dict=state_dict, adapter_name=adapter_name)

    def save_lora(self, out_dir: str | Path, adapter_name: str = "default", state_dict: dict | None = None) -> None:
        """Write ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights(out_dir)`` reads.

        peft keys are kept as they are (as diffusers' training scripts save them): the UNet-era
        ``lora.down/up`` renaming makes the FLUX loaders skip attention layers silently. The adapter's
        LoraConfig goes in as metadata: without it loaders assume ``lora_alpha = rank`` and a LoRA trained
        with another alpha reloads rescaled.
        """
        self.write_lora(out_dir, self.lora_state_dict(adapter_name, state_dict),
                        self.denoiser.peft_config[adapter_name].to_dict())

    def write_lora(self, out_dir: str | Path, layers: dict[str, torch.Tensor], config: dict) -> None:
        """The pipeline's own ``save_lora_weights`` with the LoraConfig as metadata. Sets in the config (peft keeps
        ``target_modules`` as one) are written sorted: a set's order changes with every process's hash seed, and the
        same run must give the same bytes."""
        config = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}
        prefix = self.denoiser_name
        type(self.pipeline).save_lora_weights(str(out_dir), safe_serialization=True, **{
            f"{prefix}_lora_layers": layers, f"{prefix}_lora_adapter_metadata": config})
        sort_safetensors_header(Path(out_dir) / LORA_WEIGHTS_NAME)

    def save_fused_lora(self, out_dir: str | Path, adapters: tuple[str, ...]) -> None:
        """Write ONE LoRA equal to the sum of ``adapters`` (e.g. personalization + DPO), loadable alone.

        Exact: ``Σ_i s_i·B_i·A_i = [s_1·B_1, s_2·B_2, …] @ [A_1; A_2; …]``, so the fused rank is the sum of the
        ranks (modules an adapter does not touch get zero rows) and the scale is 1 (alpha = rank).
        """
        from peft import LoraConfig

        layers = {}
        for name, module in self.denoiser.named_modules():
            if not hasattr(module, "lora_A") or not any(a in module.lora_A for a in adapters):
                continue
            a_parts, b_parts = [], []
            for adapter in adapters:
                if adapter in module.lora_A:
                    a_parts.append(module.lora_A[adapter].weight.detach().float())
                    b_parts.append(module.scaling[adapter] * module.lora_B[adapter].weight.detach().float())
            layers[name] = (torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1))
        rank = max(a.shape[0] for a, _ in layers.values())
        state = {}
        for name, (a, b) in layers.items():  # pad to one rank: zero rows/columns add nothing
            pad = rank - a.shape[0]
            state[f"{name}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, *a.shape[1:])]).contiguous()
            state[f"{name}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad, *b.shape[2:])], 1).contiguous()
        self.write_lora(out_dir, state, LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(layers)).to_dict())

    def lora_file(self, path: str | Path) -> Path:
        path = Path(path)
        file = path / LORA_WEIGHTS_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no LoRA file at {file}; expected a .safetensors file or a folder "
                                    f"holding {LORA_WEIGHTS_NAME}")
        return file

    def read_lora_metadata(self, path: str | Path) -> dict | None:
        """The LoraConfig stored with a LoRA file (rank, alpha, targets), without the denoiser prefix."""
        import json

        from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
        from safetensors import safe_open

        with safe_open(str(self.lora_file(path)), framework="pt") as f:
            stored = (f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
        metadata = json.loads(stored) if stored else None
        prefix = f"{self.denoiser_name}."
        return {k.removeprefix(prefix): v for k, v in metadata.items()} if metadata else None

    def read_lora(self, path: str | Path) -> dict[str, torch.Tensor]:
        """A diffusers-format LoRA (folder or .safetensors) as a peft state dict for the denoiser.

        Keys that name no module of the denoiser raise, listing the first mismatches: a LoRA made for
        another model would otherwise load silently as a no-op.
        """
        file = self.lora_file(path)
        prefix = f"{self.denoiser_name}."
        state = convert_unet_state_dict_to_peft(
            {k.removeprefix(prefix): v for k, v in load_file(str(file)).items()})
        modules = dict(self.denoiser.named_modules())
        unknown = [k for k in state if k.split(".lora_")[0].replace(".base_layer", "") not in modules]
        if unknown:
            raise ValueError(f"LoRA {file} does not fit this {self.family} {self.denoiser_name}: {len(unknown)} of "
                             f"{len(state)} keys name no module, e.g. {unknown[:3]}. Is it a LoRA for another model? "
                             "If it is a kohya/XLabs/BFL-format file, set personalization_lora_loader: pipeline")
        return state

    def add_lora_adapter(self, path: str | Path, adapter_name: str, loader: str = "strict") -> None:
        """Attach an existing LoRA as a new adapter (e.g. the personalization LoRA a reference keeps).

        ``strict`` reads diffusers/peft files and refuses keys that name no module; ``pipeline`` goes through
        the pipeline's own ``load_lora_weights``, which also converts kohya, XLabs and BFL layouts.
        """
        if loader == "strict":  # the stored LoraConfig carries alpha: without it a LoRA loads rescaled
            self.denoiser.load_lora_adapter(self.read_lora(path), adapter_name=adapter_name, prefix=None,
                                            metadata=self.read_lora_metadata(path))
            return
        self.pipeline.load_lora_weights(str(path), adapter_name=adapter_name)
        if adapter_name not in getattr(self.denoiser, "peft_config", {}):
            raise ValueError(f"{path} holds no {self.denoiser_name} LoRA weights that "
                             f"{type(self.pipeline).__name__}.load_lora_weights can read")

    def load_lora(self, path: str | Path, adapter_name: str = "default") -> None:
        """Load a diffusers-format LoRA file into an existing adapter (resume); mismatches raise."""
        state = self.read_lora(path)
        result = set_peft_model_state_dict(self.denoiser, state, adapter_name)
        missing = [k for k in result.missing_keys if "lora" in k and f".{adapter_name}." in k]
        if result.unexpected_keys or missing:
            raise ValueError(f"LoRA {path} does not match the model's adapter {adapter_name!r}: "
                             f"unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}")

    @contextmanager
    def text_encoders_on_device(self):
        """Pipelines encode prompts on their execution device: bring offloaded text encoders there for a while."""
        encoders = [m for n, m in self.pipeline.components.items() if n.startswith("text_encoder") and m is not None]
        if self.offload_text_encoders:
            for module in encoders:
                module.to(self.device)
        try:
            yield
        finally:
            if self.offload_text_encoders:
                for module in encoders:
                    module.to("cpu")

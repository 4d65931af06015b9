"""Peak device memory of a training step, split by what holds it, and which cards it fits.

Steady state (step 2 onwards, when the optimizer state exists): ``weights + frozen components + trainable state +
activations``. Activations are the traced step's peak of live non-parameter storage, scaled linearly with the pairs
per device (every activation has the batch as its first axis; the fixed remainder is a few MB of timestep
embeddings and ids). What is not modelled is a named margin, not a hidden factor: ``RESERVE`` per card for the CUDA
context and library workspaces, and ``FRAGMENTATION`` on the churning activations for the caching allocator.
"""

from __future__ import annotations

from dataclasses import dataclass

from focusdpo.models.families import QUANTIZATIONS
from focusdpo.planning.presets import Preset
from focusdpo.planning.settings import StepSettings

GIB = 2 ** 30
MIB = 2 ** 20
RESERVE = int(1.5 * GIB)  # CUDA context (~0.5 GiB), cuBLAS/cuDNN workspaces, NCCL buffers under DDP
FRAGMENTATION = 0.10  # caching-allocator rounding and fragmentation, as a share of the activations


@dataclass(frozen=True)
class Card:
    """A device class by its nominal size; ``total`` is the memory ``nvidia-smi`` reports for a typical card."""

    name: str
    examples: str
    total: int

    @property
    def usable(self) -> int:
        return self.total - RESERVE


CARDS = (Card("24 GB", "RTX 4090, L4, A10", 24564 * MIB), Card("48 GB", "L40S, RTX 6000 Ada, A6000", 46068 * MIB),
         Card("80 GB", "A100 80GB, H100", 81559 * MIB), Card("141 GB", "H200", 143771 * MIB))


def optimizer_bytes_per_param(optim: str) -> float | None:
    """Optimizer state per trainable parameter, by transformers' ``optim`` name (``None``: Adafactor, whose
    factored state depends on the shapes; see :func:`optimizer_bytes`)."""
    name = optim.lower()
    if name.startswith("sgd") or "lomo" in name:
        return 0.0  # transformers' SGD has no momentum by default; LOMO fuses the update into backward
    if "adafactor" in name:
        return None
    moments = 3 if "ademamix" in name else 1 if ("lion" in name or "rmsprop" in name or "adagrad" in name) else 2
    width = 0.5 if "4bit" in name else 1 if "8bit" in name else 4
    return moments * width


def optimizer_bytes(optim: str, trainable: int, factored: int) -> int:
    """Bytes of optimizer state for ``trainable`` parameters; ``factored`` is Adafactor's Σ (rows + cols) over the
    trainable matrices (its second moment is stored as a row and a column vector, no first moment by default)."""
    per_param = optimizer_bytes_per_param(optim)
    return int(4 * factored) if per_param is None else int(per_param * trainable)


def dtype_bytes(settings: StepSettings) -> int:
    return 2 if settings.bf16 else 4


def frozen_component_bytes(preset: Preset, settings: StepSettings) -> dict[str, int]:
    """Bytes of the frozen text encoders and VAE on the device, in the half dtype the trainer casts them to
    (the SDXL VAE stays float32); text encoders only while the recipe keeps them."""
    out = {}
    for name, count in preset.frozen.items():
        if "vae" not in name and not settings.keeps_text_encoders:
            continue
        out[name] = count * (4 if name in preset.fp32_frozen else dtype_bytes(settings))
    return out


def mosaic_bytes(config: dict, settings: StepSettings, tokens: dict, pairs: int) -> int:
    """MOSAIC's attention capture (``focusdpo.attention``): per captured block the winners' kept query rows and
    target keys ``S·(R + L)·H·d`` in the compute dtype, the block-averaged map ``S·R·L`` in float32, and one block's
    softmax ``S·H·R·L`` in float32 at a time; ``S`` winners, ``R`` reference rows (all ``K·l`` as an upper bound),
    ``L`` target tokens."""
    if not settings.mosaic or "num_single_layers" not in config:
        return 0
    heads, dim = config["num_attention_heads"], config["attention_head_dim"]
    blocks = config["num_layers"] + (config["num_single_layers"] if settings.attention_blocks == "all" else 0)
    rows, target = tokens["references"], tokens["target"]
    kept = blocks * pairs * (rows + target) * heads * dim * dtype_bytes(settings)
    return kept + pairs * rows * target * 4 * (1 + heads)


def denoiser_weight_bytes(trace: dict, settings: StepSettings) -> int:
    """The frozen denoiser: in the run's dtype, with ``quantize_base`` its Linear weights at the quantized size (values
    and block scales per weight, a scale per row); a full fine-tune holds float32 weights and their frozen copy."""
    if settings.lora_rank <= 0:
        return trace["base_params"] * 4
    quantization = QUANTIZATIONS.get(settings.quantize_base)
    if quantization is None:
        return trace["base_params"] * dtype_bytes(settings)
    linear = trace["quantized_params"]
    return int((trace["base_params"] - linear) * dtype_bytes(settings) + linear * quantization.bytes_per_weight
               + trace["quantized_rows"] * quantization.bytes_per_row)


def memory_split(trace: dict, preset: Preset, settings: StepSettings, pairs: int) -> dict[str, int]:
    """Peak bytes by holder for ``pairs`` pairs per device, from a trace of ``trace['pairs']`` pairs."""
    weights = denoiser_weight_bytes(trace, settings)
    trainable = trace["trainable_params"]
    state = 8 * trainable + optimizer_bytes(settings.optim, trainable, trace["trainable_factored"])
    activations = trace["peak_activation_bytes"] * pairs / trace["pairs"]
    mosaic = mosaic_bytes(preset.config, settings, trace["tokens"], pairs)
    split = {"denoiser weights": weights, "text encoders + VAE": sum(frozen_component_bytes(preset, settings).values()),
             "trainable + grads + optimizer": state, "activations": int(activations), "MOSAIC capture": mosaic,
             "allocator margin": int(FRAGMENTATION * (activations + mosaic))}
    split["total"] = sum(split.values())
    return split


def largest_batch(fixed: int, per_pair: float, card: Card) -> int:
    """Most pairs per device whose estimate fits ``card`` (0: not even one)."""
    room = card.usable - fixed
    return max(0, int(room // per_pair)) if per_pair > 0 else 0


def card_fits(trace: dict, preset: Preset, settings: StepSettings, pairs: int) -> list[dict]:
    """For each card: whether ``pairs`` pairs per device fit, and the largest batch that does."""
    one = memory_split(trace, preset, settings, 1)
    two = memory_split(trace, preset, settings, 2)
    per_pair = two["total"] - one["total"]
    fixed = one["total"] - per_pair
    total = memory_split(trace, preset, settings, pairs)["total"]
    return [{"card": card.name, "examples": card.examples, "usable_gib": round(card.usable / GIB, 1),
             "fits": total <= card.usable, "max_batch": largest_batch(fixed, per_pair, card)} for card in CARDS]

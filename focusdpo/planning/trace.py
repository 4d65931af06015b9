"""One training step of a real-size denoiser, traced on fake tensors: FLOPs and memory without weights or a GPU.

The denoiser is built on the ``meta`` device, the recipe's LoRA is added by peft, and every parameter is swapped
for a fake CPU tensor (``FakeTensorMode``: shapes, dtypes and storage identity, no memory). The step then runs as
the trainer runs it: the policy forward on the batch under bf16 autocast, the reference forward without gradients
and with the adapters off, the weighted DPO loss (``focusdpo.losses``), and backward. Fake CPU tensors dispatch
attention to the fused ``_scaled_dot_product_flash_attention_for_cpu`` kernel, which (like flash attention on a
GPU) keeps ``O(S·d)`` per head for backward; meta tensors would take the math path and save the ``S×S`` matrix.

Measured on the way:

- FLOPs per phase (``torch.utils.flop_counter``'s formulas; the CPU flash kernels get the GPU kernels' formula);
- tensors saved for backward by the policy forward (``saved_tensors_hooks``), de-duplicated by storage, parameters
  excluded: the activations the step holds between forward and backward;
- the peak of live non-parameter storage over the whole step: the saved tensors plus inputs,
  transient buffers, the reference forward and the activation gradients of backward (:class:`StepRecorder`).
"""

from __future__ import annotations

import math
import time
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from focusdpo.models.families import QUANTIZATIONS
from focusdpo.models.quantize import quantized_linears
from focusdpo.planning.inputs import StepInputs, build_inputs
from focusdpo.planning.lora import (
    add_lora,
    check_targets,
    lora_parameter_count,
    lora_parameter_shapes,
    matches,
    resolve_targets,
    targeted_modules,
)
from focusdpo.planning.presets import Preset, build_on_meta, preset_for
from focusdpo.planning.settings import StepSettings

aten = torch.ops.aten


@dataclass
class StepTrace:
    """What one traced step on one device needs. Bytes are exact for the traced shapes; FLOPs count matmuls,
    convolutions and attention (elementwise ops are not counted, as in every MFU convention)."""

    preset: str
    model_class: str
    source: str
    pairs: int
    rows: int
    references: int
    tokens: dict
    checkpointing: bool
    base_params: int
    trainable_params: int
    trainable_factored: int
    lora_layers: int
    lora_targets: list
    weight_dtype: str
    flops: dict
    saved_bytes: int
    peak_activation_bytes: int
    input_bytes: int
    seconds: float
    full_depth: bool = False
    quantized_params: int = 0  # weights of the Linear layers a quantize_base choice converts (counted for every plan)
    quantized_rows: int = 0  # their output rows (one scale each for the int8 types)

    def to_dict(self) -> dict:
        return asdict(self)


def storage_key(tensor: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(tensor.untyped_storage())


class StepRecorder(TorchDispatchMode):
    """A simulated allocator and a FLOP counter over every op of the step.

    Memory: a storage counts from the op that creates it until the last tensor viewing it dies (a weakref callback
    per tensor; autograd's saved tensors keep theirs alive, as on a GPU). ``ignored`` storages (the parameters)
    never count. The peak and the op index it happened at are kept, so storages that turn out not to be
    activations (the LoRA gradients) can be taken out of it afterwards.

    FLOPs: ``torch.utils.flop_counter``'s formulas per op, into ``flops[phase]``. (``FlopCounterMode`` itself is
    not used: its module tracker keeps every checkpointed block's recomputation alive through backward.)
    """

    def __init__(self, ignored=()):
        super().__init__()
        self.ignored = set(ignored)
        self.sizes: dict[StorageWeakRef, int] = {}
        self.views: dict[StorageWeakRef, int] = {}
        self.born: dict[StorageWeakRef, int] = {}
        self.total = self.peak = self.ops = self.peak_op = 0
        self.formulas = flop_formulas()
        self.flops: dict[str, int] = {}
        self.phase = "setup"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.flops[self.phase] = self.flops.get(self.phase, 0) + formula(*args, **kwargs, out_val=out)
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.track(tensor)
        if self.total > self.peak:
            self.peak, self.peak_op = self.total, self.ops
        return out

    @contextmanager
    def counting(self, phase: str):
        """Count the FLOPs of the block as ``phase``."""
        self.phase, previous = phase, self.phase
        try:
            yield
        finally:
            self.phase = previous

    def track(self, tensor: torch.Tensor) -> None:
        """Count ``tensor``'s storage while any tracked tensor on it lives (each tensor object counted once)."""
        if getattr(tensor, "_planning_tracked", False):
            return
        key = storage_key(tensor)
        if key in self.ignored:
            return
        tensor._planning_tracked = True
        if key not in self.sizes:
            self.sizes[key] = tensor.untyped_storage().nbytes()
            self.views[key], self.born[key] = 0, self.ops
            self.total += self.sizes[key]
        self.views[key] += 1
        weakref.finalize(tensor, self.release, key)

    def release(self, key: StorageWeakRef) -> None:
        self.views[key] -= 1
        if self.views[key] == 0:
            self.total -= self.sizes.pop(key)
            del self.views[key], self.born[key]

    def current(self) -> int:
        return self.total

    def peak_without(self, tensors) -> int:
        """The peak less the storages of ``tensors`` (the LoRA gradients: not activations) live at the peak."""
        keys = {storage_key(t) for t in tensors}
        return self.peak - sum(self.sizes[k] for k in keys if k in self.born and self.born[k] <= self.peak_op)


@contextmanager
def saved_for_backward(ignored):
    """Collect ``{storage: bytes}`` of the tensors autograd saves inside the block, parameters excluded."""
    saved: dict[StorageWeakRef, int] = {}

    def pack(tensor):
        key = storage_key(tensor)
        if key not in ignored:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved


def flop_formulas() -> dict:
    """``torch.utils.flop_counter``'s formulas (matmuls, convolutions, GPU attention kernels) plus the CPU
    flash-attention kernels fake CPU tensors dispatch to, counted like the GPU ones."""
    from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    return {**flop_registry, aten._scaled_dot_product_flash_attention_for_cpu: shape_wrapper(forward),
            aten._scaled_dot_product_flash_attention_for_cpu_backward: shape_wrapper(backward)}


def fake_parameters(module: torch.nn.Module, mode, frozen_dtype: torch.dtype) -> None:
    """Swap every parameter and buffer of a ``meta`` module for a fake CPU tensor of the dtype training holds it
    in: frozen weights in ``frozen_dtype``, trainable ones (the LoRA) in float32, as ``cast_training_params``
    leaves them. Shared tensors stay shared."""
    made: dict[int, torch.Tensor] = {}

    def fake(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if id(tensor) not in made:
            with mode:
                made[id(tensor)] = torch.empty_strided(tensor.shape, tensor.stride(), dtype=dtype, device="cpu")
        return made[id(tensor)]

    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                dtype = torch.float32 if param.requires_grad or not param.is_floating_point() else frozen_dtype
                sub._parameters[name] = torch.nn.Parameter(fake(param, dtype), requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                sub._buffers[name] = fake(buffer, buffer.dtype)


class DequantizedCopy(torch.nn.Module):
    """torchao's int8 weight-only linear as the trace runs it (a parametrization of the Linear's weight): the weight
    is stored in int8, and every use makes a copy in the compute dtype, which autograd keeps for backward wherever the
    input needs a gradient, as ``torch.mm(x, int8_weight.to(x.dtype))`` inside torchao does."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to(self.dtype)


def quantize_fake(denoiser: torch.nn.Module, mode, settings: StepSettings) -> None:
    """Store the base Linear weights as ``quantize_base`` does where that changes the step: int8 weight-only keeps a
    dequantized copy per layer for backward (traced); the bitsandbytes types dequantize inside their autograd
    functions and keep only the packed weight (nothing to trace; their bytes are counted in the memory split)."""
    from torch.nn.utils import parametrize

    quantization = QUANTIZATIONS.get(settings.quantize_base)
    if quantization is None or not quantization.saves_dequantized:
        return
    for linear in quantized_linears(denoiser):
        with mode:
            stored = torch.empty_strided(linear.weight.shape, linear.weight.stride(), dtype=torch.int8, device="cpu")
        linear.weight = torch.nn.Parameter(stored, requires_grad=False)
        parametrize.register_parametrization(linear, "weight", DequantizedCopy(weight_dtype(settings)), unsafe=True)


def weight_dtype(settings: StepSettings) -> torch.dtype:
    """Frozen weights are cast to bf16 under ``bf16: true`` for a LoRA run; a full fine-tune stays float32."""
    return torch.bfloat16 if settings.bf16 and settings.lora_rank > 0 else torch.float32


def autocast(settings: StepSettings, device_type: str = "cpu"):
    """The trainer's mixed precision: accelerate's bf16 autocast around each forward (fake tensors are CPU
    tensors: CPU autocast casts the same matmul-class ops to bf16 as CUDA's)."""
    return torch.autocast(device_type, dtype=torch.bfloat16) if settings.bf16 else nullcontext()


@contextmanager
def reference_forward(denoiser: torch.nn.Module, settings: StepSettings):
    """The reference model, as ``focusdpo.reference`` makes it: no gradients, adapters off (a full fine-tune's
    frozen copy has the same shapes, so the policy module itself stands in for it)."""
    with torch.no_grad():
        adapters = settings.lora_rank > 0
        if adapters:
            denoiser.disable_adapters()
        try:
            yield
        finally:
            if adapters:
                denoiser.enable_adapters()


def dpo_loss(pred: torch.Tensor, ref_pred: torch.Tensor | None, inputs: StepInputs) -> torch.Tensor:
    """The weighted Diffusion-DPO loss of ``focusdpo.losses`` (SFT: the weighted error of the winners); β only
    scales values, never shapes."""
    from focusdpo.losses import diffusion_dpo_loss, weighted_error

    policy_err = weighted_error(pred, inputs.target, inputs.weights)
    if ref_pred is None:
        return policy_err.mean()
    ref_err = weighted_error(ref_pred, inputs.target, inputs.weights)
    return diffusion_dpo_loss(policy_err, ref_err, beta=1000.0)[0]


def run_step(denoiser, inputs: StepInputs, settings: StepSettings, phase=lambda name: nullcontext(),
             ignored=frozenset()) -> dict:
    """The trainer's step: policy forward (its saved tensors collected), reference forward, loss, backward.

    ``phase(name)`` wraps each part (the recorder counts FLOPs per phase); real tensors run the same step
    (benchmarks/plan_vs_profiler.py). Returns ``{storage: bytes}`` saved for backward, ``ignored`` excluded.
    """
    device = inputs.target.device.type
    with phase("policy_forward"), saved_for_backward(ignored) as saved, autocast(settings, device):
        pred = inputs.to_grid(denoiser(**inputs.kwargs))
    ref_pred = None
    if settings.objective != "sft":
        with phase("reference_forward"), reference_forward(denoiser, settings), autocast(settings, device):
            ref_pred = inputs.to_grid(denoiser(**inputs.kwargs))
    with phase("backward"):
        dpo_loss(pred, ref_pred, inputs).backward()
    return saved


def lora_denoiser(denoiser, settings: StepSettings, targets, checkpointing: bool):
    """A denoiser built on ``meta``, with the recipe's LoRA and trainable flags as the trainer sets them."""
    add_lora(denoiser, settings.lora_rank, settings.lora_alpha, targets)
    denoiser.train()
    if checkpointing:
        denoiser.enable_gradient_checkpointing()
    return denoiser


def factored_size(shape) -> int:
    """Adafactor's state for one tensor: a row and a column vector for a matrix (over the last two axes), the
    tensor itself otherwise."""
    if len(shape) < 2:
        return math.prod(shape)
    return math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]


def check_gradients(denoiser: torch.nn.Module) -> None:
    missing = [n for n, p in denoiser.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise RuntimeError(f"the traced loss gave no gradient to {len(missing)} trainable tensors (e.g. {missing[0]}):"
                           " the LoRA targets are not on the path from the inputs to the loss; fix "
                           "lora_target_modules")


MEASURED = ("policy_forward", "reference_forward", "backward", "saved_bytes", "peak_activation_bytes", "input_bytes")


def measure(denoiser, preset: Preset, settings: StepSettings, rows: int) -> tuple[dict, StepInputs]:
    """Run one step of ``denoiser`` (already on ``meta`` with its LoRA) on fake tensors: FLOPs per phase, bytes
    saved for backward, peak live activation bytes (LoRA gradients excluded), input bytes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fake_parameters(denoiser, mode, weight_dtype(settings))
    quantize_fake(denoiser, mode, settings)
    params = {storage_key(p) for p in denoiser.parameters()} | {storage_key(b) for b in denoiser.buffers()}
    with mode, StepRecorder(params) as recorder:
        inputs = build_inputs(preset, denoiser.config, settings, rows, weight_dtype(settings))
        input_bytes = recorder.current()
        saved = run_step(denoiser, inputs, settings, recorder.counting, params)
    check_gradients(denoiser)
    grads = [p.grad for p in denoiser.parameters() if p.grad is not None]
    phases = {phase: recorder.flops.get(phase, 0) for phase in MEASURED[:3]}
    return {**phases, "saved_bytes": sum(saved.values()), "peak_activation_bytes": recorder.peak_without(grads),
            "input_bytes": input_bytes}, inputs


# Block-count keys of the in-context transformers: every double block has the same shapes, every single block too.
BLOCK_KEYS = ("num_layers", "num_single_layers")
PROBE_DEPTHS = ((1, 1), (2, 1), (1, 2))


def depth_probes(preset: Preset) -> list[Preset] | None:
    """Shallow copies of a transformer preset with (1, 1), (2, 1) and (1, 2) double/single blocks; ``None`` for a
    model without two uniform block stacks (UNets are traced whole). Every probe keeps a block of each kind: with
    no single block, the last double block's text output would reach no loss and the step would change shape."""
    if not all(k in preset.config for k in BLOCK_KEYS):
        return None
    return [replace(preset, config={**preset.config, "num_layers": d, "num_single_layers": s})
            for d, s in PROBE_DEPTHS]


def extrapolate(probes: list[dict], preset: Preset) -> dict:
    """Every measured quantity is ``a + b·doubles + c·singles``: blocks of a kind have identical shapes, and the
    peak sits where all saved tensors are live plus one block's working set. Solved from the three probes."""
    base, more_double, more_single = probes
    doubles, singles = preset.config["num_layers"], preset.config["num_single_layers"]
    return {k: int(base[k] + (doubles - 1) * (more_double[k] - base[k]) + (singles - 1) * (more_single[k] - base[k]))
            for k in MEASURED}


def probe_targets(targets, denoiser: torch.nn.Module) -> tuple[str, ...]:
    """The full model's LoRA targets that exist in a shallow probe (full names of deeper blocks drop out)."""
    names = [name for name, _ in denoiser.named_modules() if name]
    return tuple(t for t in targets if any(matches(name, t) for name in names))


def measure_probes(preset: Preset, settings: StepSettings, targets, rows: int, checkpointing: bool):
    """Measure each depth probe (its LoRA added by peft and held against the count by hand) and extrapolate."""
    results, inputs = [], None
    for probe in depth_probes(preset):
        denoiser = build_on_meta(probe)
        shallow = probe_targets(targets, denoiser) if settings.lora_rank > 0 else ()
        if settings.lora_rank > 0 and not shallow:
            return None, None  # the LoRA sits in one kind of block only: the probes cannot stand for the model
        expected = lora_parameter_count(denoiser, shallow, settings.lora_rank)
        lora_denoiser(denoiser, settings, shallow, checkpointing)
        check_lora_count(denoiser, expected, settings.lora_rank)
        measured, inputs = measure(denoiser, probe, settings, rows)
        results.append(measured)
    return extrapolate(results, preset), inputs


def check_lora_count(denoiser: torch.nn.Module, expected: int, rank: int) -> None:
    """peft's trainable count must equal ``expected``: ``Σ r·(in + out)`` over the layers the planner matched
    (counted before peft wrapped them)."""
    if rank <= 0:
        return
    added = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    if added != expected:
        raise RuntimeError(f"peft added {added:,} LoRA parameters, Σ r·(in+out) over the targets gives "
                           f"{expected:,}: the planner's target matching disagrees with peft's")


def trainable_shapes(denoiser: torch.nn.Module, targets, rank: int) -> list[tuple[int, ...]]:
    """Shapes the optimizer steps: the LoRA matrices, or every parameter in a full fine-tune (``rank == 0``)."""
    if rank > 0:
        return lora_parameter_shapes(denoiser, targets, rank)
    return [tuple(p.shape) for p in denoiser.parameters()]


def lora_layout(denoiser: torch.nn.Module, settings: StepSettings):
    """The LoRA the trainer would add to the whole ``denoiser``: its targets (checked to name real layers), the
    shapes the optimizer steps, and how many layers it wraps."""
    targets = resolve_targets(settings.family, denoiser, settings.lora_target_modules) if settings.lora_rank > 0 else ()
    check_targets(denoiser, targets)
    layers = len(targeted_modules(denoiser, targets)) if targets else 0
    return targets, trainable_shapes(denoiser, targets, settings.lora_rank), layers


def measure_step(denoiser, preset: Preset, settings: StepSettings, targets, rows: int, checkpointing: bool,
                 full_depth: bool) -> tuple[dict, StepInputs, bool]:
    """Measure on the depth probes when they stand for the model, else on the whole ``denoiser``; says which."""
    if not full_depth and depth_probes(preset) is not None:
        measured, inputs = measure_probes(preset, settings, targets, rows, checkpointing)
        if measured is not None:
            return measured, inputs, False
    expected = lora_parameter_count(denoiser, targets, settings.lora_rank)
    lora_denoiser(denoiser, settings, targets, checkpointing)
    check_lora_count(denoiser, expected, settings.lora_rank)
    measured, inputs = measure(denoiser, preset, settings, rows)
    return measured, inputs, True


def trace_step(settings: StepSettings, preset: Preset | None = None, pairs: int | None = None,
               checkpointing: bool | None = None, full_depth: bool = False) -> StepTrace:
    """Trace one step of ``settings`` with ``pairs`` pairs per device (default: the recipe's batch) and
    activation checkpointing on or off (default: the recipe's); builds nothing on a real device.

    The whole model is always built on ``meta``: its LoRA targets are checked and counted there. The step is traced
    on the whole model for UNets or with ``full_depth``; for FLUX transformers, by default, on three shallow probes
    whose measurements extrapolate exactly in the block counts (tests/planning/test_trace.py holds them against a
    whole-model trace).
    """
    start = time.perf_counter()
    recipe_dir = Path(settings.recipe).parent if settings.recipe else None
    preset = preset or preset_for(settings.family, settings.pretrained_path, recipe_dir)
    pairs = pairs or settings.per_device_train_batch_size
    checkpointing = settings.activation_checkpointing if checkpointing is None else checkpointing
    rows = pairs * settings.samples_per_pair
    denoiser = build_on_meta(preset)
    base = sum(p.numel() for p in denoiser.parameters())
    linears = quantized_linears(denoiser)
    targets, shapes, layers = lora_layout(denoiser, settings)
    measured, inputs, full_depth = measure_step(denoiser, preset, settings, targets, rows, checkpointing, full_depth)
    flops = {phase: measured[phase] for phase in MEASURED[:3]}
    flops["total"] = sum(flops.values())
    return StepTrace(
        preset=preset.name, model_class=preset.model_class, source=preset.source, pairs=pairs, rows=rows,
        references=settings.references, tokens=inputs.tokens, checkpointing=checkpointing, base_params=base,
        trainable_params=sum(math.prod(s) for s in shapes), trainable_factored=sum(factored_size(s) for s in shapes),
        lora_layers=layers, lora_targets=list(targets), weight_dtype=str(weight_dtype(settings)).removeprefix("torch."),
        flops=flops, saved_bytes=measured["saved_bytes"], peak_activation_bytes=measured["peak_activation_bytes"],
        input_bytes=measured["input_bytes"], seconds=time.perf_counter() - start, full_depth=full_depth,
        quantized_params=sum(m.weight.numel() for m in linears), quantized_rows=sum(m.out_features for m in linears))

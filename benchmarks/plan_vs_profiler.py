"""The planner's memory estimate against the CPU allocator, on models small enough to run here.

For each case the same step runs twice: traced on fake tensors by ``focusdpo.planning`` (``trace_step``, whole
depth), and for real on the CPU with random weights under ``torch.profiler.profile(profile_memory=True)``. The
profiler's ``[memory]`` events (every allocation and free of the CPU allocator, in order) give the live bytes over
the step; their maximum is the measured activation peak. Weights are counted the same way on both sides
(``numel × element size`` of the real parameters against the planner's count × dtype).

    python benchmarks/plan_vs_profiler.py            # prints a Markdown table; ~1-3 min on 2 CPU cores

Cases: the tiny SD generator of ``recipes/tiny_cpu.yaml`` (float32, LoRA r4, 2 pairs at 32 px) and a mid-size
FLUX.2 transformer (132 M parameters: 2 double + 4 single blocks of width 1024) in bf16 with an fp32 LoRA r16, one
pair at 256 px with one reference and 128 text tokens; each with activation checkpointing off and on.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from focusdpo.planning.inputs import build_inputs, randomise
from focusdpo.planning.lora import add_lora, resolve_targets
from focusdpo.planning.presets import FLUX2_BASE, Preset, tiny_preset
from focusdpo.planning.settings import StepSettings, read_settings
from focusdpo.planning.trace import run_step, trace_step

MIB = 2 ** 20
REPO = Path(__file__).resolve().parents[1]
MID_FLUX2 = Preset("flux2-mid-132m", "flux2", "Flux2Transformer2DModel", dict(
    FLUX2_BASE, num_layers=2, num_single_layers=4, num_attention_heads=8, joint_attention_dim=3072,
    guidance_embeds=False), text_tokens=128)


def cases() -> list[tuple[str, Preset, StepSettings]]:
    tiny = read_settings(REPO / "recipes" / "tiny_cpu.yaml")
    mid = StepSettings(family="flux2", pretrained_path="benchmark", resolution=256, max_references=1,
                       max_sequence_length=128, lora_rank=16, lora_alpha=16, per_device_train_batch_size=1, bf16=True)
    return [("tiny SD, fp32, 2 pairs, 32 px", tiny_preset("sd"), tiny),
            ("FLUX.2 132 M, bf16, 1 pair, 256 px + 1 ref", MID_FLUX2, mid)]


def real_denoiser(preset: Preset, settings: StepSettings, checkpointing: bool) -> torch.nn.Module:
    """The denoiser with random weights on the CPU, LoRA added, dtypes as the trainer sets them."""
    import diffusers

    torch.manual_seed(0)
    denoiser = getattr(diffusers, preset.model_class).from_config(dict(preset.config))
    add_lora(denoiser, settings.lora_rank, settings.lora_alpha, resolve_targets(settings.family, denoiser))
    for param in denoiser.parameters():
        param.data = param.data.to(torch.float32 if param.requires_grad or not settings.bf16 else torch.bfloat16)
    denoiser.train()
    if checkpointing:
        denoiser.enable_gradient_checkpointing()
    return denoiser


def profiled_peak(preset: Preset, settings: StepSettings, denoiser: torch.nn.Module) -> tuple[int, float]:
    """Peak live bytes the CPU allocator reports over one step (inputs created inside), and the step's seconds."""
    from torch.profiler import ProfilerActivity, profile

    rows = settings.per_device_train_batch_size * settings.samples_per_pair
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        inputs = build_inputs(preset, denoiser.config, settings, rows,
                              torch.bfloat16 if settings.bf16 else torch.float32)
        randomise(inputs)
        run_step(denoiser, inputs, settings)
    seconds = time.perf_counter() - start
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak, seconds


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def compare(name: str, preset: Preset, settings: StepSettings, checkpointing: bool) -> dict:
    trace = trace_step(settings, preset, checkpointing=checkpointing, full_depth=True)
    denoiser = real_denoiser(preset, settings, checkpointing)
    peak, seconds = profiled_peak(preset, settings, denoiser)
    planned_weights = trace.base_params * (2 if settings.bf16 else 4) + 4 * trace.trainable_params
    return {"case": name, "checkpointing": checkpointing, "params": trace.base_params,
            "planned_act": trace.peak_activation_bytes, "measured_act": peak,
            "planned_total": planned_weights + trace.peak_activation_bytes,
            "measured_total": weight_bytes(denoiser) + peak, "step_s": seconds}


def table(rows: list[dict]) -> str:
    head = ("| case | checkpointing | params | planned activations MiB | measured peak MiB | ratio | "
            "planned weights+act MiB | measured weights+peak MiB | ratio | CPU step s |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['case']} | {'on' if r['checkpointing'] else 'off'} | {r['params'] / 1e6:.1f} M | "
                     f"{r['planned_act'] / MIB:.1f} | {r['measured_act'] / MIB:.1f} | "
                     f"{r['planned_act'] / r['measured_act']:.3f} | {r['planned_total'] / MIB:.1f} | "
                     f"{r['measured_total'] / MIB:.1f} | {r['planned_total'] / r['measured_total']:.3f} | "
                     f"{r['step_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = [compare(name, preset, settings, on) for name, preset, settings in cases() for on in (False, True)]
    print(table(rows))
    print(f"\nratio = planned / measured; torch {torch.__version__}, {os.cpu_count()} CPU cores, "
          f"{torch.get_num_threads()} thread(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

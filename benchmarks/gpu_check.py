"""The planner's figures against one GPU: a prepared check of at most ~8 minutes on one H100 or H200.

    python benchmarks/gpu_check.py [--out DIR] [--steps 5] [--budget_s 480]

1. The tiny recipe end to end on CUDA, as a user runs it: ``focusdpo train --config recipes/tiny_cpu.yaml
   --output_dir DIR/tiny_run --max_steps 5`` in a subprocess; its exit status is recorded.
2. Real-size steps with random weights in bf16 (LoRA r16 in fp32, AdamW, one pair per step): FLUX.2 [klein] 4B at
   512 px with 1 and 3 references, SDXL at 1024 px; activation checkpointing off and on. Per setting: step time,
   pairs/s, ``torch.cuda.max_memory_allocated`` over the timed steps (optimizer state included), MFU from the
   traced FLOPs, and beside each the planner's estimate of the same step (denoiser only: no text encoder loaded).

MFU = model FLOPs per step (the trace without checkpointing: recomputation is not useful work) / step time / the
card's dense bf16 peak (H100 and H200 SXM: 989 TFLOPs; ``--peak_tflops`` for another card). Writes
``gpu_check.json`` and ``gpu_check.md`` to ``--out`` (default: ``$OUT``, else ``gpu_check_out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 2 ** 30
DENSE_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}
# (name, preset, resolution, references): the real-size steps, each run with checkpointing off and on.
CHECKS = (("FLUX.2 klein 4B, 512 px, 1 ref", "flux2-klein-4b", 512, 1),
          ("FLUX.2 klein 4B, 512 px, 3 refs", "flux2-klein-4b", 512, 3),
          ("SDXL, 1024 px", "sdxl", 1024, 0))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Planner vs one GPU: tiny recipe end to end, then real-size steps.")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="folder for JSON + Markdown")
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting (after 2 warm-up steps)")
    p.add_argument("--budget_s", type=float, default=480, help="start no new setting after this many seconds")
    p.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 peak of the card (default: by name)")
    p.add_argument("--skip_tiny", action="store_true", help="skip the end-to-end tiny recipe run")
    return p.parse_args(argv)


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_check.py needs a CUDA GPU and torch.cuda.is_available() is False here; "
                         "run it on the GPU machine (the planner itself runs anywhere: focusdpo plan --config ...)")


def peak_tflops(args: argparse.Namespace) -> float:
    import torch

    if args.peak_tflops:
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    return next((v for k, v in DENSE_BF16_TFLOPS.items() if k in name), 989.0)


def focusdpo_command() -> list[str]:
    """The installed ``focusdpo`` console script, else ``python -m focusdpo``."""
    script = shutil.which("focusdpo")
    return [script] if script else [sys.executable, "-m", "focusdpo"]


def run_tiny_recipe(out: Path) -> dict:
    """``focusdpo train`` on the tiny recipe for 5 steps on the GPU; the exit status and the log's end."""
    cmd = focusdpo_command() + ["train", "--config", str(REPO / "recipes" / "tiny_cpu.yaml"),
                                "--output_dir", str(out / "tiny_run"), "--max_steps", "5"]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    print(f"tiny recipe: rc={result.returncode} in {time.perf_counter() - start:.0f} s", flush=True)
    return {"command": " ".join(cmd), "rc": result.returncode, "seconds": round(time.perf_counter() - start, 1),
            "tail": (result.stdout + result.stderr)[-3000:]}


def check_settings(preset_name: str, resolution: int, references: int, checkpointing: bool):
    from focusdpo.planning.presets import get_preset
    from focusdpo.planning.settings import StepSettings

    preset = get_preset(preset_name)
    settings = StepSettings(family=preset.family, pretrained_path=preset.name, resolution=resolution,
                            max_references=references, lora_rank=16, lora_alpha=16, per_device_train_batch_size=1,
                            bf16=True, activation_checkpointing=checkpointing, max_sequence_length=512,
                            drop_text_encoders=True)
    return preset, settings


TRACES: dict = {}


def traced(preset, settings, checkpointing: bool) -> dict:
    """``trace_step`` once per (model, shape, checkpointing): the settings differ in nothing else here."""
    from focusdpo.planning.trace import trace_step

    key = (preset.name, settings.resolution, settings.max_references, checkpointing)
    if key not in TRACES:
        TRACES[key] = trace_step(settings, preset, checkpointing=checkpointing).to_dict()
    return TRACES[key]


def planned(preset, settings) -> dict:
    """The planner's figures for the step as this script runs it (no text encoder on the device)."""
    from focusdpo.planning.memory import memory_split

    executed = traced(preset, settings, settings.activation_checkpointing)
    model = traced(preset, settings, False)
    split = memory_split(executed, preset, settings, settings.per_device_train_batch_size)
    denoiser_only = split["total"] - split["text encoders + VAE"] - split["allocator margin"]
    return {"tflops_executed": executed["flops"]["total"] / 1e12, "tflops_model": model["flops"]["total"] / 1e12,
            "bytes": denoiser_only, "activation_bytes": split["activations"]}


def gpu_denoiser(preset, settings, device: str = "cuda"):
    """The real-size denoiser with random weights on ``device``: built on meta with its LoRA, dtypes set there
    (free), then allocated once on the device and filled."""
    import torch

    from focusdpo.planning.lora import add_lora, resolve_targets
    from focusdpo.planning.presets import build_on_meta

    denoiser = build_on_meta(preset)
    add_lora(denoiser, settings.lora_rank, settings.lora_alpha, resolve_targets(settings.family, denoiser))
    for param in denoiser.parameters():
        param.data = param.data.to(torch.float32 if param.requires_grad else torch.bfloat16)
    denoiser.to_empty(device=device)
    with torch.no_grad():
        for param in denoiser.parameters():
            param.normal_(0.0, 0.02)
    denoiser.train()
    if settings.activation_checkpointing:
        denoiser.enable_gradient_checkpointing()
    return denoiser


def timed_steps(preset, settings, steps: int, device: str = "cuda") -> dict:
    """Two warm-up steps, then ``steps`` timed ones (the planned step + an AdamW update); on CUDA, the peak memory
    over the timed steps (the optimizer state exists by then). ``device="cpu"`` runs the same code in tests."""
    import torch

    from focusdpo.planning.inputs import build_inputs, randomise
    from focusdpo.planning.trace import run_step

    cuda = device == "cuda"
    denoiser = gpu_denoiser(preset, settings, device)
    optimizer = torch.optim.AdamW([p for p in denoiser.parameters() if p.requires_grad], lr=1e-5, fused=cuda)
    rows = settings.per_device_train_batch_size * settings.samples_per_pair

    def step():
        with torch.device(device):
            inputs = build_inputs(preset, denoiser.config, settings, rows, torch.bfloat16)
        randomise(inputs)
        run_step(denoiser, inputs, settings)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2):
        step()
    synchronize()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return {"step_s": (time.perf_counter() - start) / steps,
            "max_allocated": torch.cuda.max_memory_allocated() if cuda else None}


def run_check(name: str, preset_name: str, resolution: int, references: int, checkpointing: bool, args,
              peak: float) -> dict:
    import torch

    preset, settings = check_settings(preset_name, resolution, references, checkpointing)
    row = {"name": name, "checkpointing": checkpointing, **planned(preset, settings)}
    try:
        row.update(timed_steps(preset, settings, args.steps))
        row["pairs_per_s"] = settings.per_device_train_batch_size / row["step_s"]
        row["mfu"] = row["tflops_model"] / row["step_s"] / peak
    except torch.cuda.OutOfMemoryError as error:
        row["error"] = f"out of memory: {str(error).splitlines()[0]}"
    torch.cuda.empty_cache()
    print(format_row(row), flush=True)
    return row


def format_row(row: dict) -> str:
    plan = f"{row['bytes'] / GIB:.1f}"
    if "error" in row:
        measured = f"{row['error']} | – | – | – | {plan} | – |"
    else:
        measured = (f"{row['step_s']:.3f} | {row['pairs_per_s']:.2f} | {row['mfu'] * 100:.1f} % | "
                    f"{row['max_allocated'] / GIB:.1f} | {plan} | {row['bytes'] / row['max_allocated']:.2f} |")
    return (f"| {row['name']} | {'on' if row['checkpointing'] else 'off'} | {row['tflops_model']:.1f} | "
            f"{row['tflops_executed']:.1f} | {measured}")


def format_table(result: dict) -> str:
    """The Markdown report: device, the tiny run's status, one row per real-size setting."""
    tiny = result.get("tiny")
    title = (f"GPU check on {result['device']} (dense bf16 peak {result['peak_tflops']:.0f} TFLOPs), "
             f"torch {result['torch']}; planner figures are estimates, the rest measured.")
    lines = [title, ""]
    if tiny:
        lines += [f"Tiny recipe end to end: `{tiny['command']}` → rc {tiny['rc']} in {tiny['seconds']} s", ""]
    head = ("| setting | checkpointing | model TFLOPs/step | executed TFLOPs/step | step s | pairs/s | MFU | "
            "max allocated GiB | planned GiB | planned/measured |")
    lines += [head, "|" + "---|" * 10]
    lines += [format_row(row) for row in result["rows"]]
    return "\n".join(lines)


def write_outputs(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    (out / "gpu_check.md").write_text(format_table(result) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_cuda()
    import torch

    start, out = time.perf_counter(), Path(args.out)
    result = {"device": torch.cuda.get_device_name(), "peak_tflops": peak_tflops(args), "torch": torch.__version__,
              "tiny": None if args.skip_tiny else run_tiny_recipe(out), "rows": []}
    for name, preset_name, resolution, references in CHECKS:
        for checkpointing in (False, True):
            if time.perf_counter() - start > args.budget_s:
                print(f"budget of {args.budget_s:.0f} s spent: skipping {name}", flush=True)
                continue
            result["rows"].append(run_check(name, preset_name, resolution, references, checkpointing, args,
                                            result["peak_tflops"]))
            write_outputs(out, result)
    write_outputs(out, result)
    print(format_table(result))
    return 0 if (result["tiny"] is None or result["tiny"]["rc"] == 0) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Step time and peak memory of training variants, side by side in one run, on the tiny generator.

    python benchmarks/step_benchmark.py [--steps 20] [--batch 2] [--resolution 32] [--sections variants throughput]

Variants (each in its own process, so peak memory is its own):
  sft          supervised fine-tuning on the winners only (LoRA)
  dpo_copy     vanilla Diffusion-DPO with a separate frozen reference copy (the original recipe)
  dpo_disable  ours, W ≡ 1: the reference is the base with LoRA adapters disabled (no copy)
  focus_cached ours with focus weights from cached static maps (λ_s = λ_d = 1)
  flux2_kN     ours on the tiny FLUX.2 (Klein) transformer with N = 1, 4, 6 references per pair
Each variant runs --repeats times, interleaved; the table shows its fastest median step time.
Ratios are against dpo_copy (SD rows) and flux2_k1 (FLUX rows). Peak memory: CUDA max allocated on
GPU, peak RSS (VmHWM, reset after setup) on CPU.

The ``throughput`` section (benchmarks/throughput.py) runs in this process on the tiny SD step at
--tp_resolution px with --tp_pairs pairs: A/B ratios with the two arms' steps interleaved on the same batches: cached vs live VAE latents, channels_last, torch_compile (--compile; inductor
takes minutes on a CPU), cached vs on-the-fly focus maps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from peak_memory import peak_mib, peak_reset  # benchmarks/peak_memory.py, beside this script

VARIANTS = ("sft", "dpo_copy", "dpo_disable", "focus_cached")
REFERENCE_COUNTS = (1, 4, 6)
FLUX_VARIANTS = tuple(f"flux2_k{k}" for k in REFERENCE_COUNTS)
TINY_FOCUS = dict(lambda_structure=1.0, lambda_detail=1.0, dino_random_weights=True, dino_depth=2, dino_image_size=56)


def make_trainer(variant: str, args, out: str):
    import torch
    from transformers import TrainerCallback

    from focusdpo.config.recipe import parse_config
    from focusdpo.losses import weighted_error
    from focusdpo.models import load_backbone
    from focusdpo.training.trainer import FocusDPOTrainer, build_trainer

    argv = ["--output_dir", out, "--dataset", f"{args.cached_pairs}_plain",
            "--max_steps", str(args.steps + args.warmup), "--save_steps", "100000",
            "--resolution", str(args.resolution), "--per_device_train_batch_size", str(args.batch),
            "--toy_num_pairs", str(4 * args.batch * (args.steps + args.warmup)), "--sample_every_run", "false",
            "--logging_steps", "100000", "--lora_rank", "4", "--lora_alpha", "4"]
    if variant == "focus_cached":
        argv += ["--dataset", args.cached_pairs, *[f"--{k}={v}" for k, v in TINY_FOCUS.items()]]
    if variant.startswith("flux2_k"):
        argv += ["--family", "flux2", "--max_sequence_length", "32", "--dataset", f"{args.cached_pairs}_{variant}"]
    configs = parse_config(argv)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == args.warmup:
                peak_reset()
            self.start = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if state.global_step > args.warmup:
                self.times.append(time.perf_counter() - self.start)

    timer = Timer()
    trainer = build_trainer(*configs, callbacks=[timer])
    if variant == "dpo_copy":
        trainer.frozen_copy = load_backbone("sd").denoiser.requires_grad_(False).to(trainer.args.device)
        trainer.model_config.reference_mode = "frozen_copy"
    if variant == "sft":
        def sft_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            generator = torch.Generator().manual_seed(trainer.batch_seed(inputs["pair_ids"]))
            prepared = trainer.backbone.prepare(inputs, generator)
            pred = model(prepared)
            return weighted_error(pred, prepared.target)[: len(pred) // 2].mean()  # winners only
        trainer.compute_loss = sft_loss
    assert isinstance(trainer, FocusDPOTrainer)
    return trainer, timer


def run_variant(variant: str, args) -> dict:
    import torch
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        trainer, timer = make_trainer(variant, args, out)
        trainer.train()
    times = sorted(timer.times)
    return {"variant": variant, "step_s": times[len(times) // 2], "peak_mib": peak_mib()}


def cache_pairs(args, folder: str) -> float:
    """Write toy pairs with cached focus maps to ``folder``; return the precompute throughput (pairs/s)."""
    from focusdpo.config.focus import FocusConfig
    from focusdpo.data.load import load_pairs
    from focusdpo.focus.mapper import precompute_focus_maps

    pairs = load_pairs("toy", toy_num_pairs=4 * args.batch * (args.steps + args.warmup), resolution=args.resolution)
    start = time.perf_counter()
    cached = precompute_focus_maps(pairs, FocusConfig(**TINY_FOCUS), (args.resolution // 2,) * 2, args.resolution)
    throughput = len(pairs) / (time.perf_counter() - start)
    cached.save_to_disk(folder)
    pairs.save_to_disk(f"{folder}_plain")  # the same pairs from disk without maps: a like-for-like baseline
    return throughput


def pairs_with_references(args, count: int, folder: str) -> None:
    """Toy pairs whose reference list is repeated/cut to exactly ``count`` subjects."""
    from focusdpo.data.load import load_pairs

    pairs = load_pairs("toy", toy_num_pairs=4 * args.batch * (args.steps + args.warmup), resolution=args.resolution)
    pairs.map(lambda refs, masks: {"references": (refs * count)[:count], "reference_masks": (masks * count)[:count]},
              input_columns=["references", "reference_masks"]).save_to_disk(folder)


def focus_overhead(args) -> float:
    """Focus weights' own cost per optimizer step: one trainer on cached maps, the same batches, focus
    switched on and off every other pair of steps (separate processes differ by ±5% on a busy CPU)."""
    import statistics

    import torch

    from focusdpo.config.recipe import parse_config
    from focusdpo.training.trainer import build_trainer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        argv = ["--output_dir", out, "--dataset", args.cached_pairs, "--lora_rank", "4", "--lora_alpha", "4",
                "--resolution", str(args.resolution), *[f"--{k}={v}" for k, v in TINY_FOCUS.items()]]
        trainer = build_trainer(*parse_config(argv))
        trainer.create_optimizer_and_scheduler(num_training_steps=8 * args.steps)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which this loop replaces
        rows = trainer.train_dataset
        batches = [trainer.data_collator([rows[(i * args.batch + j) % len(rows)] for j in range(args.batch)])
                   for i in range(8)]
        times: dict[bool, list[float]] = {True: [], False: []}
        for step in range(8 * args.steps):
            focus = (step // 2) % 2 == 0
            trainer.focus_config.lambda_structure = trainer.focus_config.lambda_detail = float(focus)
            start = time.perf_counter()
            trainer.training_step(trainer.model, batches[step % len(batches)])
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
            times[focus].append(time.perf_counter() - start)
    settled = {focus: values[len(values) // 4:] for focus, values in times.items()}  # drop the warm-up quarter
    return statistics.median(settled[True]) / statistics.median(settled[False]) - 1


def print_table(rows: list[dict], base_name: str) -> None:
    base = next(r for r in rows if r["variant"] == base_name)
    print(f"{'variant':<14}{'step (ms)':>11}{'x ' + base_name:>14}{'peak MiB':>10}{'x ' + base_name:>14}")
    for r in rows:
        print(f"{r['variant']:<14}{1000 * r['step_s']:>11.1f}{r['step_s'] / base['step_s']:>14.2f}"
              f"{r['peak_mib']:>10.0f}{r['peak_mib'] / base['peak_mib']:>14.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="Runs per variant; the fastest median counts.")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--sections", nargs="+", default=["variants", "throughput"],
                        choices=["variants", "throughput"], help="Which tables to run.")
    parser.add_argument("--tp_resolution", type=int, default=64, help="throughput: image size (px).")
    parser.add_argument("--tp_pairs", type=int, default=4, help="throughput: pairs per step.")
    parser.add_argument("--tp_steps", type=int, default=6, help="throughput: timed steps per arm (after warm-up).")
    parser.add_argument("--compile", action="store_true", help="throughput: also time torch_compile on/off.")
    # internal: the parent runs each variant in a child process with these
    parser.add_argument("--variant", choices=VARIANTS + FLUX_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--cached_pairs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    if "variants" in args.sections:
        variants_section(args)
    if "throughput" in args.sections:
        from throughput import throughput_section  # beside this script
        throughput_section(args)


def variants_section(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cached = os.path.join(tmp, "cached")
        throughput = cache_pairs(args, cached)
        for count, variant in zip(REFERENCE_COUNTS, FLUX_VARIANTS):
            pairs_with_references(args, count, f"{cached}_{variant}")
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeats):  # interleaved repeats: a slow moment of the machine hits every variant
            for variant in VARIANTS + FLUX_VARIANTS:
                cmd = [sys.executable, __file__, "--variant", variant, "--cached_pairs", cached,
                       *[f"--{k}={getattr(args, k)}" for k in ("steps", "warmup", "batch", "resolution")]]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
                runs.setdefault(variant, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
        rows = [min(results, key=lambda r: r["step_s"]) for results in runs.values()]
        args.cached_pairs = cached
        overhead = focus_overhead(args)
    print_table(rows[:len(VARIANTS)], "dpo_copy")
    print()
    print_table(rows[len(VARIANTS):], "flux2_k1")
    print(f"focus weights from cached maps, in-process A/B on the same batches (full optimizer step): "
          f"{overhead:+.1%}")
    print(f"focus-map precompute (toy DINOv2, {args.resolution} px): {throughput:.1f} pairs/s")


if __name__ == "__main__":
    main()

"""Step time and peak memory of MOSAIC's auxiliary losses, side by side in one run, on the tiny FLUX.2 (Klein).

    python benchmarks/mosaic_benchmark.py [--steps 20] [--batch 2] [--resolution 64] [--reference_size 32]

Rows: ``objective: sft`` with the MOSAIC losses off / SCA only / SCA + MD (md_rows: all, the heaviest capture),
each with K = 1 and K = 4 references per pair. Correspondences are precomputed into the dataset
(``focusdpo.mosaic.precompute_points``) so the rows time the capture and the losses, not DINOv2. Each row runs in
its own process (peak memory is its own), --repeats times interleaved; the fastest median step time counts.
Ratios are against ``off`` with the same K. Peak memory: CUDA max allocated on GPU, peak RSS (VmHWM, reset after
setup) on CPU. Captured memory grows as samples × rows × L (rows: matched points, or K·l with md_rows: all).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

LOSSES = {"off": [], "sca": ["--lambda_sca", "0.1"],
          "sca_md": ["--lambda_sca", "0.1", "--lambda_md", "0.1", "--md_rows", "all"]}
REFERENCE_COUNTS = (1, 4)
TINY_DINO = dict(dino_random_weights=True, dino_depth=2, dino_image_size=56)


def peak_reset() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_mib() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def run_row(losses: str, count: int, args) -> dict:
    import torch
    from transformers import TrainerCallback

    from focusdpo.config import parse_config
    from focusdpo.train import build_trainer

    torch.set_num_threads(1)

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
    with tempfile.TemporaryDirectory() as out:
        argv = ["--family", "flux2", "--objective", "sft", "--output_dir", out, "--dataset", f"{args.pairs}_k{count}",
                "--max_steps", str(args.steps + args.warmup), "--save_steps", "100000", "--logging_steps", "100000",
                "--resolution", str(args.resolution), "--reference_size", str(args.reference_size),
                "--per_device_train_batch_size", str(args.batch), "--sample_every_run", "false",
                "--lora_rank", "4", "--lora_alpha", "4", "--max_sequence_length", "32", "--attention_blocks", "all",
                *[f"--{k}={v}" for k, v in TINY_DINO.items()], *LOSSES[losses]]
        build_trainer(*parse_config(argv), callbacks=[timer]).train()
    times = sorted(timer.times)
    return {"row": f"{losses}_k{count}", "step_s": times[len(times) // 2], "peak_mib": peak_mib()}


def write_pairs(args, folder: str) -> None:
    """Toy pairs with exactly K references each and their precomputed correspondence points, one folder per K."""
    from focusdpo.config import FocusConfig
    from focusdpo.data import load_pairs
    from focusdpo.mosaic import precompute_points

    pairs = load_pairs("toy", toy_num_pairs=args.batch * (args.steps + args.warmup), resolution=args.resolution)
    target = (args.resolution // 4,) * 2  # tiny VAE ×2, 2×2 packing
    ref = (args.reference_size // 4,) * 2
    for count in REFERENCE_COUNTS:
        fixed = pairs.map(lambda refs, masks: {"references": (refs * count)[:count],
                                               "reference_masks": (masks * count)[:count]},
                          input_columns=["references", "reference_masks"])
        precompute_points(fixed, FocusConfig(**TINY_DINO), target, ref, args.resolution).save_to_disk(
            f"{folder}_k{count}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="Runs per row; the fastest median counts.")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--reference_size", type=int, default=32)
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: the parent runs each row in a child process
    parser.add_argument("--pairs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        losses, count = args.row.rsplit("_k", 1)
        print(json.dumps(run_row(losses, int(count), args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        pairs = os.path.join(tmp, "pairs")
        write_pairs(args, pairs)
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeats):
            for count in REFERENCE_COUNTS:
                for losses in LOSSES:
                    cmd = [sys.executable, __file__, "--row", f"{losses}_k{count}", "--pairs", pairs,
                           *[f"--{k}={getattr(args, k)}" for k in ("steps", "warmup", "batch", "resolution",
                                                                    "reference_size")]]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                         env={**os.environ, "OMP_NUM_THREADS": "1"})
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                    runs.setdefault(row["row"], []).append(row)
    print(f"tiny FLUX.2, objective sft, batch {args.batch}, {args.resolution} px target "
          f"({(args.resolution // 4) ** 2} tokens), references {args.reference_size} px "
          f"({(args.reference_size // 4) ** 2} tokens each), attention_blocks all, {args.steps} steps")
    print(f"{'row':<12}{'step (ms)':>11}{'x off':>8}{'peak MiB':>10}{'x off':>8}")
    for count in REFERENCE_COUNTS:
        best = {n: min(runs[f"{n}_k{count}"], key=lambda r: r["step_s"]) for n in LOSSES}
        for name, r in best.items():
            base = best["off"]
            print(f"{r['row']:<12}{1000 * r['step_s']:>11.1f}{r['step_s'] / base['step_s']:>8.2f}"
                  f"{r['peak_mib']:>10.0f}{r['peak_mib'] / base['peak_mib']:>8.2f}")


if __name__ == "__main__":
    main()

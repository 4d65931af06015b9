"""Step time and peak memory of MOSAIC's auxiliary losses, side by side in one run, on the tiny FLUX.2 (Klein).

    python benchmarks/mosaic_benchmark.py [--steps 30] [--batch 2] [--resolution 64] [--reference_size 32]

Rows: ``objective: sft`` with the MOSAIC losses off / SCA only (md_rows: matched) / SCA + MD (md_rows: all, the
heaviest capture), each with K = 1 and K = 4 references per pair, attention_blocks: all. Correspondences are
precomputed into the dataset (``focusdpo.mosaic.precompute_points``) so the rows time the capture and the losses,
not DINOv2. One process per K: a single trainer switches the losses between optimizer steps (off, SCA, SCA+MD,
off, …) on the same batches, so the machine's load hits every row alike (separate processes on a shared CPU
differ by more than the effect); the median step per row counts. Peak memory is then measured per row over a
few steps: CUDA max allocated on GPU, peak RSS (VmHWM, reset per row) on CPU. Ratios are against ``off`` with the
same K. Captured memory grows as samples × rows × L (rows: matched points, or K·l with md_rows: all).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from peak_memory import peak_mib, peak_reset  # benchmarks/peak_memory.py, beside this script

# row -> (lambda_sca, lambda_md, md_rows)
ROWS = {"off": (0.0, 0.0, "matched"), "sca": (0.1, 0.0, "matched"), "sca_md": (0.1, 0.1, "all")}
REFERENCE_COUNTS = (1, 4)
TINY_DINO = dict(dino_random_weights=True, dino_depth=2, dino_image_size=56)


def run_count(count: int, args) -> list[dict]:
    """All rows for K = ``count`` in one trainer: interleaved step times, then per-row peak memory."""
    import torch

    from focusdpo.config.recipe import parse_config
    from focusdpo.training.trainer import build_trainer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        argv = ["--family", "flux2", "--objective", "sft", "--output_dir", out, "--dataset", f"{args.pairs}_k{count}",
                "--resolution", str(args.resolution), "--reference_size", str(args.reference_size),
                "--per_device_train_batch_size", str(args.batch), "--lora_rank", "4", "--lora_alpha", "4",
                "--max_sequence_length", "32", "--attention_blocks", "all", "--lambda_sca", "0.1",
                "--lambda_md", "0.1", *[f"--{k}={v}" for k, v in TINY_DINO.items()]]
        trainer = build_trainer(*parse_config(argv))
        trainer.create_optimizer_and_scheduler(num_training_steps=10 * args.steps)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which this loop replaces
        data = trainer.train_dataset
        batches = [trainer.data_collator([data[(i * args.batch + j) % len(data)] for j in range(args.batch)])
                   for i in range(len(data) // args.batch)]

        def step(row: str, index: int) -> float:
            cfg = trainer.loss_config
            cfg.lambda_sca, cfg.lambda_md, cfg.md_rows = ROWS[row]
            start = time.perf_counter()
            trainer.training_step(trainer.model, batches[index % len(batches)])
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter() - start

        times: dict[str, list[float]] = {row: [] for row in ROWS}
        for i in range((args.steps + args.warmup) * len(ROWS)):
            row = list(ROWS)[i % len(ROWS)]
            elapsed = step(row, i // len(ROWS))
            if i >= args.warmup * len(ROWS):
                times[row].append(elapsed)
        results = []
        for row in ROWS:
            peak_reset()
            for i in range(3):
                step(row, i)
            results.append({"row": f"{row}_k{count}", "step_s": statistics.median(times[row]), "peak_mib": peak_mib()})
    return results


def write_pairs(args, folder: str) -> None:
    """Toy pairs with exactly K references each and their precomputed correspondence points, one folder per K."""
    from focusdpo.config.focus import FocusConfig
    from focusdpo.data.load import load_pairs
    from focusdpo.mosaic.objective import precompute_points

    pairs = load_pairs("toy", toy_num_pairs=8 * args.batch, resolution=args.resolution)
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
    parser.add_argument("--steps", type=int, default=30, help="Timed steps per row.")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--reference_size", type=int, default=32)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)  # internal: the parent runs each K in a child
    parser.add_argument("--pairs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.count:
        print(json.dumps(run_count(args.count, args)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pairs = os.path.join(tmp, "pairs")
        write_pairs(args, pairs)
        for count in REFERENCE_COUNTS:
            cmd = [sys.executable, __file__, "--count", str(count), "--pairs", pairs,
                   *[f"--{k}={getattr(args, k)}" for k in ("steps", "warmup", "batch", "resolution", "reference_size")]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows += json.loads(out.stdout.strip().splitlines()[-1])
    print(f"tiny FLUX.2, objective sft, batch {args.batch}, {args.resolution} px target "
          f"({(args.resolution // 4) ** 2} tokens), references {args.reference_size} px "
          f"({(args.reference_size // 4) ** 2} tokens each), attention_blocks all, median of {args.steps} steps")
    print(f"{'row':<12}{'step (ms)':>11}{'x off':>8}{'peak MiB':>10}{'x off':>8}")
    for r in rows:
        base = next(b for b in rows if b["row"] == "off_k" + r["row"].rsplit("_k", 1)[1])
        print(f"{r['row']:<12}{1000 * r['step_s']:>11.1f}{r['step_s'] / base['step_s']:>8.2f}"
              f"{r['peak_mib']:>10.0f}{r['peak_mib'] / base['peak_mib']:>8.2f}")


if __name__ == "__main__":
    main()

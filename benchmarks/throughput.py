"""The throughput section of step_benchmark.py: what each throughput option changes, as A/B ratios.

Everything runs in one process on the tiny SD generator, so ratios compare like with like on a busy machine: two
arms take turns step by step (order alternating every round) on the same pre-collated batches; each row prints both
medians and the ratio B/A. Steps are timed in CPU time of this thread (torch runs one thread here): on a shared
machine wall time mostly measures the other processes. On a GPU the same options are measured by
benchmarks/gpu_check.py.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

FOCUS = dict(lambda_structure=1.0, lambda_detail=1.0, dino_random_weights=True, dino_depth=2, dino_image_size=56)


def base_argv(args, out: str, dataset: str) -> list[str]:
    return ["--output_dir", out, "--dataset", dataset, "--resolution", str(args.tp_resolution),
            "--per_device_train_batch_size", str(args.tp_pairs), "--lora_rank", "4", "--lora_alpha", "4",
            "--logging_steps", "100000", "--save_steps", "100000", "--sample_every_run", "false",
            "--lambda_structure", "0", "--lambda_detail", "0", "--report_to", "none"]


def write_datasets(args, tmp: Path) -> dict[str, str]:
    """The same toy pairs three ways: plain, with cached VAE latents, and with latents + focus maps."""
    from focusdpo.commands import main as cli
    from focusdpo.data.load import load_pairs

    folders = {name: str(tmp / name) for name in ("plain", "latents", "focus")}
    pairs = args.tp_pairs * (2 * args.tp_steps + 4)
    load_pairs("toy", toy_num_pairs=pairs, resolution=args.tp_resolution).save_to_disk(folders["plain"])
    size = ["--resolution", str(args.tp_resolution)]
    cli(["embed", "--out", folders["latents"], "--device", "cpu", "--latents",
         "--dataset", folders["plain"], *size])
    cli(["focus", "--out", folders["focus"], "--device", "cpu", "--dataset", folders["latents"], *size,
         *[f"--{k}={v}" for k, v in FOCUS.items()]])
    return folders


def trainer_for(args, dataset: str, *extra: str):
    """A trainer driven step by step (no ``train()``): optimizer built, one micro-batch per step."""
    from focusdpo.config.recipe import parse_config
    from focusdpo.training.trainer import build_trainer

    trainer = build_trainer(*parse_config([*base_argv(args, tempfile.mkdtemp(), dataset), *extra]))
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which this loop replaces
    return trainer


def with_array_format(pairs):
    from focusdpo.data.load import with_array_format as formatted

    return formatted(pairs)


def batches_of(trainer, count: int = 3) -> list[dict]:
    rows, pairs = trainer.train_dataset, trainer.args.per_device_train_batch_size
    return [trainer.data_collator([rows[(i * pairs + j) % len(rows)] for j in range(pairs)]) for i in range(count)]


def stepper(trainer, batches: list[dict]):
    def step(i: int) -> None:
        trainer.training_step(trainer.model, batches[i % len(batches)])
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
    return step


def interleaved(arms: dict, steps: int, warmup: int) -> dict[str, float]:
    """Median CPU seconds per step of each arm, the arms taking turns (order reversed every other round)."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    for i in range(warmup + steps):
        order = list(arms) if i % 2 == 0 else list(reversed(arms))
        for name in order:
            start = time.thread_time()
            arms[name](i)
            if i >= warmup:
                times[name].append(time.thread_time() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def throughput_section(args) -> None:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_datasets(args, Path(tmp))
        rows = []
        trainer = trainer_for(args, data["plain"])
        live, cached = batches_of(trainer), batches_of(trainer_for(args, data["latents"]))
        rows.append(("VAE latents: live vs cached (`embed --latents`)", interleaved(
            {"A": stepper(trainer, live), "B": stepper(trainer, cached)}, args.tp_steps, 1)))
        rows.append(("channels_last: off vs on", interleaved(
            {"A": stepper(trainer_for(args, data["latents"]), cached),
             "B": stepper(trainer_for(args, data["latents"], "--channels_last", "true"), cached)},
            args.tp_steps, 1)))
        if args.compile:
            rows.append(("torch_compile (inductor): off vs on", interleaved(
                {"A": stepper(trainer_for(args, data["latents"]), cached),
                 "B": stepper(trainer_for(args, data["latents"], "--torch_compile", "true"), cached)},
                args.tp_steps, 2)))
        focus = trainer_for(args, data["focus"], *[f"--{k}={v}" for k, v in FOCUS.items()])
        focus.data_collator.pixels = True  # arm A makes its maps on the fly, from the decoded images
        focus.train_dataset = with_array_format(focus.pairs)
        with_maps = batches_of(focus)
        without_maps = [{k: v for k, v in b.items() if k not in ("focus_maps", "focus_key")} for b in with_maps]
        rows.append(("focus maps: on the fly (toy DINOv2) vs cached (`focus`)", interleaved(
            {"A": stepper(focus, without_maps), "B": stepper(focus, with_maps)}, args.tp_steps, 1)))
    print_throughput(args, rows)


def print_throughput(args, rows: list) -> None:
    title = f"A/B, tiny SD step at {args.tp_resolution} px, {args.tp_pairs} pairs, CPU time"
    print(f"\n| {title} | A (ms) | B (ms) | B / A |")
    print("| --- | ---: | ---: | ---: |")
    for name, medians in rows:
        print(f"| {name} | {1000 * medians['A']:.1f} | {1000 * medians['B']:.1f} | {medians['B'] / medians['A']:.2f} |")



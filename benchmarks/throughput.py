"""The throughput section of step_benchmark.py: where a step's time goes, and what each option saves.

Everything runs in one process on the tiny SD generator, so ratios compare like with like on a busy machine:

- profile: ``Trainer.train`` under ``torch.profiler``; the denoiser's forward (policy and reference: one module
  under ``disable_adapters``) and the backward are marked ranges, the rest of the step, with loading its batch
  (median CPU time of the DataLoader's fetch), is the overhead share;
- A/B rows: two arms take turns step by step (order alternating every round) on the same pre-collated batches;
  each row prints both medians and the ratio B/A. Steps are timed in CPU time of this thread (torch runs one
  thread here): on a shared machine wall time mostly measures the other processes.
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
    from focusdpo.cli import main as cli
    from focusdpo.data import load_pairs

    folders = {name: str(tmp / name) for name in ("plain", "latents", "focus")}
    load_pairs("toy", toy_num_pairs=3 * args.tp_pairs, resolution=args.tp_resolution).save_to_disk(folders["plain"])
    size = ["--resolution", str(args.tp_resolution)]
    cli(["embed", "--out", folders["latents"], "--device", "cpu", "--latents",
         "--dataset", folders["plain"], *size])
    cli(["focus", "--out", folders["focus"], "--device", "cpu", "--dataset", folders["latents"], *size,
         *[f"--{k}={v}" for k, v in FOCUS.items()]])
    return folders


def trainer_for(args, dataset: str, *extra: str):
    """A trainer driven step by step (no ``train()``): optimizer built, one micro-batch per step."""
    from focusdpo.recipe import parse_config
    from focusdpo.train import build_trainer

    trainer = build_trainer(*parse_config([*base_argv(args, tempfile.mkdtemp(), dataset), *extra]))
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which this loop replaces
    return trainer


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


def profile_share(args, dataset: str) -> dict[str, float]:
    """Per-step ms of the Trainer's step, of the denoiser's forwards and of the backward: first ``tp_steps`` steps
    under ``torch.profiler`` (wall time; the profiler's per-op cost inflates the many small ops outside the model),
    then ``tp_steps`` steps timed by the same range marks in this thread's CPU time (``cpu_`` keys)."""
    import torch
    from torch.autograd.profiler import record_function
    from transformers import TrainerCallback

    from focusdpo.recipe import parse_config
    from focusdpo.train import build_trainer

    warmup, steps = 2, args.tp_steps
    argv = [*base_argv(args, tempfile.mkdtemp(), dataset), "--max_steps", str(warmup + 2 * steps)]
    trainer = build_trainer(*parse_config(argv))
    open_ranges: list = []
    totals: dict[str, float] = {}
    profiling = [False]

    def enter(name: str) -> None:
        mark = record_function(name) if profiling[0] else None
        if mark is not None:
            mark.__enter__()
        open_ranges.append((name, mark, time.thread_time()))

    def leave() -> None:
        name, mark, start = open_ranges.pop()
        if mark is not None:
            mark.__exit__(None, None, None)
        else:
            totals[f"cpu_{name}"] = totals.get(f"cpu_{name}", 0.0) + (time.thread_time() - start) * 1000 / steps

    fetch, fetch_ms = trainer.get_batch_samples, []

    def timed_fetch(*args, **kwargs):  # the DataLoader's next batch: before on_step_begin, so outside the "step" mark
        start = time.thread_time()
        try:
            return fetch(*args, **kwargs)
        finally:
            if trainer.state.global_step >= warmup:
                fetch_ms.append((time.thread_time() - start) * 1000)
    trainer.get_batch_samples = timed_fetch

    denoiser = trainer.backbone.denoiser
    denoiser.register_forward_pre_hook(lambda *_: enter("denoiser_forward"))
    denoiser.register_forward_hook(lambda *_: leave())
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    class StepRanges(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            backward = trainer.accelerator.backward  # wrapped once the accelerator exists

            def marked_backward(loss, **kwargs):
                enter("backward")
                try:
                    return backward(loss, **kwargs)
                finally:
                    leave()
            trainer.accelerator.backward = marked_backward

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == warmup:
                profiling[0] = True
                profiler.start()
            if state.global_step == warmup + steps:
                profiler.stop()
                profiling[0] = False
            if state.global_step <= warmup:  # not counted: drop what the warm-up steps' marks add
                totals.clear()
            enter("step")

        def on_step_end(self, a, state, control, **kw):
            leave()

    trainer.add_callback(StepRanges())
    trainer.train()
    for event in profiler.events():
        if event.name in ("step", "denoiser_forward", "backward"):
            totals[event.name] = totals.get(event.name, 0.0) + event.time_range.elapsed_us() / 1000 / steps
    # the median fetch: the toy dataset starts a new epoch (a new DataLoader iterator) every 3 steps, a real one rarely
    totals["data"] = totals["cpu_data"] = statistics.median(fetch_ms)
    return totals


def throughput_section(args) -> None:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_datasets(args, Path(tmp))
        totals = profile_share(args, data["latents"])
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
        with_maps = batches_of(focus)
        without_maps = [{k: v for k, v in b.items() if k not in ("focus_maps", "focus_key")} for b in with_maps]
        rows.append(("focus maps: on the fly (toy DINOv2) vs cached (`focus`)", interleaved(
            {"A": stepper(focus, without_maps), "B": stepper(focus, with_maps)}, args.tp_steps, 1)))
    print_throughput(args, totals, rows)


def print_throughput(args, totals: dict[str, float], rows: list) -> None:
    print(f"\nprofile, tiny SD step at {args.tp_resolution} px, {args.tp_pairs} pairs, cached latents, W = 1, "
          f"{args.tp_steps} steps each:")
    for prefix, how in (("", "torch.profiler, wall"), ("cpu_", "range marks, CPU time")):
        step, forward, backward, data = (totals.get(prefix + k, 0.0)
                                         for k in ("step", "denoiser_forward", "backward", "data"))
        step += data  # the batch is loaded in the training process (dataloader_num_workers: 0, the default)
        outside = step - forward - backward
        print(f"  {how:<22} step {step:7.1f} ms = denoiser forward (policy + reference) {forward:6.1f} + backward "
              f"{backward:6.1f} + outside {outside:5.1f} ms (data loading {data:4.1f} of it, CPU time) "
              f"-> outside share {outside / max(step, 1e-9):.1%}")
    if not rows:
        return
    title = f"A/B, tiny SD step at {args.tp_resolution} px, {args.tp_pairs} pairs, CPU time"
    print(f"\n| {title} | A (ms) | B (ms) | B / A |")
    print("| --- | ---: | ---: | ---: |")
    for name, medians in rows:
        print(f"| {name} | {1000 * medians['A']:.1f} | {1000 * medians['B']:.1f} | {medians['B'] / medians['A']:.2f} |")

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
    # one epoch holds every step of the longest run (profile_share): as in a real run, no step in the timed ones
    # starts a new DataLoader iterator (a reshuffle and two batches' fetch, ~3x a plain fetch)
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


def profile_share(args, dataset: str, *extra: str) -> dict[str, float]:
    """Per-step ms of the Trainer's step, of the denoiser's forwards and of the backward: first ``tp_steps`` steps
    under ``torch.profiler`` (wall time; the profiler's per-op cost inflates the many small ops outside the model),
    then ``tp_steps`` steps timed by the same range marks in this thread's CPU time (``cpu_`` keys)."""
    import torch
    from torch.autograd.profiler import record_function
    from transformers import TrainerCallback

    from focusdpo.recipe import parse_config
    from focusdpo.train import build_trainer

    warmup, steps = 2, args.tp_steps
    argv = [*base_argv(args, tempfile.mkdtemp(), dataset), "--max_steps", str(warmup + 2 * steps), *extra]
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

    training_step = trainer.training_step

    def marked_training_step(*args, **kwargs):
        """The backward range ends as the Trainer's training_step returns: dropping its loss frees the autograd
        graph of both denoiser passes (~1 ms here; nothing else runs after the backward in there)."""
        try:
            return training_step(*args, **kwargs)
        finally:
            leave()
    trainer.training_step = marked_training_step

    class StepRanges(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            backward = trainer.accelerator.backward  # wrapped once the accelerator exists

            def marked_backward(loss, **kwargs):
                enter("backward")  # left as training_step returns (marked_training_step)
                return backward(loss, **kwargs)
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
    # the median fetch (one epoch holds the whole run: write_datasets)
    totals["data"] = totals["cpu_data"] = statistics.median(fetch_ms)
    return totals


PIECES = {  # consecutive marks within a step -> what runs between them (outside the denoiser)
    ("fetch", "fetched"): "load the batch (DataLoader, datasets rows, collate)",
    ("step_begin", "training_step"): "Trainer: before training_step",
    ("training_step", "forward"): "model.train(), batch to device, seed, noise and timesteps (prepare)",
    ("forwarded", "forward"): "switch to the reference pass (LoRA off)",
    ("forwarded", "backward"): "loss, metrics and NaN guard (one collective)",
    ("backwarded", "clip"): "Trainer: loss bookkeeping",
    ("clip", "clipped"): "gradient norm and clipping (trainable parameters)",
    ("clipped", "optimizer"): "gradient-norm guard",
    ("optimizer", "optimized"): "AdamW step",
    ("optimized", "step_end"): "LR scheduler, zero_grad, callbacks",
    ("step_end", "fetch"): "Trainer: log/save/evaluate checks",
}


def outside_pieces(args, dataset: str) -> dict[str, float]:
    """Median CPU ms per step of each piece of :data:`PIECES` (``backwarded``: training_step returned, so the
    backward includes freeing the autograd graph), over ``tp_steps`` steps after a warm-up."""
    from transformers import TrainerCallback

    from focusdpo.recipe import parse_config
    from focusdpo.train import build_trainer

    warmup = 2
    argv = [*base_argv(args, tempfile.mkdtemp(), dataset), "--max_steps", str(warmup + args.tp_steps + 1)]
    trainer = build_trainer(*parse_config(argv))
    marks: list[tuple[str, float]] = []
    per_step: dict[str, list[float]] = {label: [] for label in PIECES.values()}

    def mark(name: str) -> None:
        marks.append((name, time.thread_time()))

    def marked(function, before: str, after: str | None = None):
        def wrapper(*a, **kw):
            mark(before)
            try:
                return function(*a, **kw)
            finally:
                if after:
                    mark(after)
        return wrapper

    trainer.get_batch_samples = marked(trainer.get_batch_samples, "fetch", "fetched")
    trainer.training_step = marked(trainer.training_step, "training_step", "backwarded")
    trainer._clip_grad_norm = marked(trainer._clip_grad_norm, "clip", "clipped")  # the guards' override
    trainer.backbone.denoiser.register_forward_pre_hook(lambda *_: mark("forward"))
    trainer.backbone.denoiser.register_forward_hook(lambda *_: mark("forwarded"))

    class Marks(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            trainer.accelerator.backward = marked(trainer.accelerator.backward, "backward")

        def on_step_begin(self, a, state, control, **kw):
            mark("step_begin")

        def on_pre_optimizer_step(self, a, state, control, **kw):
            mark("optimizer")

        def on_optimizer_step(self, a, state, control, **kw):
            mark("optimized")

        def on_step_end(self, a, state, control, **kw):
            mark("step_end")
            if warmup < state.global_step <= warmup + args.tp_steps:  # marks from the last step_end on
                step = {label: 0.0 for label in PIECES.values()}
                for (a_name, a_time), (b_name, b_time) in zip(marks, marks[1:]):
                    if (a_name, b_name) in PIECES:
                        step[PIECES[a_name, b_name]] += (b_time - a_time) * 1000
                for label, ms in step.items():
                    per_step[label].append(ms)
            del marks[:-1]

    trainer.add_callback(Marks())
    trainer.train()
    return {label: statistics.median(values) for label, values in per_step.items()}


def throughput_section(args) -> None:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_datasets(args, Path(tmp))
        profiles = {loading: profile_share(args, data["latents"], "--dataloader_num_workers", str(workers),
                                           "--dataloader_persistent_workers", str(workers > 0).lower())
                    for loading, workers in (("in the trainer", 0), ("in 1 worker", 1))}
        pieces = outside_pieces(args, data["latents"])
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
    print_throughput(args, profiles, rows)
    print_pieces(args, pieces, profiles["in the trainer"]["cpu_step"] + profiles["in the trainer"]["cpu_data"])


def print_throughput(args, profiles: dict[str, dict[str, float]], rows: list) -> None:
    print(f"\nprofile, tiny SD step at {args.tp_resolution} px, {args.tp_pairs} pairs, cached latents, W = 1, "
          f"{args.tp_steps} steps each:")
    for loading, totals in profiles.items():
        for prefix, how in (("", "torch.profiler, wall"), ("cpu_", "range marks, CPU time")):
            step, forward, backward, data = (totals.get(prefix + k, 0.0)
                                             for k in ("step", "denoiser_forward", "backward", "data"))
            step += data  # the training process's share of loading: all of it, or taking a worker's batch
            outside = step - forward - backward
            print(f"  loading {loading:<14} {how:<22} step {step:7.1f} ms = denoiser forward (policy + reference) "
                  f"{forward:6.1f} + backward {backward:6.1f} + outside {outside:5.1f} ms (batch fetch {data:4.1f} "
                  f"of it, CPU time) -> outside share {outside / max(step, 1e-9):.1%}")
    if not rows:
        return
    title = f"A/B, tiny SD step at {args.tp_resolution} px, {args.tp_pairs} pairs, CPU time"
    print(f"\n| {title} | A (ms) | B (ms) | B / A |")
    print("| --- | ---: | ---: | ---: |")
    for name, medians in rows:
        print(f"| {name} | {1000 * medians['A']:.1f} | {1000 * medians['B']:.1f} | {medians['B'] / medians['A']:.2f} |")


def print_pieces(args, pieces: dict[str, float], step_ms: float) -> None:
    title = f"outside the denoiser, tiny SD step at {args.tp_resolution} px, {args.tp_pairs} pairs (median CPU time)"
    print(f"\n| {title} | ms | share of the step |")
    print("| --- | ---: | ---: |")
    for label, ms in pieces.items():
        print(f"| {label} | {ms:.2f} | {ms / step_ms:.2%} |")
    total = sum(pieces.values())
    print(f"| **all of it** | **{total:.2f}** | **{total / step_ms:.2%}** |")

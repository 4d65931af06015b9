"""Cost of the winner-preserving safeguard (``sdpo_mu``): safeguard off vs on, interleaved in one process.

    python benchmarks/sdpo_benchmark.py [--family sd] [--steps 20] [--repeats 5] [--batch 2] [--resolution 32]

One trainer, one batch; each timed step is the training step's work (policy and reference forward, the
loss, backward, zeroing). Off and on alternate step by step so load on the machine hits both alike;
the table shows each variant's median over all its steps and the ratio on/off, and the last line the
safeguard's own work timed alone (robust where machine load makes the A/B ratio noisy).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def build(family: str, batch: int, resolution: int, out: str):
    from focusdpo.config.recipe import parse_config
    from focusdpo.training.trainer import build_trainer

    argv = ["--family", family, "--output_dir", out, "--toy_num_pairs", str(max(batch, 2)),
            "--resolution", str(resolution), "--per_device_train_batch_size", str(batch),
            "--lambda_structure", "0", "--lambda_detail", "0", "--sample_every_run", "false", "--beta", "1000"]
    trainer = build_trainer(*parse_config(argv))
    rows = [trainer.train_dataset[i] for i in range(batch)]
    return trainer, trainer.data_collator(rows)


def timed_steps(trainer, inputs, mu, steps: int) -> list[float]:
    trainer.loss_config.sdpo_mu = mu
    model = trainer.model
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        trainer.guard_step(model, None)  # keep the per-step metric buffers from growing
        model.zero_grad()
        times.append(time.perf_counter() - start)
    return times


def safeguard_only(trainer, inputs, calls: int = 200) -> float:
    """Median time of the safeguard's own work (λ from analytic output gradients) on this batch's shapes."""
    import torch

    from focusdpo.losses import scale_loser_gradient, sdpo_loser_scale

    prepared = trainer.backbone.prepare(inputs, torch.Generator().manual_seed(0))
    pred = torch.randn_like(prepared.target)
    err = torch.rand(pred.shape[0], requires_grad=True)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        scale_loser_gradient(err, sdpo_loser_scale(pred, prepared.target, None, 0.1))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd", choices=("sd", "sdxl", "flux2", "flux_kontext"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        trainer, inputs = build(args.family, args.batch, args.resolution, out)
        timed_steps(trainer, inputs, None, 3)  # warm-up
        timed_steps(trainer, inputs, 0.1, 3)
        results = {"off": [], "on": []}
        for _ in range(args.repeats * args.steps):  # alternate every step: load drift hits both alike
            results["off"] += timed_steps(trainer, inputs, None, 1)
            results["on"] += timed_steps(trainer, inputs, 0.1, 1)
        alone = safeguard_only(trainer, inputs)
    off, on = (statistics.median(results[k]) for k in ("off", "on"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"family {args.family}, batch {args.batch} pairs, {args.resolution} px, {device}, "
          f"{args.repeats}×{args.steps} steps each, interleaved step by step")
    print(f"{'safeguard':<10} {'median step ms':>15} {'ratio':>7}")
    print(f"{'off':<10} {off * 1e3:>15.2f} {1.0:>7.3f}")
    print(f"{'on':<10} {on * 1e3:>15.2f} {on / off:>7.3f}")
    print(f"safeguard's own work: {alone * 1e3:.3f} ms = {alone / off:.2%} of the median step off")


if __name__ == "__main__":
    main()

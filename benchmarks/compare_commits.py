"""This checkout against another commit on the tiny training run, interleaved: import time, start-up, step time.

    python benchmarks/compare_commits.py --base 71759d1 [--rounds 5] [--steps 40]

The other commit is checked out into a temporary git worktree; both run the same command line through the launch
line every version keeps (``python -m focusdpo.train --config recipes/tiny_cpu.yaml``, focus weights off, no
samples), one thread, in alternating order (base, head, head, base, ...), so a busy machine slows both alike.
Rows (medians over rounds; CPU = user + system time of the child process, less sensitive to other load than wall):
  import focusdpo   wall / CPU seconds of ``python -c "import focusdpo"``
  run               wall / CPU seconds of the whole training process
  step (wall)       the Trainer's ``train_runtime`` / steps (its own clock, start-up excluded)
  step (CPU)        (CPU of a run of --steps − CPU of a run of --steps / 4) / the step difference: the CPU time of
                    one training step, start-up cancelled out
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "HF_HUB_DISABLE_TELEMETRY": "1"}


def timed(command: list[str], cwd: Path) -> tuple[float, float]:
    """Wall and CPU seconds of ``command`` run in ``cwd`` (CPU: the child's user + system time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, env={**ENV, "PYTHONPATH": str(cwd)}, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - start, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def training_run(tree: Path, out: Path, steps: int) -> dict[str, float]:
    argv = [sys.executable, "-m", "focusdpo.train", "--config", "recipes/tiny_cpu.yaml", "--output_dir", str(out),
            "--max_steps", str(steps), "--logging_steps", str(steps), "--save_steps", str(10 * steps),
            "--toy_num_pairs", str(2 * steps + 4), "--lambda_structure", "0", "--lambda_detail", "0",
            "--sample_every_run", "false", "--report_to", "none", "--overwrite_output_dir", "true"]
    wall, cpu = timed(argv, tree)
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    runtime = next(entry["train_runtime"] for entry in logs if "train_runtime" in entry)
    return {"run_wall": wall, "run_cpu": cpu, "step": runtime / steps}


def measure(tree: Path, out: Path, steps: int) -> dict[str, float]:
    wall, cpu = timed([sys.executable, "-c", "import focusdpo"], tree)
    short = training_run(tree, out, steps // 4)
    long = training_run(tree, out, steps)
    return {"import_wall": wall, "import_cpu": cpu, **long,
            "step_cpu": (long["run_cpu"] - short["run_cpu"]) / (steps - steps // 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="The commit to compare against (e.g. the previous release).")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=REPO, check=True,
                       capture_output=True)
        try:
            trees = {"base": base, "head": REPO}
            results = {name: [] for name in trees}
            for round_ in range(args.rounds):
                order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
                for name in order:
                    results[name].append(measure(trees[name], Path(tmp) / f"run-{name}", args.steps))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, capture_output=True)
    report(args, results)


def report(args, results: dict[str, list[dict[str, float]]]) -> None:
    median = {name: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for name, rows in results.items()}
    print(f"| tiny run, {args.steps} steps, medians of {args.rounds} interleaved rounds | base {args.base} | head | "
          "head / base |")
    print("| --- | ---: | ---: | ---: |")
    for key, label in (("import_wall", "import focusdpo, wall s"), ("import_cpu", "import focusdpo, CPU s"),
                       ("run_wall", "whole run, wall s"), ("run_cpu", "whole run, CPU s"),
                       ("step", "training step, wall s (Trainer's clock)"),
                       ("step_cpu", "training step, CPU s (start-up cancelled)")):
        b, h = median["base"][key], median["head"][key]
        print(f"| {label} | {b:.3f} | {h:.3f} | {h / b:.2f} |")


if __name__ == "__main__":
    main()

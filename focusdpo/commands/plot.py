"""Draw a run's loss, reward margins, accuracy and per-noise-level margins from metrics.jsonl into a PNG.

``focusdpo plot RUN [--out FILE]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from focusdpo.config.recipe import refusing
from focusdpo.training.plot import plot_run


def plot_main(argv: list[str] | None = None) -> Path:
    parser = refusing(argparse.ArgumentParser(prog="focusdpo plot", description=__doc__.split("\n\n")[0]))
    parser.add_argument("run", help="A training output_dir holding metrics.jsonl.")
    parser.add_argument("--out", help="PNG to write; default: RUN/metrics.png.")
    args = parser.parse_args(argv)
    target = plot_run(args.run, args.out)
    print(f"[focusdpo] curves of {args.run} drawn into {target}")
    return target

"""``focusdpo plan --config RECIPE [--batch N] [--preset NAME] [--json FILE]``: a recipe's real-size step, planned
on this machine without weights or a GPU (``python -m focusdpo.planning.cli`` runs the same)."""

from __future__ import annotations

import argparse
import json
import sys

from focusdpo.config.recipe import refusing
from focusdpo.planning.presets import PRESETS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="focusdpo plan", description="Estimate a recipe's FLOPs and peak memory per "
                                "device from one step traced at real size on fake tensors (no weights, no GPU).")
    p.add_argument("--config", required=True, help="recipe YAML, e.g. recipes/flux2_klein_multiref.yaml")
    p.add_argument("--batch", type=int, default=None, help="pairs per device (default: per_device_train_batch_size)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="plan on this denoiser instead of the recipe's (default: its local config, else its family's)")
    p.add_argument("--json", default=None, help="also write the plan as JSON to this file")
    return refusing(p)


def main(argv: list[str] | None = None) -> int:
    from focusdpo.planning.report import format_plan, plan_recipe

    args = parser().parse_args(argv)
    if args.batch is not None and args.batch < 1:
        parser().error(f"--batch {args.batch}: give at least 1 pair per device")
    plan = plan_recipe(args.config, batch=args.batch, preset=args.preset)
    print(format_plan(plan))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())

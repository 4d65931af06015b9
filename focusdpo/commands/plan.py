"""``focusdpo plan --config RECIPE [--batch N]``: the recipe's memory and FLOPs at its real size, traced on fake
tensors (no weights, no GPU, offline); exit 1 when it fits none of the listed cards."""

import sys

from focusdpo.planning.cli import main


def plan_main(argv: list[str]) -> None:
    code = main(argv)
    if code:
        sys.exit(code)

"""The ``focusdpo`` command line: argparse, printing and exit codes, on top of the library (nothing imports it).

``focusdpo train`` with no arguments runs the embedded default: a tiny random SD-style generator trained on
procedurally generated multi-subject pairs, on CPU, in about a minute.
"""

from __future__ import annotations

import difflib
import sys
from importlib import import_module
from typing import NoReturn

from focusdpo.errors import FocusDPOError

# command -> (module under focusdpo.commands, function, one line of help); modules are imported on use
COMMANDS = {
    "train": ("train", "main", "train with a recipe: focusdpo train [--config recipes/X.yaml] [--field value ...]"),
    "pairs": ("pairs", "pairs_main", "generate pairs with a generator: focusdpo pairs --config recipes/X.yaml "
                                     "(--out DIR alone: the toy set)"),
    "focus": ("caches", "focus_main", "precompute static focus maps into a pair dataset"),
    "embed": ("caches", "embed_main", "cache prompt embeddings (and VAE latents) in a pair dataset: encoders "
                                      "skipped in training"),
    "correspond": ("caches", "correspond_main", "precompute MOSAIC correspondence points (mosaic_points) into a "
                                                "pair dataset"),
    "inspect": ("caches", "inspect_main", "write focus-map PNGs for a few pairs"),
    "doctor": ("doctor", "doctor_main", "check that every file a recipe needs is on disk, and say how to get what "
                                        "is missing: focusdpo doctor --config recipes/X.yaml"),
    "plan": ("plan", "plan_main", "estimate a recipe's memory and FLOPs at its real size, no weights or GPU needed"),
    "evaluate": ("evaluate", "main", "score base vs post-trained LoRA(s) on a benchmark: JSON, Markdown table, PNGs"),
    "export": ("export", "export_main", "write a trained LoRA for A1111/ComfyUI/kohya (SD/SDXL) or ComfyUI (FLUX): "
                                        "focusdpo export RUN"),
    "plot": ("plot", "plot_main", "draw loss, reward margins, accuracy and per-noise-level margins of a run: "
                                  "focusdpo plot RUN"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("--version", "-V"):
        from focusdpo import __version__
        print(f"focusdpo {__version__}")
        return
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print_usage(argv[0] if argv and argv[0] not in ("-h", "--help") else None)
    module, function, _ = COMMANDS[argv[0]]
    report_user_errors(getattr(import_module(f"focusdpo.commands.{module}"), function), argv[1:])


def print_usage(unknown: str | None) -> None:
    """The command list; an unknown command also gets the nearest name and exit status 2."""
    lines = "\n".join(f"  {name:<11} {text}" for name, (_, _, text) in COMMANDS.items())
    print(f"usage: focusdpo COMMAND [options]\n\ncommands:\n{lines}")
    if unknown is None:
        sys.exit(0)
    near = difflib.get_close_matches(unknown, COMMANDS, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else f"; choose one of: {', '.join(COMMANDS)}"
    print(f"focusdpo: error: unknown command {unknown!r}{hint}", file=sys.stderr)
    sys.exit(2)


def report_user_errors(command, argv: list[str]):
    """Run ``command(argv)``; a refused input ends with its message and exit status 2, not a traceback (the message
    already names the field, file, pair or line and the fix). A file the system refuses to open or create (missing,
    a folder where a file is needed, no permission) is the user's to fix too: its error names the path."""
    try:
        return command(argv)
    except (FocusDPOError, OSError) as e:
        if not isinstance(e, (FocusDPOError, FileNotFoundError)) and e.filename is None:
            raise  # an OSError about no file the user named: a fault of the program, with its traceback
        refuse(e)


def refuse(error: Exception) -> NoReturn:
    """Every command's one way to end on a user error: one line, ``focusdpo: error: MESSAGE``, exit status 2
    (a message quoted from a library over several lines, such as a YAML parser's, is joined into one)."""
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    print(f"focusdpo: error: {message}", file=sys.stderr)
    sys.exit(2)

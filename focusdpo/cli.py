"""The ``focusdpo`` command: ``train``, ``pairs``, ``focus``, ``embed``, ``inspect``, ``correspond``.

``focusdpo train`` with no arguments runs the embedded default: a tiny random SD-style generator
trained on procedurally generated multi-subject pairs, on CPU, in about a minute.
"""

from __future__ import annotations

import argparse
import difflib
import sys

COMMANDS = {
    "train": "train with a recipe: focusdpo train [--config recipes/X.yaml] [--field value ...]",
    "pairs": "generate pairs with a generator: focusdpo pairs --config recipes/X.yaml (--out DIR: the toy set)",
    "focus": "precompute static focus maps into a pair dataset",
    "embed": "cache prompt embeddings (and VAE latents) in a pair dataset: encoders skipped in training",
    "inspect": "write focus-map PNGs for a few pairs",
    "export": "write a trained LoRA for A1111/ComfyUI/kohya (SD/SDXL) or ComfyUI (FLUX): focusdpo export RUN",
    "plot": "draw loss, reward margins, accuracy and per-noise-level margins of a run: focusdpo plot RUN",
    "correspond": "precompute MOSAIC correspondence points (mosaic_points) into a pair dataset",
    "evaluate": "score base vs post-trained LoRA(s) on a benchmark: JSON, Markdown table, PNGs",
}


def pairs_command(argv: list[str]) -> None:
    if "--config" in argv:  # sample -> score -> select (or disrupt) with a generator: focusdpo.pairs
        from .pairs import pairs_main
        pairs_main(argv)
        return
    from .safe_write import save_dataset
    from .toy_pairs import make_toy_pairs

    parser = argparse.ArgumentParser(prog="focusdpo pairs", description=COMMANDS["pairs"])
    parser.add_argument("--out", required=True, help="Folder to write the dataset to (save_to_disk).")
    parser.add_argument("--num_pairs", type=int, default=32, help="How many pairs.")
    parser.add_argument("--resolution", type=int, default=64, help="Image size in pixels.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed.")
    args = parser.parse_args(argv)
    save_dataset(make_toy_pairs(args.num_pairs, args.resolution, args.seed), args.out)
    print(f"[focusdpo] {args.num_pairs} pairs written to {args.out}")


def focus_command(argv: list[str]) -> None:
    from .mapper import precompute_main
    precompute_main(argv)


def embed_command(argv: list[str]) -> None:
    from .encoder_cache import embed_main
    embed_main(argv)


def inspect_command(argv: list[str]) -> None:
    from .mapper import inspect_main
    inspect_main(argv)


def export_command(argv: list[str]) -> None:
    from .export import export_main
    export_main(argv)


def plot_command(argv: list[str]) -> None:
    from .plot import plot_main
    plot_main(argv)


def correspond_command(argv: list[str]) -> None:
    from .mosaic import precompute_main
    precompute_main(argv)


def evaluate_command(argv: list[str]) -> None:
    from .evaluate import main
    main(argv)


def train_command(argv: list[str]) -> None:
    from .train import main
    main(argv)


HANDLERS = {"train": train_command, "pairs": pairs_command, "focus": focus_command, "embed": embed_command,
            "inspect": inspect_command, "export": export_command, "plot": plot_command,
            "correspond": correspond_command, "evaluate": evaluate_command}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("--version", "-V"):
        from . import __version__
        print(f"focusdpo {__version__}")
        return
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in HANDLERS:
        lines = "\n".join(f"  {name:<11} {text}" for name, text in COMMANDS.items())
        print(f"usage: focusdpo COMMAND [options]\n\ncommands:\n{lines}")
        if argv and argv[0] not in ("-h", "--help"):
            near = difflib.get_close_matches(argv[0], HANDLERS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; choose one of: {', '.join(HANDLERS)}"
            print(f"focusdpo: unknown command {argv[0]!r}{hint}", file=sys.stderr)
        sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    report_user_errors(HANDLERS[argv[0]], argv[1:])


def report_user_errors(command, argv: list[str]):
    """Run ``command(argv)``; a refused input ends with its message and exit status 2, not a traceback
    (the message already names the field, file, pair or line and the fix)."""
    from .config import ConfigError
    from .data import PairDataError
    from .run_checks import RunFolderError
    from .safe_write import OutputError

    try:
        return command(argv)
    except (ConfigError, PairDataError, RunFolderError, OutputError, FileNotFoundError) as e:
        print(f"focusdpo: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

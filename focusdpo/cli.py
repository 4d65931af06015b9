"""The ``focusdpo`` command: ``train``, ``pairs``, ``focus``, ``inspect``.

``focusdpo train`` with no arguments runs the embedded default: a tiny random SD-style generator
trained on procedurally generated multi-subject pairs, on CPU, in about a minute.
"""

from __future__ import annotations

import argparse
import sys

COMMANDS = {
    "train": "train with a recipe: focusdpo train [--config recipes/X.yaml] [--field value ...]",
    "pairs": "generate pairs with a generator: focusdpo pairs --config recipes/X.yaml (--out DIR: the toy set)",
    "focus": "precompute static focus maps into a pair dataset",
    "embed": "cache prompt embeddings (and VAE latents) in a pair dataset: encoders skipped in training",
    "inspect": "write focus-map PNGs for a few pairs",
    "evaluate": "score base vs post-trained LoRA(s) on a benchmark: JSON, Markdown table, PNGs",
}


def pairs_command(argv: list[str]) -> None:
    if "--config" in argv:  # sample -> score -> select (or disrupt) with a generator: focusdpo.pairs
        from .pairs import pairs_main
        pairs_main(argv)
        return
    from .toy_pairs import make_toy_pairs

    parser = argparse.ArgumentParser(prog="focusdpo pairs", description=COMMANDS["pairs"])
    parser.add_argument("--out", required=True, help="Folder to write the dataset to (save_to_disk).")
    parser.add_argument("--num_pairs", type=int, default=32, help="How many pairs.")
    parser.add_argument("--resolution", type=int, default=64, help="Image size in pixels.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed.")
    args = parser.parse_args(argv)
    make_toy_pairs(args.num_pairs, args.resolution, args.seed).save_to_disk(args.out)
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


def evaluate_command(argv: list[str]) -> None:
    from .evaluate import main
    main(argv)


def train_command(argv: list[str]) -> None:
    from .train import main
    main(argv)


HANDLERS = {"train": train_command, "pairs": pairs_command, "focus": focus_command, "embed": embed_command,
            "inspect": inspect_command, "evaluate": evaluate_command}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in HANDLERS:
        lines = "\n".join(f"  {name:<8} {text}" for name, text in COMMANDS.items())
        print(f"usage: focusdpo COMMAND [options]\n\ncommands:\n{lines}")
        sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    HANDLERS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()

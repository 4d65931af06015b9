"""``focusdpo pairs``: preference pairs, from a generator recipe (``--config``) or the toy set (``--out`` only)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import yaml

from focusdpo.atomic import output_lock
from focusdpo.config.checks import check_int
from focusdpo.config.pairs import PAIR_CONFIG_CLASSES, build_pair_configs, read_pair_recipe
from focusdpo.config.recipe import refusing
from focusdpo.data.load import save_dataset
from focusdpo.data.toy import make_toy_pairs
from focusdpo.errors import ConfigError, PairGenError
from focusdpo.pairs.generate import generate_pairs


def parse_pair_args(argv: list[str]) -> dict:
    """``--config recipe.yaml`` plus ``--field value`` overrides (values parsed as YAML) into one mapping."""
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        raise ConfigError("focusdpo pairs --config needs a recipe file: focusdpo pairs --config recipes/X.yaml")
    rest = list(argv)
    path = rest.pop(rest.index("--config") + 1)
    rest.remove("--config")
    values = read_pair_recipe(path)
    if len(rest) % 2:
        raise ConfigError(f"overrides come as --field value pairs; got {rest}")
    for key, value in zip(rest[::2], rest[1::2]):
        if not key.startswith("--"):
            raise ConfigError(f"override {key!r} must look like --field value")
        values[key[2:]] = override_value(key, value)
    return values


def override_value(key: str, text: str):
    """A command-line value read as YAML (numbers, lists, null), as the recipe's values are."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key} {text!r} is not a YAML value ({e}); quote it or fix it") from None


def pairs_help() -> str:
    lines = ["usage: focusdpo pairs --config recipe.yaml [--field value ...]",
             "       focusdpo pairs --out DIR [--num_pairs N] [--resolution PX] [--seed S]   (the toy pair set)", ""]
    for cls in PAIR_CONFIG_CLASSES:
        lines.append(f"{cls.__name__}:")
        lines += [f"  --{f.name:<24} {f.metadata.get('help', '')}" for f in fields(cls) if f.init]
    return "\n".join(lines)


def pairs_main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(pairs_help())
        return
    if "--config" not in argv:
        return toy_pairs_main(argv)
    values = parse_pair_args(argv)
    names = {f.name for cls in PAIR_CONFIG_CLASSES for f in fields(cls)}
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ConfigError(f"unknown pair-config field(s) {unknown}; see `focusdpo pairs --help`")
    pair_cfg, model_cfg, focus_cfg = build_pair_configs(values)
    summary = generate_pairs(pair_cfg, model_cfg, focus_cfg)
    if summary is None:  # not the main process: it reports
        return
    counts = ", ".join(f"{k} {v}" for k, v in summary["counts"].items() if v)
    report = Path(pair_cfg.out) / "summary.json"
    if summary["dataset"] is None:
        raise PairGenError(f"no pair was kept ({counts}): every entry's reason is in {report}; loosen "
                           "margin_threshold / min_fidelity_drop, or check the prompts and references")
    print(f"[focusdpo] pairs: {counts}; dataset: {summary['dataset']}; summary: {report}")


def toy_pairs_main(argv: list[str]) -> None:
    """``focusdpo pairs --out DIR``: the procedurally drawn toy set of the embedded default (no model)."""
    parser = refusing(argparse.ArgumentParser(prog="focusdpo pairs", description="Write the toy pair set."))
    parser.add_argument("--out", required=True, help="Folder to write the dataset to (save_to_disk).")
    parser.add_argument("--num_pairs", type=int, default=32, help="How many pairs.")
    parser.add_argument("--resolution", type=int, default=64, help="Image size in pixels.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed.")
    args = parser.parse_args(argv)
    check_int("num_pairs", args.num_pairs, 1)  # no pair written is no dataset
    check_int("resolution", args.resolution, 8)
    with output_lock(args.out):
        save_dataset(make_toy_pairs(args.num_pairs, args.resolution, args.seed), args.out)
    print(f"[focusdpo] {args.num_pairs} pairs written to {args.out}")

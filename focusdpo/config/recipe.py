"""Reading recipes: ``--config recipe.yaml`` plus command-line overrides into the five config dataclasses.

Unknown keys (YAML or CLI) are refused with a suggestion, names from TRL and the diffusers scripts with our
field and the conversion, before anything is parsed or loaded; :func:`config_fields` writes a run's settings
back as a recipe that this module reads again.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import fields

import yaml
from transformers import TrainingArguments

from focusdpo.config.aliases import cli_keys, foreign_name_message
from focusdpo.config.training import CONFIG_CLASSES
from focusdpo.errors import ConfigError

RECIPE_EPILOG = ("Every other argument selects the pairs, model and focus settings as for training: "
                 "--config recipes/X.yaml and any field override (see `focusdpo train --help`).")


def config_fields(*configs) -> dict:
    """Every field of the given config objects, flat, as YAML/JSON-safe values that parse back as ``--config``.

    TrainingArguments go through its own ``to_dict`` (``accelerator_config`` becomes a mapping, not a repr);
    ``*_token`` fields are left empty so that no secret is written to disk.
    """
    merged = {}
    for cfg in configs:
        if isinstance(cfg, TrainingArguments):
            values = TrainingArguments.to_dict(cfg)  # without the sections FocusDPOConfig.to_dict adds
        else:
            values = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.init}
        for name, value in values.items():
            merged[name] = None if name.endswith("_token") else json.loads(json.dumps(value, default=str))
    return merged


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (safe_load keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice: keep one",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def check_config_keys(path: str, classes=CONFIG_CLASSES) -> dict:
    """Read a YAML recipe and reject unknown keys (fields of ``classes``) with a suggestion, before any loading."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, UniqueKeyLoader) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path!r} is not UTF-8 text ({e.reason} at byte {e.start}): save it as "
                          "UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a YAML mapping of field: value")
    if message := foreign_name_message(data, path):
        raise ConfigError(message)
    known = known_keys(classes) | {"env"}
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown config key {key!r} in {path}{did_you_mean(key, known)}")
    return data


def known_keys(classes=CONFIG_CLASSES) -> set[str]:
    return {f.name for cls in classes for f in fields(cls)}


def did_you_mean(key: str, known) -> str:
    near = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean {near[0]!r}?" if near else "; see `focusdpo train --help` for the fields"


def check_cli_keys(argv: list[str]) -> None:
    """Every ``--key`` on the command line is a config field (or ``--no_<bool field>``, ``--config``)."""
    names = known_keys()
    bools = {f.name for cls in CONFIG_CLASSES for f in fields(cls) if f.type in ("bool", bool)}
    known = names | {f"no_{name}" for name in bools} | {"config", "help"}
    for token in argv:
        if token.startswith("--"):
            key = token[2:].split("=", 1)[0].replace("-", "_")
            if key not in known:
                raise ConfigError(f"unknown option --{key} on the command line{did_you_mean(key, names)}")


def split_config_option(argv: list[str]) -> list[str]:
    """``--config=FILE`` → ``--config FILE``; a ``--config`` without a file is refused."""
    out = []
    for token in argv:
        out.extend(["--config", token.split("=", 1)[1]] if token.startswith("--config=") else [token])
    if "--config" in out:
        at = out.index("--config")
        if at + 1 == len(out) or out[at + 1].startswith("--") or not out[at + 1]:
            raise ConfigError("--config needs a recipe file: --config recipes/X.yaml")
    return out


def refusing(parser):
    """``parser`` (an argparse parser) raising :class:`ConfigError` for a bad command line, instead of printing its
    usage and its own ``PROG: error:`` line: every command then reports every user error the same way (one line,
    one prefix, exit status 2: :func:`focusdpo.commands.report_user_errors`)."""

    def refuse(message: str):
        raise ConfigError(f"{message} (see `{parser.prog} --help`)")

    parser.error = refuse
    return parser


def parse_config(argv: list[str] | None = None, prog: str = "focusdpo train"):
    """Parse ``--config recipe.yaml`` plus CLI overrides into the five config dataclasses."""
    import argparse

    from trl import TrlParser

    argv = split_config_option(list(argv or []))
    if message := foreign_name_message(cli_keys(argv), "on the command line"):
        raise ConfigError(message)
    check_cli_keys(argv)
    if "--config" in argv:
        check_config_keys(argv[argv.index("--config") + 1])
    parser = refusing(TrlParser(CONFIG_CLASSES, prog=prog))
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="RECIPE.yaml",
                        help="YAML recipe of field: value (flat); command-line fields override it.")
    return parser.parse_args_and_config(argv)

"""Checks every config dataclass runs when it is built: choices, numbers, types, the launcher's precision.

Each error is a :class:`ConfigError` naming the field, the bad value and the valid values or the fix.
"""

from __future__ import annotations

import inspect
import math
import os

from focusdpo.errors import ConfigError


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(choices)}")


SCALAR_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def type_error(name: str, value, annotation: str):
    what = "a list" if isinstance(value, list) else "null" if value is None else f"a {type(value).__name__}"
    hint = f" (write [{value}])" if isinstance(value, str) and str(annotation).startswith("list[") else ""
    return ConfigError(f"{name}={value!r} is {what}, but {name} takes {annotation}{hint}")


def is_instance(value, type_name: str) -> bool:
    """``value`` fits the scalar annotation ``type_name`` (a bool is not a number; an int is a float)."""
    if isinstance(value, bool) and type_name != "bool":
        return False
    return isinstance(value, SCALAR_TYPES[type_name])


def check_types(cfg) -> None:
    """Each field the class itself declares fits its annotation (``int``, ``float | None``, ``list[str]``...):
    YAML lists, nulls or strings where another type belongs are refused here, not deep inside a model.
    The annotations are read as written (HfArgumentParser rewrites ``field.type`` in place, dropping None)."""
    for name, annotation in inspect.get_annotations(type(cfg)).items():
        parts = [p.strip() for p in str(annotation).split("|")]
        value = getattr(cfg, name)
        if value is None and "None" in parts:
            continue
        base = parts[0]
        if base.startswith("list[") and base[5:-1] in SCALAR_TYPES:
            ok = isinstance(value, list) and all(is_instance(v, base[5:-1]) for v in value)
        elif base in SCALAR_TYPES:
            ok = is_instance(value, base)
        else:
            continue
        if not ok:
            raise type_error(name, value, annotation)


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}")


def check_positive(name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={value!r} must be a finite number {bound}")


def check_launcher_precision(bf16: bool, fp16: bool) -> None:
    """Stop when ``accelerate launch --mixed_precision`` asks for another half precision than the recipe.

    TrainingArguments silently lets the recipe win. "no" is not checked: accelerate also writes it when
    ``--mixed_precision`` was never given, so it cannot tell "full precision, please" from "unset".
    """
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    recipe = "bf16" if bf16 else "fp16" if fp16 else "no"
    if launcher != "no" and launcher != recipe:
        raise ConfigError(f"accelerate launch --mixed_precision is {launcher!r} but the recipe says {recipe!r} "
                          f"(bf16={bf16}, fp16={fp16}): make them agree (set bf16/fp16 in the recipe, or launch with "
                          f"--mixed_precision {recipe})")

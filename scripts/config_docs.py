"""Generate docs/configuration.md, the field reference, from the config dataclasses' field metadata.

    python scripts/config_docs.py            # write docs/configuration.md
    python scripts/config_docs.py --check    # exit 1, naming the command to run, when the file is stale

One table per class (name, type, default, help) for every setting of ``focusdpo train``, ``focusdpo evaluate`` and
``focusdpo pairs``. The help texts are the ``metadata={"help": ...}`` of each field, so a field's documentation is
edited where the field is declared, and ``tests/test_config_docs.py`` fails until the page is regenerated.
Of ``FocusDPOConfig`` (a transformers ``TrainingArguments``) only the fields that focusdpo declares itself are
tabled; the inherited ones are linked. The output depends on nothing but the dataclasses: same code, same bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
COMMAND = "python scripts/config_docs.py"
TRAINING_ARGUMENTS_DOCS = "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments"

INTRO = (
    "Every setting of every command is a field of a dataclass in `focusdpo/config/`. A recipe is a flat YAML mapping "
    "of `field: value` (`--config recipe.yaml`); any field can also be given on the command line as `--field value`, "
    "which wins over the recipe. Keys go to the class that declares them. Unknown keys and invalid values are refused "
    "before any model loads, naming the field, the value and the valid choices (an unknown key gets a \"did you "
    "mean\"); option names from TRL and the diffusers training scripts (`pretrained_model_name_or_path`, `beta_dpo`, "
    "`max_train_steps`, ...) stop with our field and the conversion ([ecosystem](ecosystem.md)). `focusdpo train "
    "--help` lists the fields by section. A run's `config.yaml` holds every resolved field and is itself a valid "
    "`--config`."
)

# TrainingArguments fields that focusdpo gives a meaning of its own (checked, redirected or extended); the rest act as
# in any transformers Trainer.
TRAINING_ARGUMENTS_NOTES = [
    ("gradient_accumulation_steps", "pairs per optimizer step = `per_device_train_batch_size` × this × processes."),
    ("bf16, fp16", ("with a LoRA the frozen base is cast to that dtype and the LoRA kept in fp32; "
                    "`accelerate launch --mixed_precision` disagreeing with them stops the run "
                    "([ecosystem](ecosystem.md)).")),
    ("seed", ("seeds the global RNG before the DPO LoRA is created; noise, timesteps and VAE draws come from a "
              "generator seeded by (seed, step, pair ids) ([stability](stability.md)).")),
    ("activation_checkpointing", "alias `gradient_checkpointing`; through diffusers' own switch on the denoiser."),
    ("torch_compile", ("with `torch_compile_backend` / `torch_compile_mode`: compiles the denoiser in place, so "
                       "policy and reference run one compiled module ([throughput](throughput.md)).")),
    ("resume_from_checkpoint", ("a `checkpoint-N` folder, or `latest` (the newest intact one); settings that shape "
                                "the weights or the optimizer must match ([reliability](reliability.md)).")),
    ("save_steps, save_total_limit", "atomic `checkpoint-N/` folders."),
    ("report_to", ("`tensorboard`, `wandb`, ...: `pip install \"focusdpo[tensorboard]\"` or `\"focusdpo[wandb]\"`; "
                   "the logged run config holds every field of all five sections ([ecosystem](ecosystem.md)).")),
    ("max_grad_norm", ("clips the trainable parameters' gradients only; the NaN guard reads the same norm "
                       "([stability](stability.md)).")),
]


def config_classes():
    """(title, command line, classes) per command; each class is tabled once, where it first appears."""
    from focusdpo.config.evaluation import EvalConfig
    from focusdpo.config.focus import FocusConfig
    from focusdpo.config.pairs import PAIR_CONFIG_CLASSES
    from focusdpo.config.training import CONFIG_CLASSES, FocusDPOConfig, ModelConfig

    train = [c for c in CONFIG_CLASSES if c is not FocusDPOConfig] + [FocusDPOConfig]
    evaluate = [EvalConfig, ModelConfig, FocusConfig]  # what focusdpo.commands.evaluate parses
    return [
        ("Training: `focusdpo train`", "focusdpo train --config recipes/X.yaml [--field value ...]", train),
        ("Evaluation: `focusdpo evaluate`", "focusdpo evaluate --config recipes/eval_X.yaml [--field value ...]",
         evaluate),
        ("Pair generation: `focusdpo pairs`", "focusdpo pairs --config recipes/pairs_X.yaml [--field value ...]",
         list(PAIR_CONFIG_CLASSES)),
    ]


def own_fields(cls) -> list[dataclasses.Field]:
    """The fields a class declares itself: for a TrainingArguments subclass, not the inherited ones."""
    from transformers import TrainingArguments

    fields = dataclasses.fields(cls)
    if issubclass(cls, TrainingArguments):
        declared = inspect.get_annotations(cls)
        fields = [f for f in fields if f.name in declared]
    return list(fields)


def yaml_value(value) -> str:
    """A default as it is written in a YAML recipe."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    return repr(value)


def default_of(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    return f"`{yaml_value(value)}`"


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    text = " ".join(str(text).split())
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def type_of(field: dataclasses.Field, cls) -> str:
    """The field's type as written in its class (transformers' argument parser rewrites ``field.type`` in place
    once a config has been parsed in the process, e.g. ``str | None`` into ``str``)."""
    declared = next((vars(c).get("__annotations__", {}) for c in cls.__mro__
                     if field.name in vars(c).get("__annotations__", {})), {})
    kind = declared.get(field.name, field.type)
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    return f"`{cell(kind)}`"


def class_table(cls) -> list[str]:
    from transformers import TrainingArguments

    path = cls.__module__.replace(".", "/") + ".py"
    doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split()).replace("``", "`")
    lines = [f"### {cls.__name__}", "", f"`{cls.__module__}.{cls.__name__}` (`{path}`): {cell(doc)}", ""]
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)} if issubclass(cls, TrainingArguments) else set()
    if inherited:
        lines += ["Fields focusdpo declares (★: a TrainingArguments field whose default focusdpo changes):", ""]
    lines += ["| name | type | default | help |", "| --- | --- | --- | --- |"]
    for field in own_fields(cls):
        star = " ★" if field.name in inherited else ""
        lines.append(f"| `{field.name}`{star} | {type_of(field, cls)} | {default_of(field)} | "
                     f"{cell(field.metadata.get('help', ''))} |")
    return lines + [""]


def training_arguments_note() -> list[str]:
    intro = ("Every other field of transformers' `TrainingArguments` is accepted too, as a recipe key or a "
             "`--field value` option, with its transformers default: see the [TrainingArguments reference]"
             f"({TRAINING_ARGUMENTS_DOCS}). Those focusdpo gives a meaning of its own:")
    lines = ["#### Inherited TrainingArguments fields", "", intro, ""]
    lines += [f"- {', '.join(f'`{n.strip()}`' for n in names.split(','))}: {text}"
              for names, text in TRAINING_ARGUMENTS_NOTES]
    return lines + [""]


def render() -> str:
    from focusdpo.config.training import FocusDPOConfig

    generated = (f"<!-- Generated by `{COMMAND}` from the config dataclasses' field help: edit the help where the "
                 "field is declared (focusdpo/config/), then re-run the command. tests/test_config_docs.py fails "
                 "while this file is stale. -->")
    lines = ["# Configuration fields", "", generated, "", INTRO, "",
             "Defaults are written as in YAML: `null` is an empty value (leave the key out).", ""]
    seen = set()
    for title, command, classes in config_classes():
        lines += [f"## {title}", "", "```bash", command, "```", ""]
        shared = [c for c in classes if c in seen]
        if shared:
            links = ", ".join(f"[`{c.__name__}`](#{c.__name__.lower()})" for c in shared)
            lines += [f"Also reads {links} (tabled above: same fields, same defaults).", ""]
        for cls in classes:
            if cls in seen:
                continue
            seen.add(cls)
            lines += class_table(cls)
            if cls is FocusDPOConfig:
                lines += training_arguments_note()
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the file differs from what would be written")
    parser.add_argument("--path", type=Path, default=DOC, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.path.is_file() or args.path.read_text(encoding="utf-8") != text:
            what = "is missing" if not args.path.is_file() else "is stale (a config field or its help changed)"
            print(f"{args.path} {what}: run `{COMMAND}` and commit the result", file=sys.stderr)
            return 1
        print(f"{args.path} is up to date")
        return 0
    args.path.parent.mkdir(parents=True, exist_ok=True)
    args.path.write_text(text, encoding="utf-8")
    print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing
    sys.exit(main())

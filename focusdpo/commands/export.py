"""Write a trained LoRA for A1111/ComfyUI/kohya (SD/SDXL) or ComfyUI (FLUX).

``focusdpo export RUN [--family F] [--out FILE]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from focusdpo.config.recipe import refusing
from focusdpo.errors import ConfigError
from focusdpo.export import EXPORT_NAMES, export_lora, family_of_run
from focusdpo.models.families import FAMILIES


def export_main(argv: list[str] | None = None) -> Path:
    parser = refusing(argparse.ArgumentParser(prog="focusdpo export", description=__doc__.split("\n\n")[0]))
    parser.add_argument("lora", help="Run folder (holding pytorch_lora_weights.safetensors) or a LoRA file.")
    parser.add_argument("--family", choices=list(FAMILIES),
                        help="Backbone family; default: `family` from the run's config.yaml.")
    parser.add_argument("--out", help=f"Output file; default: {EXPORT_NAMES['kohya']} (SD/SDXL) or "
                                      f"{EXPORT_NAMES['comfyui']} (FLUX) beside the LoRA.")
    args = parser.parse_args(argv)
    recorded = family_of_run(Path(args.lora))
    if args.family and recorded and args.family != recorded:
        raise ConfigError(f"--family {args.family} but the run's config.yaml says family {recorded!r}: drop --family "
                          "(the run's family is used) or export another run")
    family = args.family or recorded
    if family is None:
        parser.error(f"no config.yaml beside {args.lora} names the family: pass --family")
    target = export_lora(args.lora, family, args.out)
    print(f"[focusdpo] {family} LoRA exported to {target}")
    return target

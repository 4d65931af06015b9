"""``focusdpo evaluate --config eval.yaml``: score base vs post-trained LoRA(s) on a benchmark: JSON, Markdown, PNGs."""

from __future__ import annotations

import sys
from pathlib import Path

from focusdpo.commands import refuse
from focusdpo.config.evaluation import EvalConfig
from focusdpo.config.focus import FocusConfig
from focusdpo.config.recipe import check_config_keys, refusing
from focusdpo.config.training import ModelConfig
from focusdpo.errors import FocusDPOError
from focusdpo.evaluation.run import run


def parse_eval_config(argv: list[str]):
    """``--config eval.yaml`` plus CLI overrides into (EvalConfig, ModelConfig, FocusConfig)."""
    from trl import TrlParser


    classes = (EvalConfig, ModelConfig, FocusConfig)
    if "--config" in argv:
        check_config_keys(argv[argv.index("--config") + 1], classes)
    return refusing(TrlParser(classes, prog="focusdpo evaluate")).parse_args_and_config(argv)


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg, model_cfg, focus_cfg = parse_eval_config(argv)[:3]
        out = run(cfg, model_cfg, focus_cfg)
    except (FocusDPOError, FileNotFoundError) as e:  # a refused input, a locked or full output folder
        refuse(e)  # the one error line of every command
    print(f"[focusdpo] evaluation report (report.md, report.json, PNGs) in {out}")
    return out

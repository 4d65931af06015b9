"""Every setting of every command as typed dataclasses with help text, validated when built; recipes (YAML) and
command lines parsed into them. Imports nothing else of focusdpo but its errors, and no torch."""

from focusdpo.config.evaluation import EvalConfig
from focusdpo.config.focus import FocusConfig
from focusdpo.config.pairs import PairGenConfig
from focusdpo.config.training import CONFIG_CLASSES, DataConfig, FocusDPOConfig, LossConfig, ModelConfig

__all__ = ["CONFIG_CLASSES", "DataConfig", "EvalConfig", "FocusConfig", "FocusDPOConfig", "LossConfig", "ModelConfig",
           "PairGenConfig"]

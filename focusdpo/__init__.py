"""focusdpo: post-train personalized image generators with focus-weighted Diffusion-DPO."""

__version__ = "0.1.0"

from .config import DataConfig, FocusConfig, FocusDPOConfig, LossConfig, ModelConfig  # noqa: E402
from .focus_api import compute_focus_weights, iter_static_maps  # noqa: E402
from .losses import diffusion_dpo_loss, weighted_error  # noqa: E402
from .train import FocusDPOTrainer  # noqa: E402

__all__ = ["FocusDPOConfig", "ModelConfig", "DataConfig", "LossConfig", "FocusConfig", "FocusDPOTrainer",
           "diffusion_dpo_loss", "weighted_error", "compute_focus_weights", "iter_static_maps"]

"""focusdpo: post-train personalized image generators with focus-weighted Diffusion-DPO.

The public names below are imported on first use (PEP 562), so ``import focusdpo`` loads neither the Trainer
stack nor timm.
"""

from importlib import import_module

__version__ = "0.1.0"

PUBLIC = {
    "FocusDPOConfig": "focusdpo.config", "ModelConfig": "focusdpo.config", "DataConfig": "focusdpo.config",
    "LossConfig": "focusdpo.config", "FocusConfig": "focusdpo.config",
    "FocusDPOTrainer": "focusdpo.training.trainer",
    "diffusion_dpo_loss": "focusdpo.losses", "weighted_error": "focusdpo.losses",
    "compute_focus_weights": "focusdpo.focus.api", "iter_static_maps": "focusdpo.focus.api",
    "compute_subject_masks": "focusdpo.focus.api", "subject_errors": "focusdpo.losses",
    "subject_labels": "focusdpo.losses", "subject_dpo_loss": "focusdpo.losses",
}
__all__ = list(PUBLIC)


def __getattr__(name: str):
    if name not in PUBLIC:
        raise AttributeError(f"module 'focusdpo' has no attribute {name!r}")
    return getattr(import_module(PUBLIC[name]), name)

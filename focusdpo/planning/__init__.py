"""Real sizes before the first GPU: a recipe's training step built and traced at real size on fake tensors.

``plan_recipe(path)`` returns FLOPs per step, peak memory per device split by holder, and the cards it fits;
``format_plan(plan)`` prints it; ``focusdpo plan --config RECIPE`` (``cli.main``) does both. Presets of the real
denoisers live in :mod:`.presets`, the traced step in :mod:`.trace`. Importing this package loads neither diffusers
nor peft: they are imported when a plan is made.
"""

from focusdpo.planning.presets import FAMILY_PRESETS, PRESETS, Preset, get_preset, preset_for


def plan_recipe(path, batch=None, preset=None) -> dict:
    """See :func:`focusdpo.planning.report.plan_recipe`."""
    from focusdpo.planning.report import plan_recipe as plan

    return plan(path, batch=batch, preset=preset)


def format_plan(plan: dict) -> str:
    """See :func:`focusdpo.planning.report.format_plan`."""
    from focusdpo.planning.report import format_plan as fmt

    return fmt(plan)


__all__ = ["FAMILY_PRESETS", "PRESETS", "Preset", "format_plan", "get_preset", "plan_recipe", "preset_for"]

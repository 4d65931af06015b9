"""`focusdpo evaluate` reads its recipes."""

from focusdpo.commands.evaluate import parse_eval_config

from conftest import REPO


def test_eval_recipe_parses():
    recipe = str(REPO / "recipes" / "eval_tiny_cpu.yaml")
    cfg, model_cfg, focus_cfg = parse_eval_config(["--config", recipe, "--benchmark", "b.json"])[:3]
    assert cfg.metrics == ["subject", "backbone_i"] and focus_cfg.feature_backbone == "mobilenet_v2"
    assert model_cfg.family == "sd"

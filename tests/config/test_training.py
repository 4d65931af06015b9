"""The training config dataclasses refuse meaningless values and combinations when they are built."""

import warnings

import pytest

from focusdpo.config.recipe import parse_config
from focusdpo.config.training import FocusDPOConfig, LossConfig, ModelConfig
from focusdpo.errors import ConfigError

from conftest import REPO


def test_small_beta_warns_and_diffusion_scale_does_not():
    with pytest.warns(UserWarning, match="TRL-scale"):
        LossConfig(beta=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LossConfig(beta=5000.0)


def test_launcher_mixed_precision_must_match_the_recipe(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="'fp16'.*'no'"):
        FocusDPOConfig(output_dir="unused")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match="'bf16'.*'fp16'"):
        FocusDPOConfig(output_dir="unused", fp16=True, use_cpu=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type="hinge", label_smoothing=0.1), "no meaning for loss_type='hinge'"),
    (dict(loss_type="ipo", label_smoothing=0.1), "no meaning for loss_type='ipo'"),
    (dict(sdpo_mu=1.0), r"sdpo_mu=1.0 must be in \[0, 1\)"),
])
def test_loss_config_refuses_meaningless_combinations(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LossConfig(**kwargs)


def test_flow_shift_needs_static_mode():
    with pytest.raises(ConfigError, match="flow_shift=3.0 with flow_shift_mode='pipeline'"):
        ModelConfig(family="flux2", flow_shift=3.0)
    with pytest.raises(ConfigError, match="flow_shift=None with flow_shift_mode='static'"):
        ModelConfig(family="flux2", flow_shift_mode="static")
    assert ModelConfig(family="flux2", flow_shift_mode="static", flow_shift=3.0).adapter_options(1)["flow_shift"] == 3


@pytest.mark.parametrize("family", ["flux2", "flux_kontext"])
def test_channels_last_is_refused_for_transformers(family):
    with pytest.raises(ConfigError, match="channels_last=True is for UNet families"):
        ModelConfig(family=family, channels_last=True)


@pytest.mark.parametrize("field, value, match", [
    ("validation_steps", -1, "validation_steps=-1 must be an integer >= 0"),
    ("num_validation_images", 0, "num_validation_images=0 must be an integer >= 1"),
    ("validation_prompts", ["ok", " "], "validation_prompts=.* must be a list of non-empty strings"),
    ("validation_prompts", "a cat", "validation_prompts"),
])
def test_bad_validation_settings_are_refused(field, value, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        FocusDPOConfig(output_dir=str(tmp_path), report_to="none", **{field: value})


@pytest.mark.parametrize("field, value, message", [
    ("objective", "ppo", "objective='ppo' is not valid"), ("md_divergence", "kl", "md_divergence='kl'"),
    ("md_rows", "some", "md_rows='some'"), ("attention_blocks", "first", "attention_blocks='first'"),
    ("lambda_sca", -1.0, "lambda_sca=-1.0"),
])
def test_bad_mosaic_settings_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        LossConfig(**{field: value})


@pytest.mark.parametrize("argv, message", [
    (["--preference_unit", "patch"], "preference_unit='patch' is not valid; choose one of: image, subject"),
    (["--preference_unit", "subject", "--sdpo_mu", "0.1"], "without the SDPO safeguard"),
    (["--preference_unit", "subject", "--subject_margin", "-1"], "subject_margin=-1.0 must be a finite number >= 0"),
])
def test_bad_subject_settings_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), *argv])


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta_target_gradient_factor=0.5), r"beta_target_gradient_factor=0.5 must be in \(0, 0.5\), e.g. 0.3"),
    (dict(beta_target_gradient_factor=0.0), r"beta_target_gradient_factor=0.0 must be in \(0, 0.5\)"),
    (dict(beta_target_gradient_factor=-0.2), r"beta_target_gradient_factor=-0.2 must be in \(0, 0.5\)"),
    (dict(beta_target_gradient_factor=0.3, beta_adapt_rate=0.0), "beta_adapt_rate=0.0 must be a finite number > 0"),
    (dict(beta_target_gradient_factor=0.3, beta_min=6000.0), "beta=5000.0 must lie within beta_min=6000.0 and "
                                                             "beta_max=500000.0"),
    (dict(beta_target_gradient_factor=0.3, beta_max=-1.0), "beta_max=-1.0 must be a finite number > 0"),
    (dict(beta_target_gradient_factor=0.3, loss_type="hinge"), r"loss_type one of: sigmoid, robust \(now 'hinge'\)"),
    (dict(beta_target_gradient_factor=0.3, objective="sft"), r"needs objective: dpo \(now 'sft'\)"),
])
def test_automatic_beta_settings_are_refused_naming_valid_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LossConfig(**kwargs)


def test_automatic_beta_clamp_defaults_to_a_hundredfold_either_way():
    assert LossConfig(beta=1000.0, beta_target_gradient_factor=0.3).beta_range == (10.0, 100000.0)
    assert LossConfig(beta=1000.0, beta_target_gradient_factor=0.3, beta_min=250, beta_max=4000).beta_range == \
        (250.0, 4000.0)
    with pytest.raises(ConfigError, match=r"beta_target_gradient_factor=0.7 must be in \(0, 0.5\)"):  # from a recipe
        parse_config(["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "--beta_target_gradient_factor", "0.7"])

"""Recipes and command lines: parse_config reads --config files and overrides, and names every bad key, type and
value before any data or model loads."""

import pytest

from focusdpo.config.recipe import parse_config
from focusdpo.errors import ConfigError

from conftest import TINY_RECIPE, write


def test_unknown_key_suggests_the_close_field(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'betta'.*did you mean 'beta'"):
        parse_config(["--config", write(tmp_path, "betta: 10\n")])


@pytest.mark.parametrize("field, value, message", [
    ("beta", "0", "beta=0.0 must be a finite number > 0"),
    ("beta", "-5", "must be a finite number > 0"),
    ("loss_type", "kto", "loss_type='kto' is not valid; choose one of: sigmoid, hinge, ipo, robust"),
    ("family", "sd3", "family='sd3' is not valid; choose one of: sd, sdxl, flux2, flux_kontext"),
    ("reference_mode", "ema", "reference_mode='ema' is not valid"),
    ("nan_policy", "ignore", "nan_policy='ignore' is not valid; choose one of: stop, skip"),
    ("personalization_lora_loader", "kohya", "personalization_lora_loader='kohya' is not valid; choose one of: "
                                             "strict, pipeline"),
])
def test_bad_values_are_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(["--config", TINY_RECIPE, f"--{field}", value])


def test_non_numeric_beta_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--beta: invalid float value: 'lots'"):  # not argparse's usage and exit
        parse_config(["--config", write(tmp_path, "beta: lots\n")])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(["--config", "no/such/recipe.yaml"])


@pytest.mark.parametrize("yaml_text, message", [
    ("learning_rate: 0\n", "learning_rate=0 .*allow_zero_learning_rate"),
    ("learning_rate: .nan\n", "learning_rate=nan must be a finite number > 0"),
    ("learning_rate: [0.1, 0.2]\n", r"learning_rate=\[0.1, 0.2\] is a list, but learning_rate takes float"),
    ("per_device_train_batch_size: 0\n", "per_device_train_batch_size=0 must be an integer >= 1"),
    ("gradient_accumulation_steps: 0\n", "gradient_accumulation_steps=0 must be an integer >= 1"),
    ("max_steps: 0\n", "max_steps=0 must be an integer >= 1"),
    ("max_steps: null\n", "max_steps=None is null, but max_steps takes int"),
    ("lora_alpha: -4\n", "lora_alpha=-4 must be a finite number > 0"),
    ("lora_alpha: .nan\n", "lora_alpha=nan must be a finite number > 0"),
    ("lora_rank: 2.5\n", "lora_rank=2.5 is a float, but lora_rank takes int"),
    ("max_references: -1\n", "max_references=-1 must be an integer >= 0"),
    ("top_n: 0\n", "top_n=0 must be an integer >= 1"),
    ("dino_image_size: 0\n", "dino_image_size=0 must be an integer >= 14"),
    ("dino_image_size: 50\n", "dino_image_size=50 must be a multiple of 14"),
    ("family: [sd]\n", r"family=\['sd'\] is a list, but family takes str"),
    ("lora_target_modules: to_q\n", r"lora_target_modules='to_q' is a str, but lora_target_modules takes list\[str\] "
                                    r"\(write \[to_q\]\)"),
    ("on_bad_pair: ignore\n", "on_bad_pair='ignore' is not valid; choose one of: error, skip"),
    ("learning_rat: 0.1\n", "unknown config key 'learning_rat' .*did you mean 'learning_rate'"),
])
def test_bad_config_values_are_named(tmp_path, yaml_text, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(["--config", write(tmp_path, yaml_text)])


@pytest.mark.parametrize("argv, message", [
    (["--learning_rat", "0.1"], "unknown option --learning_rat .*did you mean 'learning_rate'"),
    (["--config"], "--config needs a recipe file"),
    (["--config", "--max_steps", "3"], "--config needs a recipe file"),
    (["--max_steps", "0"], "max_steps=0"),
])
def test_bad_command_lines_are_named(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv)


def test_config_equals_file_is_read():
    assert parse_config([f"--config={TINY_RECIPE}"])[0].learning_rate == pytest.approx(1e-3)

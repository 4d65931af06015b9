"""Configuration errors are caught before any model loads and say how to fix them."""

import pytest

from focusdpo.errors import ConfigError

from focusdpo.config.recipe import parse_config
from focusdpo.commands.train import main

from conftest import REPO

RECIPE = str(REPO / "recipes" / "tiny_cpu.yaml")


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


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
        parse_config(["--config", RECIPE, f"--{field}", value])


def test_non_numeric_beta_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--config", write(tmp_path, "beta: lots\n")])
    assert "--beta: invalid float value: 'lots'" in capsys.readouterr().err


def test_frozen_adapter_needs_an_existing_lora(tmp_path):
    with pytest.raises(ConfigError, match="needs personalization_lora"):
        parse_config(["--config", RECIPE, "--reference_mode", "frozen_adapter"])
    argv = ["--config", RECIPE, "--output_dir", str(tmp_path), "--reference_mode", "frozen_adapter",
            "--personalization_lora", str(tmp_path / "missing")]
    with pytest.raises(FileNotFoundError, match="personalization_lora=.*missing.* does not exist"):
        main(argv)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(["--config", "no/such/recipe.yaml"])

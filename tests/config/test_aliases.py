"""Names users bring from TRL and the diffusers scripts are refused naming our field."""

import pytest

from focusdpo.config.recipe import parse_config
from focusdpo.errors import ConfigError


@pytest.mark.parametrize("name, ours", [("model_name_or_path", "pretrained_path"), ("dataset_name", "dataset"),
                                        ("lora_r", "lora_rank"), ("pretrained_model_name_or_path", "pretrained_path"),
                                        ("train_batch_size", "per_device_train_batch_size"),
                                        ("max_train_steps", "max_steps"), ("checkpointing_steps", "save_steps"),
                                        ("rank", "lora_rank"), ("beta_dpo", "beta")])
def test_foreign_option_names_name_our_field_in_yaml_and_on_the_cli(name, ours, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"{name}: 4\n")
    with pytest.raises(ConfigError, match=f"focusdpo calls it '{ours}'") as in_yaml:
        parse_config(["--config", str(recipe)])
    with pytest.raises(ConfigError, match=f"focusdpo calls it '{ours}'"):
        parse_config([f"--{name}", "4"])
    assert str(recipe) in str(in_yaml.value)
    if name == "beta_dpo":
        assert "2500 = our beta 5000" in str(in_yaml.value)

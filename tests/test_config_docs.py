"""docs/configuration.md is generated from the config dataclasses' field help: it must be what the generator writes."""

import dataclasses
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generator():
    spec = importlib.util.spec_from_file_location("config_docs", ROOT / "scripts" / "config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_page_is_up_to_date(capsys):
    assert generator().main(["--check"]) == 0, capsys.readouterr().err


def test_a_stale_page_fails_the_check_naming_the_command(tmp_path, capsys):
    page = tmp_path / "configuration.md"
    page.write_text("# Configuration fields\n")
    assert generator().main(["--check", "--path", str(page)]) == 1
    assert "python scripts/config_docs.py" in capsys.readouterr().err


def test_every_field_of_every_command_is_tabled_once():
    from focusdpo.config import EvalConfig, FocusDPOConfig
    from focusdpo.config.pairs import PAIR_CONFIG_CLASSES
    from focusdpo.config.training import CONFIG_CLASSES

    docs = generator()
    text = docs.render()
    for cls in {*CONFIG_CLASSES, EvalConfig, *PAIR_CONFIG_CLASSES}:
        assert text.count(f"### {cls.__name__}\n") == 1, cls
        section = text.split(f"### {cls.__name__}\n")[1].split("\n### ")[0]
        for field in docs.own_fields(cls):
            assert f"| `{field.name}`" in section, (cls.__name__, field.name)
    declared = {f.name for f in docs.own_fields(FocusDPOConfig)}
    inherited_only = {f.name for f in dataclasses.fields(FocusDPOConfig)} - declared
    assert "gradient_accumulation_steps" in inherited_only and "| `adam_beta1`" not in text

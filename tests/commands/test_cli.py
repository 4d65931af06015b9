"""The command line: usage, version, grouped help, and refused inputs as one line with exit status 2."""

import pytest

from focusdpo.commands import main as cli

from conftest import QUICK, REPO, TINY_RECIPE, cut, jsonl_folder, lora_file, png, tiny_argv


def test_usage_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["frobnicate"])
    assert exit_.value.code == 2
    out = capsys.readouterr().out
    assert all(name in out for name in ("train", "pairs", "focus", "embed", "inspect"))


def test_unknown_subcommand_says_so(capsys):
    with pytest.raises(SystemExit):
        cli(["trian"])
    assert "unknown command 'trian'; did you mean 'train'?" in capsys.readouterr().err


def test_a_refused_input_ends_in_its_message_not_a_traceback(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["train", "--config", TINY_RECIPE, "--top_n", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "focusdpo: error: top_n=0 must be an integer >= 1\n"


def test_version_and_grouped_train_help(capsys):
    from focusdpo import __version__

    cli(["--version"])
    assert capsys.readouterr().out.strip() == f"focusdpo {__version__}"
    with pytest.raises(SystemExit):
        cli(["train", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: focusdpo train")
    assert "--config RECIPE.yaml" in text
    sections = [text.index(f"\n{name} (") for name in ("training", "model", "data", "loss", "focus")]
    assert sections == sorted(sections)
    assert text.index("\n  --beta BETA") > sections[3] and text.index("\n  --lora_rank LORA_RANK") > sections[1]


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", TINY_RECIPE, "--max_steps", "x"], "invalid int value: 'x' (see `focusdpo train --help`)"),
    (["evaluate", "--config", str(REPO / "recipes" / "eval_tiny_cpu.yaml"), "--benchmark", "gone.json"], "gone.json"),
    (["plot"], "the following arguments are required: run (see `focusdpo plot --help`)"),
    (["trian"], "unknown command 'trian'"),
    (["plan", "--config", TINY_RECIPE, "--batch", "0"], "--batch 0: give at least 1 pair per device"),
])
def test_every_command_refuses_in_one_line_under_one_prefix(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("focusdpo: error: ") and message in err


def refused_line(capsys, argv) -> str:
    """``focusdpo ARGV`` must end with exit status 2 and one line under the common prefix, no traceback."""
    with pytest.raises(SystemExit) as exit_:
        cli(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    return err.split("focusdpo: error: ", 1)[1]


def test_bad_files_given_to_train_end_in_one_line_before_the_model_loads(tmp_path, no_model, capsys):
    from focusdpo.data.toy import make_toy_pairs

    make_toy_pairs(4, 16).save_to_disk(str(tmp_path / "cached"))
    cut(next((tmp_path / "cached").glob("*.arrow")))
    capsys.readouterr()  # the save's progress bar
    assert "data-00000-of-00001.arrow is cut short" in refused_line(
        capsys, ["train", *tiny_argv(tmp_path / "a", *QUICK, "--dataset", str(tmp_path / "cached"))])
    good = {"prompt": "a dog", "chosen": "w.png", "rejected": "l.png"}
    (tmp_path / "pairs").mkdir()
    pairs = jsonl_folder(tmp_path / "pairs", [{**good, "id": "p1"}])
    assert "line 1: unknown key 'id'; did you mean 'pair_id'?" in refused_line(
        capsys, ["train", *tiny_argv(tmp_path / "b", *QUICK, "--dataset", pairs)])
    jsonl_folder(tmp_path / "pairs", [{**good, "prior_mask": "m.png"}], {"m.png": png("black", mode="L")})
    assert "pair line-1: prior_mask image" in refused_line(
        capsys, ["train", *tiny_argv(tmp_path / "b", *QUICK, "--dataset", pairs)])
    frozen = ("--reference_mode", "frozen_adapter", "--personalization_lora")
    flux = lora_file(tmp_path / "flux.safetensors", "transformer")
    assert "holds transformer LoRA weights, not the unet weights of family 'sd'" in refused_line(
        capsys, ["train", *tiny_argv(tmp_path / "c", *QUICK, *frozen, str(flux))])
    assert "cannot be read" in refused_line(capsys, ["train", *tiny_argv(tmp_path / "d", *QUICK, *frozen,
                                                                        str(cut(flux)))])

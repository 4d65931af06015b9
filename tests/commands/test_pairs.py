"""`focusdpo pairs`: the toy set without a prompt set; every refused input ends in one error line and exit status 2,
a run that keeps no pair included."""

import json

import pytest

from focusdpo.commands import main as cli
from focusdpo.data.load import load_pairs

from conftest import REPO, SHARED_DATA, cut, lora_file, png

RECIPE = str(REPO / "recipes" / "pairs_tiny_cpu.yaml")


@pytest.mark.e2e
def test_pairs_command_writes_a_loadable_dataset(tmp_path):
    cli(["pairs", "--out", str(tmp_path / "toy"), "--num_pairs", "3", "--resolution", "48"])
    pairs = load_pairs(str(tmp_path / "toy"))
    assert len(pairs) == 3 and pairs[0]["pair_id"] == "toy-00000"


def refused(capsys, *argv) -> str:
    """Run ``focusdpo pairs ARGV``: it must end with exit status 2 and one line under the common prefix."""
    with pytest.raises(SystemExit) as exit_:
        cli(["pairs", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("focusdpo: error: "), err
    return lines[0]


def recipe_args(uno, out, *extra):
    return ["--config", RECIPE, "--prompts", uno, "--data_root", str(SHARED_DATA / "dreambench"), "--out", str(out),
            *extra]


def test_recipe_inputs_are_refused_in_one_line(uno, tmp_path, capsys):
    assert "prompt file" in refused(capsys, *recipe_args(str(tmp_path / "gone.json"), tmp_path / "a"))
    assert "steps=0 must be an integer >= 1" in refused(capsys, *recipe_args(uno, tmp_path / "b", "--steps", "0"))
    assert "--steps '[1' is not a YAML value" in refused(capsys, *recipe_args(uno, tmp_path / "c", "--steps", "[1"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: [1\n")
    assert "broken.yaml" in refused(capsys, "--config", str(broken))  # the YAML parser's lines joined into one


def test_device_cuda_without_cuda_is_refused_before_any_model_loads(uno, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = refused(capsys, *recipe_args(uno, tmp_path / "out", "--device", "cuda"))
    assert "device: cuda, but torch sees no CUDA device here: set device: auto or cpu" in line


def test_toy_set_options_are_refused_in_one_line(tmp_path, capsys):
    assert "argument --num_pairs: invalid int value: 'x' (see `focusdpo pairs --help`)" in refused(
        capsys, "--out", str(tmp_path / "a"), "--num_pairs", "x")
    assert "num_pairs=0 must be an integer >= 1" in refused(capsys, "--out", str(tmp_path / "b"), "--num_pairs", "0")
    assert "the following arguments are required: --out" in refused(capsys, "--num_pairs", "2")
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    assert "is a file, not a folder" in refused(capsys, "--out", str(taken), "--num_pairs", "1")
    assert taken.read_text() == "mine"  # was moved aside and replaced by the dataset


@pytest.mark.e2e
def test_a_run_that_keeps_no_pair_exits_2_and_names_the_summary(uno, tmp_path, capsys):
    argv = recipe_args(uno, tmp_path, "--family", "sd", "--max_items", "1", "--num_candidates", "2", "--steps", "1",
                       "--margin_threshold", "2.0", "--dino_depth", "1")
    with pytest.raises(SystemExit) as exit_:
        cli(["pairs", *argv])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and last.startswith("focusdpo: error: no pair was kept (dropped_margin 1)")
    assert json.loads((tmp_path / "summary.json").read_text())["counts"]["kept"] == 0
    assert not (tmp_path / "dataset").exists()


@pytest.fixture
def no_generator(monkeypatch):
    """Loading the generator or the scorer fails the test: a refusal must come before them."""
    import focusdpo.pairs.generate as generate

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was refused")
    monkeypatch.setattr(generate, "load_backbone", loaded)
    monkeypatch.setattr(generate, "CandidateScorer", loaded)


def prompt_file(folder, **entry):
    """A one-entry jsonl prompt set beside its reference r.png."""
    (folder / "r.png").write_bytes(png("green"))
    (folder / "p.jsonl").write_text(json.dumps({"prompt": "a dog", "references": ["r.png"], **entry}) + "\n")
    return str(folder / "p.jsonl")


def test_bad_loras_and_prompt_entries_are_refused_before_any_model_loads(tmp_path, no_generator, capsys):
    def run(prompts, *extra):
        return refused(capsys, "--config", RECIPE, "--prompts", prompts, "--data_root", str(tmp_path), "--out",
                       str(tmp_path / "out"), *extra)

    prompts = prompt_file(tmp_path)
    flux = lora_file(tmp_path / "flux.safetensors", "transformer")
    for option in ("--personalization_lora", "--dpo_lora"):
        line = run(prompts, option, str(flux))
        assert f"{option[2:]}: {flux} holds transformer LoRA weights, not the unet weights of family 'sd'" in line
    assert f"dpo_lora: {flux} cannot be read" in run(prompts, "--dpo_lora", str(cut(flux)))
    assert "dpo_lora: 'gone' does not exist" in run(prompts, "--dpo_lora", "gone")
    line = run(prompt_file(tmp_path, references="r.png"))
    assert "p.jsonl line 1: references must be a list of image paths, got 'r.png' (write ['r.png'])" in line

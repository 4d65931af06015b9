"""`focusdpo doctor`: every input a recipe needs, reported as OK or missing with where to get it; nothing loads."""

import json

import pytest
import torch
from safetensors.torch import save_file

from focusdpo.commands.doctor import diagnose, doctor_main
from focusdpo.data.toy import make_toy_pairs
from focusdpo.errors import ConfigError
from focusdpo.models.tiny_flux import tiny_flux2_pipeline

from conftest import REPO, TINY_RECIPE

KLEIN = str(REPO / "recipes" / "flux2_klein_multiref.yaml")
# the klein recipe with everything but its generator made toy-sized, so one test looks at the diffusers folder alone
GENERATOR_ONLY = ["--dataset", "toy", "--dino_weights", "", "--dino_random_weights", "true"]


def by_field(findings) -> dict:
    return {f.field: f for f in findings}


def test_the_tiny_recipe_needs_nothing_from_disk(capsys):
    findings = doctor_main(["--config", TINY_RECIPE])
    assert [f.field for f in findings] == ["pretrained_path", "dataset", "dino_weights"]
    assert not any(f.problem for f in findings)
    assert capsys.readouterr().out.splitlines()[-1] == "all 3 inputs are here"


def test_a_real_recipe_in_an_empty_folder_lists_each_input_with_its_download_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the recipe's relative paths now point at nothing
    with pytest.raises(SystemExit) as stop:
        doctor_main(["--config", KLEIN])
    assert stop.value.code == 1
    out = capsys.readouterr().out
    missing = [line.split()[1] for line in out.splitlines() if line.startswith("MISSING")]
    assert missing == ["pretrained_path", "dataset", "dino_weights"]
    assert ("hf download black-forest-labs/FLUX.2-klein-base-4B --include \"*/*\" --include model_index.json "
            "--local-dir models/FLUX.2-klein-base-4B") in out
    assert "licence: Apache-2.0" in out
    assert ("curl -L --create-dirs -o models/dinov2_vitb14.safetensors "
            "https://huggingface.co/timm/vit_base_patch14_dinov2.lvd142m/resolve/main/model.safetensors") in out
    assert f"focusdpo focus --config {KLEIN} --dataset PAIRS_embed --out data/pairs/multiref_cached" in out
    assert out.splitlines()[-1].startswith("3 of 3 inputs missing")


def partial_klein(folder):
    """A FLUX.2 [klein] folder as an interrupted download leaves it: no text encoder, one of two transformer shards,
    a truncated VAE file."""
    index = {"_class_name": "Flux2KleinPipeline", "is_distilled": False,
             **{name: ["x", cls] for name, cls in [("scheduler", "FlowMatchEulerDiscreteScheduler"),
                                                   ("text_encoder", "Qwen3ForCausalLM"),
                                                   ("tokenizer", "Qwen2Tokenizer"),
                                                   ("transformer", "Flux2Transformer2DModel"),
                                                   ("vae", "AutoencoderKLFlux2")]}}
    for name in ("scheduler", "tokenizer", "transformer", "vae"):
        (folder / name).mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    (folder / "tokenizer" / "tokenizer.json").write_text("{}")
    for name in ("transformer", "vae"):
        (folder / name / "config.json").write_text("{}")
    shards = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}))
    save_file({"a": torch.zeros(4)}, str(folder / "transformer" / shards[0]))
    save_file({"w": torch.zeros(64)}, str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    data = (folder / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])


def test_a_partly_downloaded_diffusers_folder_names_each_absent_or_broken_part(tmp_path):
    folder = tmp_path / "FLUX.2-klein-base-4B"
    partial_klein(folder)
    _, findings = diagnose(["--config", KLEIN, "--pretrained_path", str(folder), *GENERATOR_ONLY])
    problem = by_field(findings)["pretrained_path"].problem
    assert "text_encoder/ (Qwen3ForCausalLM) is missing" in problem
    assert "transformer/diffusion_pytorch_model-00002-of-00002.safetensors is missing" in problem
    assert "vae/diffusion_pytorch_model.safetensors is unreadable" in problem
    assert "scheduler" not in problem and "tokenizer" not in problem
    assert "FLUX.2-klein-base-4B" in by_field(findings)["pretrained_path"].fix


def test_a_cache_made_with_other_settings_is_reported_not_loaded(tmp_path):
    pairs = make_toy_pairs(2, 32, 0)
    other = json.dumps({"family": "flux2", "pretrained_path": "elsewhere"})
    pairs.add_column("encoder_key", [other] * len(pairs)).save_to_disk(str(tmp_path / "cached"))
    _, findings = diagnose(["--config", TINY_RECIPE, "--dataset", str(tmp_path / "cached"),
                            "--lambda_structure", "0", "--lambda_detail", "0"])
    dataset = by_field(findings)["dataset"]
    assert "re-run `focusdpo embed`" in dataset.problem
    assert "dino_weights" not in by_field(findings)  # no focus weights: no feature extractor needed


def test_dino_weights_of_another_size_than_dino_model_are_refused(tmp_path):
    small = tmp_path / "dinov2_vits14.safetensors"
    save_file({"patch_embed.proj.weight": torch.zeros(384, 3, 1, 1)}, str(small))
    _, findings = diagnose(["--config", KLEIN, "--dino_weights", str(small), "--dataset", "toy"])
    assert "width 384, but dino_model vit_base_patch14_dinov2 is 768 wide" in by_field(findings)["dino_weights"].problem


def test_a_bad_recipe_is_an_error_not_a_report():
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        doctor_main(["--config", TINY_RECIPE, "--lerning_rate", "1e-4"])


def test_a_folder_written_by_save_pretrained_is_complete(tmp_path):
    tiny_flux2_pipeline(0).save_pretrained(str(tmp_path / "klein"))
    _, findings = diagnose(["--config", KLEIN, "--pretrained_path", str(tmp_path / "klein"), *GENERATOR_ONLY])
    assert by_field(findings)["pretrained_path"].problem == ""

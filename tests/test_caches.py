"""Cached prompt embeddings let flow models train without their text encoders."""

import json

import pytest

from focusdpo.commands import main as cli
from focusdpo.data.load import load_pairs
from focusdpo.commands.train import main

from conftest import REPO

TINY = ["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "--toy_num_pairs", "4", "--max_steps", "3",
        "--logging_steps", "1", "--save_steps", "100", "--lambda_structure", "0", "--lambda_detail", "0",
        "--max_sequence_length", "32"]


def step_losses(out):
    return [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


@pytest.mark.parametrize("family", ["flux2", "flux_kontext"])
def test_training_on_cached_embeddings_matches_live_text_encoders(family, tmp_path):
    args = [*TINY, "--family", family]
    cli(["embed", "--out", str(tmp_path / "cached"), "--device", "cpu", *args])
    cached = load_pairs(str(tmp_path / "cached"))
    assert "prompt_embeds" in cached.column_names
    assert ("pooled_prompt_embeds" in cached.column_names) == (family == "flux_kontext")
    live = tmp_path / "live"
    main([*args, "--output_dir", str(live), "--sample_every_run", "false"])
    dropped = tmp_path / "dropped"
    trainer = main([*args, "--output_dir", str(dropped), "--dataset", str(tmp_path / "cached"),
                    "--drop_text_encoders", "true"])
    assert all(v is None for k, v in trainer.backbone.pipeline.components.items() if k.startswith("text_encoder"))
    assert step_losses(dropped) == pytest.approx(step_losses(live), rel=1e-3)  # float16 cache vs fp32 live


def test_dropping_text_encoders_without_a_cache_is_refused(tmp_path):
    with pytest.raises(ValueError, match="run `focusdpo embed"):
        main([*TINY, "--family", "flux2", "--output_dir", str(tmp_path), "--drop_text_encoders", "true"])


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_unet_runs_on_cached_prompt_embeddings_never_run_the_text_encoders(family, tmp_path):
    args = [*TINY, "--family", family, "--max_steps", "3", "--sample_every_run", "false"]
    cli(["embed", "--out", str(tmp_path / "cached"), "--device", "cpu", "--latents", *args])
    columns = set(load_pairs(str(tmp_path / "cached")).column_names)
    assert {"prompt_embeds", "latents"} <= columns and ("pooled_prompt_embeds" in columns) == (family == "sdxl")
    main([*args, "--output_dir", str(tmp_path / "live")])
    from focusdpo.config.recipe import parse_config
    from focusdpo.training.trainer import build_trainer

    trainer = build_trainer(*parse_config([*args, "--output_dir", str(tmp_path / "run"), "--dataset",
                                           str(tmp_path / "cached")]))
    trainer.backbone.pipeline.encode_prompt = None  # any text encoding during training would now fail
    trainer.train()
    assert step_losses(tmp_path / "run") == pytest.approx(step_losses(tmp_path / "live"), rel=1e-3)  # float16 cache
    with pytest.raises(ValueError, match="drop_text_encoders is for the flow families"):
        parse_config([*args, "--output_dir", str(tmp_path / "x"), "--drop_text_encoders", "true"])


@pytest.mark.parametrize("family, extra", [("sd", []), ("flux2", []), ("flux_kontext", [])])
def test_training_on_cached_latents_never_runs_the_vae_encoder(family, extra, tmp_path):
    from focusdpo.config.recipe import parse_config
    from focusdpo.training.trainer import build_trainer

    args = [*TINY, "--family", family, "--max_steps", "2"]
    cli(["embed", "--out", str(tmp_path / "cached"), "--device", "cpu", "--latents", *extra, *args])
    cached = load_pairs(str(tmp_path / "cached"))
    assert {"latents", "encoder_key"} <= set(cached.column_names)
    assert ("reference_latents" in cached.column_names) == (family != "sd")
    drop = [] if family == "sd" else ["--drop_text_encoders", "true"]
    trainer = build_trainer(*parse_config([*args, "--output_dir", str(tmp_path / "run"), "--dataset",
                                           str(tmp_path / "cached"), *drop]))
    trainer.backbone.pipeline.vae.encode = None  # any VAE encoding during training would now fail
    trainer.train()
    assert step_losses(tmp_path / "run")[0] == pytest.approx(0.693147, abs=1e-5)


def test_latents_cached_for_another_model_are_refused(tmp_path):
    from focusdpo.config.recipe import parse_config
    from focusdpo.training.trainer import build_trainer

    cli(["embed", "--out", str(tmp_path / "cached"), "--device", "cpu", "--latents", "--no_text", *TINY])
    with pytest.raises(ValueError, match="re-run `focusdpo embed`"):  # before the model loads
        build_trainer(*parse_config([*TINY, "--output_dir", str(tmp_path / "run"), "--dataset",
                                     str(tmp_path / "cached"), "--tiny_seed", "1"]))


def test_a_cache_key_names_a_local_model_folder_by_its_real_path(tmp_path, monkeypatch):
    from focusdpo.config.training import DataConfig, ModelConfig
    from focusdpo.caches import check_encoder_key, encoder_cache_key

    model, other = tmp_path / "model", tmp_path / "other"
    model.mkdir(), other.mkdir()
    (tmp_path / "link").symlink_to(model)
    monkeypatch.chdir(tmp_path)
    data = DataConfig(resolution=32)
    made = encoder_cache_key(ModelConfig(family="flux2", pretrained_path="model"), data)  # a relative path
    for same in (str(model), str(tmp_path / "link"), "./model"):  # the same folder, named otherwise: accepted
        check_encoder_key(made, ModelConfig(family="flux2", pretrained_path=same), data)
    with pytest.raises(ValueError, match="re-run `focusdpo embed`"):  # another folder, or another size: refused
        check_encoder_key(made, ModelConfig(family="flux2", pretrained_path=str(other)), data)
    with pytest.raises(ValueError, match="re-run `focusdpo embed`"):
        check_encoder_key(made, ModelConfig(family="flux2", pretrained_path=str(model)), DataConfig(resolution=64))

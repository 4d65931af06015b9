"""Encoder caches (`focusdpo embed`): prompt embeddings and latents stand in for the text encoders and the VAE,
exactly; caches made for another model or format are refused."""

import json
import math

import pytest
import torch

from focusdpo.commands import main as cli
from focusdpo.commands.train import main
from focusdpo.config.recipe import parse_config
from focusdpo.data.collate import PairCollator
from focusdpo.data.load import load_pairs
from focusdpo.training.trainer import build_trainer

from conftest import CACHE_ARGS, FAST_ARGS, embed_latents, step_losses


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["flux2", "flux_kontext"])
def test_training_on_cached_embeddings_matches_live_text_encoders(family, tmp_path):
    args = [*CACHE_ARGS, "--family", family]
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
        main([*CACHE_ARGS, "--family", "flux2", "--output_dir", str(tmp_path), "--drop_text_encoders", "true"])


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_unet_runs_on_cached_prompt_embeddings_never_run_the_text_encoders(family, tmp_path):
    args = [*CACHE_ARGS, "--family", family, "--max_steps", "3", "--sample_every_run", "false"]
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


@pytest.mark.e2e
@pytest.mark.parametrize("family, extra", [("sd", []), ("flux2", []), ("flux_kontext", [])])
def test_training_on_cached_latents_never_runs_the_vae_encoder(family, extra, tmp_path):
    from focusdpo.config.recipe import parse_config
    from focusdpo.training.trainer import build_trainer

    args = [*CACHE_ARGS, "--family", family, "--max_steps", "2"]
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


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["sd", "flux2"])
def test_cached_latents_prepare_the_same_inputs_as_live_encoding(family, tmp_path):
    args = [*FAST_ARGS, "--family", family]
    cached = load_pairs(embed_latents(tmp_path, args))
    trainer = build_trainer(*parse_config([*args, "--output_dir", str(tmp_path / "run")]))
    collate, rows = PairCollator(32), [cached[0], cached[1]]
    live_batch = collate(rows)
    cached_batch, live_batch = dict(live_batch), {k: v for k, v in live_batch.items() if "latents" not in k}
    assert "latents" in cached_batch
    backbone = trainer.backbone
    live = backbone.prepare(live_batch, torch.Generator().manual_seed(7))
    from_cache = backbone.prepare(cached_batch, torch.Generator().manual_seed(7))
    first = "sample" if family == "sd" else "tokens"
    torch.testing.assert_close(from_cache.model_kwargs[first], live.model_kwargs[first], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(from_cache.target, live.target, atol=2e-3, rtol=2e-3)  # float16 cache vs fp32
    if family == "sd":  # the cache holds the posterior: another seed draws another latent sample
        other = backbone.prepare(cached_batch, torch.Generator().manual_seed(8))
        _, std = cached_batch["latents"].chunk(2, dim=1)
        assert std.abs().min() > 0
        drawn = backbone.sample_latents(cached_batch["latents"], torch.Generator().manual_seed(8))
        assert not torch.allclose(drawn, backbone.sample_latents(cached_batch["latents"],
                                                                 torch.Generator().manual_seed(9)))
        assert not torch.equal(other.target, from_cache.target)


@pytest.mark.e2e
def test_sd_run_on_cached_latents_matches_the_uncached_run(tmp_path):
    """Same seeds, same losses, step by step (the posterior is cached; each step draws its sample)."""
    cached = embed_latents(tmp_path, FAST_ARGS)
    main([*FAST_ARGS, "--output_dir", str(tmp_path / "live")])
    main([*FAST_ARGS, "--output_dir", str(tmp_path / "cached_run"), "--dataset", cached])
    live, from_cache = step_losses(tmp_path / "live"), step_losses(tmp_path / "cached_run")
    assert live[0] == pytest.approx(math.log(2), abs=1e-6)
    assert from_cache == pytest.approx(live, rel=1e-3)


@pytest.mark.e2e
def test_latents_cached_for_another_model_are_refused(tmp_path):
    from focusdpo.config.recipe import parse_config
    from focusdpo.training.trainer import build_trainer

    cli(["embed", "--out", str(tmp_path / "cached"), "--device", "cpu", "--latents", "--no_text", *CACHE_ARGS])
    with pytest.raises(ValueError, match="re-run `focusdpo embed`"):  # before the model loads
        build_trainer(*parse_config([*CACHE_ARGS, "--output_dir", str(tmp_path / "run"), "--dataset",
                                     str(tmp_path / "cached"), "--tiny_seed", "1"]))


@pytest.mark.e2e
def test_latents_cached_before_the_posterior_format_are_refused(tmp_path):
    cached = load_pairs(embed_latents(tmp_path, FAST_ARGS))
    old_key = json.loads(cached[0]["encoder_key"])
    old_key.pop("format")
    stale = cached.map(lambda row: {"encoder_key": json.dumps(old_key, sort_keys=True)})
    stale.save_to_disk(str(tmp_path / "stale"))
    with pytest.raises(ValueError, match="re-run `focusdpo embed`"):  # refused before the model loads
        build_trainer(*parse_config([*FAST_ARGS, "--output_dir", str(tmp_path / "run"), "--dataset",
                                     str(tmp_path / "stale")]))


def test_a_cache_key_names_a_local_model_folder_by_its_real_path(tmp_path, monkeypatch):
    from focusdpo.caches import check_encoder_key, encoder_cache_key
    from focusdpo.config.training import DataConfig, ModelConfig

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

"""Throughput options keep results exact: cached latents and focus maps, workers, channels_last, torch_compile."""

import json
import math
import os
import shutil

import pytest
import torch

from focusdpo.commands import main as cli
from focusdpo.errors import ConfigError
from focusdpo.config.training import ModelConfig
from focusdpo.config.recipe import parse_config
from focusdpo.data.collate import PairCollator
from focusdpo.data.load import load_pairs
from focusdpo.training.trainer import build_trainer
from focusdpo.commands.train import main

from conftest import REPO

TINY = ["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "--toy_num_pairs", "4", "--max_steps", "3",
        "--logging_steps", "1", "--save_steps", "100", "--lambda_structure", "0", "--lambda_detail", "0",
        "--max_sequence_length", "32", "--sample_every_run", "false"]


def step_losses(out):
    return [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def embed_latents(tmp_path, args) -> str:
    folder = tmp_path / "cached"
    cli(["embed", "--out", str(folder), "--device", "cpu", "--latents", "--no_text", *args])
    return str(folder)


@pytest.mark.parametrize("family", ["sd", "flux2"])
def test_cached_latents_prepare_the_same_inputs_as_live_encoding(family, tmp_path):
    args = [*TINY, "--family", family]
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


def test_sd_run_on_cached_latents_matches_the_uncached_run(tmp_path):
    """Same seeds, same losses, step by step (the posterior is cached; each step draws its sample)."""
    cached = embed_latents(tmp_path, TINY)
    main([*TINY, "--output_dir", str(tmp_path / "live")])
    main([*TINY, "--output_dir", str(tmp_path / "cached_run"), "--dataset", cached])
    live, from_cache = step_losses(tmp_path / "live"), step_losses(tmp_path / "cached_run")
    assert live[0] == pytest.approx(math.log(2), abs=1e-6)
    assert from_cache == pytest.approx(live, rel=1e-3)


@pytest.mark.parametrize("family", ["sd", "flux2"])
def test_a_run_on_cached_encoders_decodes_no_image_and_matches_the_decoding_run(family, tmp_path, monkeypatch):
    import focusdpo.data.collate
    from focusdpo.data.load import with_array_format

    args = [*TINY, "--family", family, "--dataset", embed_latents(tmp_path, [*TINY, "--family", family])]
    decoding = build_trainer(*parse_config([*args, "--output_dir", str(tmp_path / "decoding")]))
    assert decoding.pixels is False
    decoding.data_collator.pixels = True  # as before: every image decoded, each batch carrying pixel_values
    decoding.train_dataset = with_array_format(decoding.pairs)  # and the image columns read out of arrow for it
    decoding.train()
    monkeypatch.setattr(focusdpo.data.collate, "open_image", lambda *a, **k: pytest.fail("an image was decoded"))
    build_trainer(*parse_config([*args, "--output_dir", str(tmp_path / "cached")])).train()
    assert step_losses(tmp_path / "cached") == step_losses(tmp_path / "decoding")  # exact: the pixels were unused


def test_images_are_decoded_whenever_a_reader_of_them_is_not_cached():
    from focusdpo.data.load import needs_pixels

    cached = ["latents", "reference_latents", "focus_maps", "mosaic_points"]
    assert not needs_pixels(cached, flow=True, focus_on=True, mosaic_on=True)
    assert not needs_pixels(["latents"], flow=False, focus_on=False, mosaic_on=False)  # SD reads no references
    for missing, flow, focus_on, mosaic_on in (("latents", False, False, False), ("reference_latents", True, False,
                                               False), ("focus_maps", False, True, False),
                                               ("mosaic_points", True, False, True)):
        assert needs_pixels([c for c in cached if c != missing], flow, focus_on, mosaic_on), missing


def test_a_dataset_no_step_decodes_from_drops_its_image_columns_and_the_batch_keeps_reference_counts(tmp_path):
    """pixels=False: the image columns are left out of the rows (their bytes stay in arrow); the collator's batch equals
    the one from the full rows, the reference counts read from the cached reference latents."""
    from focusdpo.data.schema import IMAGE_COLUMNS
    from focusdpo.data.load import with_array_format

    cached = load_pairs(embed_latents(tmp_path, [*TINY, "--family", "flux2", "--toy_num_pairs", "6"]))
    full, counted = with_array_format(cached), with_array_format(cached, pixels=False)
    assert not set(IMAGE_COLUMNS) & set(counted.column_names)
    indices = [4, 0, 3, 3]
    got, want = [counted[i] for i in indices], [full[i] for i in indices]
    assert any(row["references"] for row in want)  # the toy pairs have references: the counts are checked
    fast, slow = PairCollator(32, pixels=False)(got), PairCollator(32)(want)
    assert [len(r) for r in fast["references"]] == [len(r) for r in slow["references"]]
    assert torch.equal(fast["latents"], slow["latents"]) and fast["pair_ids"] == slow["pair_ids"]
    assert "pixel_values" not in fast


def test_latents_cached_before_the_posterior_format_are_refused(tmp_path):
    cached = load_pairs(embed_latents(tmp_path, TINY))
    old_key = json.loads(cached[0]["encoder_key"])
    old_key.pop("format")
    stale = cached.map(lambda row: {"encoder_key": json.dumps(old_key, sort_keys=True)})
    stale.save_to_disk(str(tmp_path / "stale"))
    with pytest.raises(ValueError, match="re-run `focusdpo embed`"):  # refused before the model loads
        build_trainer(*parse_config([*TINY, "--output_dir", str(tmp_path / "run"), "--dataset",
                                     str(tmp_path / "stale")]))


















def test_loading_in_worker_processes_trains_exactly_like_loading_in_the_trainer(tmp_path):
    """``dataloader_num_workers`` moves fetching and collating (and image decoding) out of the training process;
    batches, noise and so losses are unchanged."""
    main([*TINY, "--output_dir", str(tmp_path / "inline")])
    main([*TINY, "--output_dir", str(tmp_path / "workers"), "--dataloader_num_workers", "2",
          "--dataloader_persistent_workers", "true"])
    inline = step_losses(tmp_path / "inline")
    assert inline[0] == pytest.approx(math.log(2), abs=1e-6)
    assert step_losses(tmp_path / "workers") == inline


def test_channels_last_trains_like_the_default_layout(tmp_path):
    main([*TINY, "--output_dir", str(tmp_path / "default")])
    trainer = main([*TINY, "--output_dir", str(tmp_path / "nhwc"), "--channels_last", "true"])
    conv = trainer.backbone.denoiser.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    default, nhwc = step_losses(tmp_path / "default"), step_losses(tmp_path / "nhwc")
    assert nhwc[0] == pytest.approx(math.log(2), abs=1e-6)
    assert nhwc == pytest.approx(default, rel=1e-3)  # NHWC kernels round differently; β = 5000 amplifies it


@pytest.mark.parametrize("family", ["flux2", "flux_kontext"])
def test_channels_last_is_refused_for_transformers(family):
    with pytest.raises(ConfigError, match="channels_last=True is for UNet families"):
        ModelConfig(family=family, channels_last=True)


def c_compiler() -> str | None:
    return next((cc for cc in ("cc", "gcc", "clang", "g++") if shutil.which(cc)), None)


@pytest.mark.skipif(c_compiler() is None, reason="inductor needs a C/C++ compiler on the CPU; none found on PATH")
@pytest.mark.skipif(os.environ.get("FOCUSDPO_COMPILE_TESTS") != "1",
                    reason="inductor takes 5-10 min to compile the tiny UNet on 2 shared CPU cores (policy, reference "
                           "and backward graphs): set FOCUSDPO_COMPILE_TESTS=1 to run")
@pytest.mark.parametrize("family", ["sd", "flux2"])
def test_torch_compile_compiles_the_denoiser_in_place_and_starts_from_ln2(family, tmp_path):
    out = tmp_path / "compiled"
    trainer = main([*TINY, "--family", family, "--max_steps", "1", "--output_dir", str(out),
                    "--torch_compile", "true"])
    assert trainer.backbone.denoiser._compiled_call_impl is not None  # nn.Module.compile: policy and reference
    assert not hasattr(trainer.model_wrapped, "_orig_mod")  # the Trainer did not compile the PolicyModel on top
    # Not bit-exact: inductor compiles the no_grad reference as an inference graph and the policy as a training
    # graph, which round differently (max |Δ| ≈ 2e-6 on the tiny UNet); β = 5000 turns that into ~1e-4 of loss.
    assert step_losses(out)[0] == pytest.approx(math.log(2), abs=2e-4)

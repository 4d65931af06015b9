"""Throughput options keep results exact: cached latents, no per-step model walks, channels_last, torch_compile."""

import json
import math
import os
import shutil

import pytest
import torch

from focusdpo.cli import main as cli
from focusdpo.config import ConfigError, ModelConfig
from focusdpo.recipe import parse_config
from focusdpo.data import PairCollator, load_pairs
from focusdpo.train import build_trainer, main

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
    import focusdpo.data

    args = [*TINY, "--family", family, "--dataset", embed_latents(tmp_path, [*TINY, "--family", family])]
    decoding = build_trainer(*parse_config([*args, "--output_dir", str(tmp_path / "decoding")]))
    assert decoding.pixels is False
    decoding.data_collator.pixels = True  # as before: every image decoded, each batch carrying pixel_values
    decoding.train_dataset.unread_columns = ()  # and the image columns read out of arrow for it
    decoding.train()
    monkeypatch.setattr(focusdpo.data, "open_image", lambda *a, **k: pytest.fail("an image was decoded"))
    build_trainer(*parse_config([*args, "--output_dir", str(tmp_path / "cached")])).train()
    assert step_losses(tmp_path / "cached") == step_losses(tmp_path / "decoding")  # exact: the pixels were unused


def test_images_are_decoded_whenever_a_reader_of_them_is_not_cached():
    from focusdpo.data import needs_pixels

    cached = ["latents", "reference_latents", "focus_maps", "mosaic_points"]
    assert not needs_pixels(cached, flow=True, focus_on=True, mosaic_on=True)
    assert not needs_pixels(["latents"], flow=False, focus_on=False, mosaic_on=False)  # SD reads no references
    for missing, flow, focus_on, mosaic_on in (("latents", False, False, False), ("reference_latents", True, False,
                                               False), ("focus_maps", False, True, False),
                                               ("mosaic_points", True, False, True)):
        assert needs_pixels([c for c in cached if c != missing], flow, focus_on, mosaic_on), missing


@pytest.mark.parametrize("family", ["sd", "flux2"])
def test_batches_read_from_arrow_equal_the_datasets_rows(family, tmp_path):
    """ArrayRows (the trainer's batch reads) gives what datasets' own formatting gives: the same arrays (float16
    values; reference latents with a per-row count), focus maps, strings, undecoded images and lists."""
    import numpy as np
    from datasets import Array2D, Features, List, Value

    from focusdpo.array_rows import ArrayRows
    from focusdpo.data import with_array_format

    args = [*TINY, "--family", family, "--toy_num_pairs", "6"]
    embed_latents(tmp_path, args)
    cli(["focus", "--out", str(tmp_path / "maps"), "--device", "cpu", "--dataset", str(tmp_path / "cached"),
         *args[:2], "--lambda_structure", "1", "--dino_random_weights", "true", "--dino_depth", "1",
         "--dino_image_size", "28", "--family", family])
    with_maps = load_pairs(str(tmp_path / "maps"))
    extra = Features({**with_maps.features, "pooled": List(Value("float16")), "ragged": Array2D((None, 3), "float16")})
    with_maps = with_maps.map(lambda row, i: {"pooled": [i * 0.5] * 4, "ragged": [[i, 1, 2]] * (i % 3)},
                              with_indices=True, features=extra)
    fast = with_array_format(with_maps)
    assert isinstance(fast, ArrayRows)
    assert {"latents", "focus_maps", *(["reference_latents"] if family != "sd" else [])} <= set(fast.array_columns)
    fast.array_columns.append("ragged")  # a dynamic first axis with empty rows, as SDXL/flux caches may hold
    fast.inner_shapes["ragged"] = (3,)
    reference = fast.dataset.with_format("numpy", columns=fast.array_columns, output_all_columns=True)
    for indices in ([0, 1, 2], [5, 0, 3, 3], [4]):
        got, expected = fast.__getitems__(indices), reference.__getitems__(indices)
        assert [sorted(row) for row in got] == [sorted(row) for row in expected]
        for row, want in zip(got, expected):
            for name, value in want.items():
                if name in fast.array_columns:
                    np.testing.assert_array_equal(np.asarray(row[name], np.float32).reshape(np.shape(value)),
                                                  np.asarray(value, np.float32))
                else:
                    assert row[name] == value, name
    assert len(fast) == 6 and fast[0]["pair_id"] == with_maps[0]["pair_id"] and fast.column_names
    import pickle

    on_disk = with_array_format(load_pairs(str(tmp_path / "maps")))  # as spawned DataLoader workers receive it
    pickled = pickle.dumps(on_disk)
    assert len(pickled) < on_disk.table.nbytes / 2  # the memory-mapped file is named, not copied
    again = pickle.loads(pickled)
    np.testing.assert_array_equal(again.__getitems__([2])[0]["latents"], on_disk.__getitems__([2])[0]["latents"])


def test_image_columns_no_step_reads_are_passed_as_counts(tmp_path):
    """pixels=False: the image columns' bytes stay in arrow (rows get None, or a list of as many None as the row has
    references/masks, None for a null row); the collator's batch equals the one from the full rows."""
    from datasets import Dataset

    from focusdpo.array_rows import placeholders
    from focusdpo.data import IMAGE_COLUMNS, with_array_format

    cached = load_pairs(embed_latents(tmp_path, [*TINY, "--toy_num_pairs", "6"]))
    full, counted = with_array_format(cached), with_array_format(cached, pixels=False)
    assert counted.unread_columns == tuple(c for c in IMAGE_COLUMNS if c in cached.column_names)
    indices = [4, 0, 3, 3]
    got, want = counted.__getitems__(indices), full.__getitems__(indices)
    assert any(row["references"] for row in want)  # the toy pairs have references: the counts are checked
    for row, expected in zip(got, want):
        assert row["chosen"] is None and row["rejected"] is None and row["prior_mask"] is None
        for name in ("references", "reference_masks"):
            assert row[name] == (None if expected[name] is None else [None] * len(expected[name])), name
        assert {k: v for k, v in row.items() if k not in IMAGE_COLUMNS}.keys() == \
            {k for k in expected if k not in IMAGE_COLUMNS}
    collate = PairCollator(32, pixels=False)
    fast, slow = collate(got), collate(want)
    assert [r.shape for r in fast["references"]] == [r.shape for r in slow["references"]]
    assert torch.equal(fast["latents"], slow["latents"]) and fast["pair_ids"] == slow["pair_ids"]
    assert placeholders(Dataset.from_dict({"r": [[1, 2], None, []]}).data.column("r")) == [[None, None], None, []]


def test_a_batch_read_copies_the_batch_not_the_column():
    """pyarrow's Table.take concatenates all chunks of a column per call: on a real latent cache, gigabytes a step."""
    import numpy as np
    import pyarrow as pa
    from datasets import Array2D, Dataset, Features, Value, concatenate_datasets

    from focusdpo.data import with_array_format

    features = Features({"pair_id": Value("string"), "latents": Array2D((64, 64), "float16")})
    chunk = {"pair_id": ["p"] * 50, "latents": [np.ones((64, 64), np.float16)] * 50}
    rows = with_array_format(concatenate_datasets([Dataset.from_dict(chunk, features=features)] * 8))  # 8 chunks
    assert rows.table.column("latents").num_chunks == 8
    default, counting = pa.default_memory_pool(), pa.proxy_memory_pool(pa.default_memory_pool())
    pa.set_memory_pool(counting)  # what arrow allocates while reading, temporaries included (max_memory)
    try:
        batch = rows.__getitems__([3, 399, 120, 7])
        shapes = [row["latents"].shape for row in batch]
        del batch  # its buffers come from the counting pool: free them while it exists
    finally:
        pa.set_memory_pool(default)
    assert counting.max_memory() < 20 * 64 * 64 * 2  # 4 rows (+ slack), not the 400-row column
    assert shapes == [(64, 64)] * 4


def test_latents_cached_before_the_posterior_format_are_refused(tmp_path):
    cached = load_pairs(embed_latents(tmp_path, TINY))
    old_key = json.loads(cached[0]["encoder_key"])
    old_key.pop("format")
    stale = cached.map(lambda row: {"encoder_key": json.dumps(old_key, sort_keys=True)})
    stale.save_to_disk(str(tmp_path / "stale"))
    with pytest.raises(ValueError, match="re-run `focusdpo embed`"):  # refused before the model loads
        build_trainer(*parse_config([*TINY, "--output_dir", str(tmp_path / "run"), "--dataset",
                                     str(tmp_path / "stale")]))


@pytest.mark.parametrize("family", ["sd", "flux2"])
def test_a_training_step_reads_no_device_or_dtype_from_the_models(family, tmp_path, monkeypatch):
    """diffusers' ``.device``/``.dtype`` walk every submodule: resolved once at setup, never per step."""
    from diffusers import ModelMixin
    from transformers import TrainerCallback

    args = [*TINY, "--family", family]
    cached = embed_latents(tmp_path, args)
    trainer = build_trainer(*parse_config([*args, "--output_dir", str(tmp_path / "run"), "--dataset", cached]))
    reads, counting = [], [False]
    for name in ("device", "dtype"):
        original = getattr(ModelMixin, name)
        monkeypatch.setattr(ModelMixin, name, property(
            lambda self, o=original, n=name: (counting[0] and reads.append(n)) or o.fget(self)))

    class CountInsideSteps(TrainerCallback):  # setup (train begin) may read them once
        def on_step_begin(self, *args, **kwargs):
            counting[0] = True

        def on_step_end(self, *args, **kwargs):
            counting[0] = False

    trainer.add_callback(CountInsideSteps())
    trainer.train()
    assert reads == [] and trainer.state.global_step == 3
    assert step_losses(tmp_path / "run")[0] == pytest.approx(math.log(2), abs=1e-6)


def test_a_step_never_walks_the_model_for_adapters_or_train_mode(tmp_path, monkeypatch):
    """diffusers' disable/enable_adapters walk every submodule per call; the reference pass switches peft's layers,
    found once per set of adapters; ``model.train()`` sets flags only when one differs."""
    from focusdpo.reference import disabled_adapters, tuner_layers

    trainer = build_trainer(*parse_config([*TINY, "--output_dir", str(tmp_path / "run")]))
    for name in ("disable_adapters", "enable_adapters"):
        monkeypatch.setattr(type(trainer.backbone.denoiser), name,
                            lambda *a, n=name, **k: pytest.fail(f"{n} walked the model"))
    trainer.train()
    assert step_losses(tmp_path / "run")[0] == pytest.approx(math.log(2), abs=1e-6)
    denoiser = trainer.backbone.denoiser
    layers = tuner_layers(denoiser)
    assert layers and tuner_layers(denoiser) is layers  # found once
    trainable = {n for n, p in denoiser.named_parameters() if p.requires_grad}
    with disabled_adapters(denoiser):  # peft's public property reads the flag switch_adapters sets (pinned here)
        assert all(layer.disable_adapters for layer in layers)
        assert {n for n, p in denoiser.named_parameters() if p.requires_grad} == trainable  # flags not flipped
    assert not any(layer.disable_adapters for layer in layers)
    assert {n for n, p in denoiser.named_parameters() if p.requires_grad} == \
        {n for n, _ in denoiser.named_parameters() if ".dpo." in n}  # the DPO LoRA alone trains again
    from peft import LoraConfig

    modules = trainer.model.module_list()
    denoiser.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="other")
    assert len(tuner_layers(denoiser)) == len(layers)  # re-found (to_q layers already hold the DPO LoRA)
    assert tuner_layers(denoiser) is not layers
    assert len(trainer.model.module_list()) > len(modules)  # the new adapter's modules are checked by train() too
    block = next(m for m in denoiser.modules() if m is not denoiser)
    block.eval()  # a submodule switched by someone else: train() still restores it
    trainer.model.train()
    assert block.training


def test_the_gradient_buffer_by_hand():
    """Gradients [3, 0] and [[0, 4]]: one buffer of norm 5, clipped to 1 by torch's coefficient 1 / (5 + 1e-6);
    backward adds into the views, a replaced gradient is re-attached by zero_, mixed dtypes get no buffer."""
    from focusdpo.grad_buffer import GradientBuffer

    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1, 2))
    buffer = GradientBuffer.of([a, b])
    ((a * torch.tensor([3.0, 0.0])).sum() + (b * torch.tensor([[0.0, 4.0]])).sum()).backward()
    assert buffer.attached() and buffer.flat.tolist() == [3.0, 0.0, 0.0, 4.0]
    assert buffer.clip_(10.0).item() == 5.0 and buffer.flat.tolist() == [3.0, 0.0, 0.0, 4.0]  # below: untouched
    assert buffer.clip_(1.0).item() == 5.0
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 0.0]) / (5 + 1e-6), rtol=0, atol=0)
    torch.testing.assert_close(b.grad, torch.tensor([[0.0, 4.0]]) / (5 + 1e-6), rtol=0, atol=0)
    a.grad = None
    assert not buffer.attached()
    buffer.zero_()
    assert buffer.attached() and buffer.flat.abs().sum() == 0 and a.grad is buffer.views[0]
    assert GradientBuffer.of([a, torch.nn.Parameter(torch.ones(2, dtype=torch.float64))]) is None


def test_shared_values_are_the_parameters_and_replaced_gradients_are_collected():
    """share_values: one parameter over [a; b] whose in-place update is the parameters' update and whose .grad
    is the buffer; a gradient replaced by a wrapper (set to None, then made anew) is copied back before the
    step; a parameter given new storage is copied back in, one cast to another dtype is refused with the fix."""
    from focusdpo.grad_buffer import GradientBuffer

    a, b = torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([[3.0]]))
    buffer = GradientBuffer.of([a, b])
    values = buffer.share_values()
    assert values.tolist() == [1.0, 2.0, 3.0] and values.grad is buffer.flat
    with torch.no_grad():
        values.sub_(torch.tensor([1.0, 1.0, 1.0]))
    assert a.tolist() == [0.0, 1.0] and b.tolist() == [[2.0]]
    a.grad, b.grad = None, None  # a wrapping module's zero_grad
    (a.sum() * 5).backward()  # a gets a new tensor, b none
    buffer.collect_()
    assert buffer.attached() and values.grad.tolist() == [5.0, 5.0, 0.0]
    buffer.detach()
    assert a.grad is None and values.grad is None
    a.data = torch.tensor([7.0, 8.0])  # new storage, as DDP's start-up broadcast gives it
    buffer.collect_()
    assert values.tolist() == [7.0, 8.0, 2.0] and a.data_ptr() == values.data_ptr()
    a.data = a.data.double()
    with pytest.raises(RuntimeError, match="place and cast the model before training"):
        buffer.collect_()


@pytest.mark.parametrize("max_grad_norm", ["1e9", "1e-4"])
def test_a_run_on_the_gradient_buffer_trains_like_per_tensor_gradients(max_grad_norm, tmp_path):
    """The LoRA's gradients live in one buffer (zeroed, measured and clipped as one tensor) and AdamW steps its
    values as one tensor; the run equals one with a tensor per parameter: bit for bit without clipping (1e9), to
    rounding with it (1e-4 clips every step; the norm is summed in another order)."""
    runs = {}
    for contiguous in (True, False):
        trainer = build_trainer(*parse_config([*TINY, "--output_dir", str(tmp_path / str(contiguous)),
                                               "--max_grad_norm", max_grad_norm]))
        trainer.model.contiguous_gradients = contiguous
        trainer.train()
        runs[contiguous] = [p.detach().clone() for p in trainer.model.trainable_parameters()]
        buffer = trainer.model.gradients
        assert (buffer is not None and buffer.attached()) == contiguous
        stepped = trainer.optimizer.param_groups[0]["params"]
        assert [buffer.values] == stepped if contiguous else len(stepped) == len(runs[contiguous]) == 96
    rtol = 0 if max_grad_norm == "1e9" else 1e-5
    for with_buffer, per_tensor in zip(runs[True], runs[False]):  # rounding scales with each tensor's updates
        torch.testing.assert_close(with_buffer, per_tensor, rtol=rtol, atol=rtol * per_tensor.abs().max().item())


def test_a_per_tensor_optimizer_state_is_merged_into_the_flat_parameter_by_hand():
    from focusdpo.grad_buffer import flat_optimizer_state

    saved = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.tensor([1.0, 2.0])},
                       1: {"step": torch.tensor(3.0), "exp_avg": torch.tensor([[5.0]])}},
             "param_groups": [{"params": [0, 1], "lr": 0.1}, {"params": [], "lr": 0.1}]}  # the Trainer's two groups
    merged = flat_optimizer_state(saved, [2, 1])
    assert merged["param_groups"] == [{"params": [0], "lr": 0.1}, {"params": [], "lr": 0.1}]
    assert list(merged["state"]) == [0]
    assert merged["state"][0]["step"].item() == 3.0 and merged["state"][0]["exp_avg"].tolist() == [1.0, 2.0, 5.0]
    assert flat_optimizer_state(merged, [2, 1]) is merged  # already flat
    saved["state"][1]["step"] = torch.tensor(4.0)
    with pytest.raises(ValueError, match="'step' differs"):
        flat_optimizer_state(saved, [2, 1])
    with pytest.raises(ValueError, match="resume with the settings it was saved with"):
        flat_optimizer_state(saved, [2, 1, 7])


def test_a_checkpoint_of_a_per_tensor_optimizer_resumes_on_the_flat_one(tmp_path):
    """A run saved by a per-tensor optimizer (an earlier version) resumes on the flat parameter: its moments are
    merged, and the resumed run ends where the uninterrupted per-tensor run ends."""
    argv = [*TINY, "--max_steps", "4", "--save_steps", "2", "--max_grad_norm", "1e9"]
    per_tensor = build_trainer(*parse_config([*argv, "--output_dir", str(tmp_path / "per_tensor")]))
    per_tensor.model.contiguous_gradients = False
    per_tensor.train()
    resumed = build_trainer(*parse_config([*argv, "--output_dir", str(tmp_path / "flat")]))
    resumed.train(resume_from_checkpoint=str(tmp_path / "per_tensor" / "checkpoint-2"))
    assert [group["params"] for group in resumed.optimizer.param_groups] == [[resumed.model.gradients.values], []]
    assert resumed.state.global_step == 4
    for flat, expected in zip(resumed.model.trainable_parameters(), per_tensor.model.trainable_parameters()):
        torch.testing.assert_close(flat, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_the_heap_alive_at_the_start_is_frozen_during_training_and_released_after(tmp_path):
    """Full garbage collections skip the model and dataset while training, also after a run that raised."""
    import gc

    from transformers import TrainerCallback

    frozen = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            frozen.append(gc.get_freeze_count())
            if state.global_step == 2 and args.output_dir.endswith("raises"):
                raise KeyboardInterrupt

    gc.unfreeze()
    trainer = build_trainer(*parse_config([*TINY, "--output_dir", str(tmp_path / "run")]), callbacks=[Probe()])
    trainer.train()
    assert len(frozen) == 3 and min(frozen) > 10_000  # the modules, tensors and arrow tables of the run
    assert gc.get_freeze_count() == 0
    frozen.clear()
    with pytest.raises(KeyboardInterrupt):
        build_trainer(*parse_config([*TINY, "--output_dir", str(tmp_path / "raises")]), callbacks=[Probe()]).train()
    assert frozen and gc.get_freeze_count() == 0


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

"""The trainer on the tiny SD generator (CPU, seconds per run): what a run writes, the NaN/inf guards, seeding, the
SDPO safeguard, precision and memory options, loading in workers, subject-wise units."""

import copy
import json
import math
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
from transformers import TrainerCallback

import focusdpo.training.trainer
from focusdpo.commands import main as cli
from focusdpo.commands.train import main
from focusdpo.config.recipe import parse_config
from focusdpo.config.training import LossConfig
from focusdpo.data.load import load_pairs
from focusdpo.errors import NonFiniteLossError, PairDataError
from focusdpo.models.base import LORA_WEIGHTS_NAME
from focusdpo.models.tiny import tiny_sd_pipeline
from focusdpo.training.trainer import FocusDPOTrainer, MetricsFileCallback, build_trainer, winner_drift_growing

from conftest import FAST_ARGS, REPO, embed_latents, losses_by_step, read_metrics, step_losses, tiny_argv


@pytest.mark.e2e
def test_embedded_default_writes_lora_config_metrics_and_samples(tmp_path):
    main(tiny_argv(tmp_path))
    for name in ("pytorch_lora_weights.safetensors", "config.yaml", "metrics.jsonl", "samples_before_after.png"):
        assert (tmp_path / name).is_file(), name
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / ".staging").exists()
    logs = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # fresh LoRA: policy == reference
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "mse/policy_w",
                 "mse/policy_l", "mse/ref_w", "mse/ref_l"):
        assert name in logs[0], name
    assert any(k.startswith("rewards/margins_u") for k in logs[0])
    assert "dpo/beta" not in logs[0] and not list(tmp_path.glob("checkpoint-*/auto_beta.json"))  # automatic β off


@pytest.mark.e2e
def test_saved_lora_loads_into_the_base_pipeline(tmp_path):
    # alpha != rank: the saved adapter metadata must carry the scale
    trainer = main(tiny_argv(tmp_path, "--sample_every_run", "false", "--lora_alpha", "16"))
    unet = trainer.backbone.denoiser.eval()
    pipe = tiny_sd_pipeline(seed=0)  # the same base weights the run started from
    x, t, text = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 7, 32)
    base = pipe.unet(x, t, text).sample
    pipe.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        loaded, trained = pipe.unet(x, t, text).sample, unet(x, t, text).sample
    assert not torch.allclose(base, trained)  # the LoRA learned something
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-6)


def test_metrics_jsonl_holds_strict_json(tmp_path):
    from transformers import TrainerState

    args = type("Args", (), {"output_dir": str(tmp_path)})()
    MetricsFileCallback().on_log(args, TrainerState(), None, logs={"loss": float("nan"), "grad_norm": float("inf"),
                                                                   "learning_rate": 0.1})
    record = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert record["loss"] is None and record["non_finite"] == {"loss": "nan", "grad_norm": "inf"}


def test_resolved_config_round_trips_dict_list_and_enum_fields_and_drops_tokens(tmp_path):
    from focusdpo.config.recipe import config_fields
    from focusdpo.training.trainer import write_resolved_config

    configs = parse_config(["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "--lr_scheduler_type",
                            "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr": 1e-6}', "--optim_args", "a=1",
                            "--debug", "underflow_overflow", "--report_to", "tensorboard", "--include_for_metrics",
                            "inputs", "--lora_target_modules", "to_q", "to_k", "--text_encoder_out_layers", "3", "5",
                            "--flow_shift_mode", "static", "--flow_shift", "3.0", "--hub_token", "SECRET-TOKEN",
                            "--accelerator_config",
                            '{"split_batches": true}'])
    write_resolved_config(tmp_path / "config.yaml", configs)
    assert "SECRET-TOKEN" not in (tmp_path / "config.yaml").read_text()
    again = config_fields(*parse_config(["--config", str(tmp_path / "config.yaml")]))
    written = config_fields(*configs)
    assert {k: (written[k], again[k]) for k in written if written[k] != again[k]} == {}
    assert again["accelerator_config"]["split_batches"] is True and again["lr_scheduler_kwargs"] == {"min_lr": 1e-6}


# ---- NaN and inf guards ----------------------------------------------------------------------------------------------
class PoisonBetaAt(TrainerCallback):
    """Make the loss NaN from ``step`` on, without touching the weights."""

    def __init__(self, trainer, step):
        self.trainer, self.step = trainer, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.trainer.loss_config.beta = float("nan")


@pytest.mark.e2e
def test_nan_loss_stops_with_step_pairs_and_last_good_checkpoint(tmp_path):
    trainer = build_trainer(*parse_config(tiny_argv(tmp_path, "--save_steps", "100")))
    trainer.add_callback(PoisonBetaAt(trainer, 3))
    with pytest.raises(NonFiniteLossError, match=r"at step 3 .*pairs \['toy-") as err:
        trainer.train()
    assert "resume_from_checkpoint" in str(err.value)
    saved = tmp_path / "checkpoint-3" / "pytorch_lora_weights.safetensors"
    assert saved.is_file()
    lora = {k: v.clone() for k, v in trainer.backbone.lora_state_dict("dpo").items()}
    trainer.backbone.load_lora(saved.parent, "dpo")  # the checkpoint holds the weights of step 3
    for key, value in trainer.backbone.lora_state_dict("dpo").items():
        assert torch.equal(value, lora[key]) and torch.isfinite(value).all()


@pytest.mark.e2e
def test_nan_loss_skip_policy_keeps_training_without_learning_from_it(tmp_path):
    trainer = build_trainer(*parse_config(tiny_argv(tmp_path, "--nan_policy", "skip", "--save_steps", "100")))
    trainer.add_callback(PoisonBetaAt(trainer, 2))
    trainer.train()
    assert trainer.state.global_step == 4
    # a NaN loss that reached backward would have made every LoRA weight NaN
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.state.log_history[-1]["train_loss"] == trainer.state.log_history[-1]["train_loss"]


FAST = ("--lambda_structure", "0", "--lambda_detail", "0", "--sample_every_run", "false")


def lora_params(trainer):
    return {n: p for n, p in trainer.backbone.denoiser.named_parameters() if p.requires_grad}


class AtStep(TrainerCallback):
    """Run ``begin(trainer)`` when step ``step`` begins and ``end(trainer)`` when it ends."""

    def __init__(self, trainer, step, begin=None, end=None):
        self.trainer, self.step, self.begin, self.end = trainer, step, begin, end

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step and self.begin:
            self.begin(self.trainer)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step + 1 and self.end:
            self.end(self.trainer)


class Snapshot:
    """Weights, optimizer state and LR-scheduler state at the start of a step; compared at its end."""

    def take(self, trainer):
        self.weights = {n: p.detach().clone() for n, p in lora_params(trainer).items()}
        self.optimizer = copy.deepcopy(trainer.optimizer.state_dict())
        self.scheduler = copy.deepcopy(trainer.lr_scheduler.state_dict())
        self.lr = [g["lr"] for g in trainer.optimizer.param_groups]

    def compare(self, trainer):
        for name, param in lora_params(trainer).items():
            assert torch.equal(param, self.weights[name]), name
        after = trainer.optimizer.state_dict()
        assert after["param_groups"] == self.optimizer["param_groups"]
        assert after["state"].keys() == self.optimizer["state"].keys()
        for key, state in after["state"].items():
            for field, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(self.optimizer["state"][key][field]))
        assert trainer.lr_scheduler.state_dict() == self.scheduler
        assert [g["lr"] for g in trainer.optimizer.param_groups] == self.lr
        self.compared = True


def poison_beta(trainer):
    trainer.loss_config.beta = float("nan")


def heal_beta(trainer):
    trainer.loss_config.beta = 5000.0


def run_with_skipped_step(out, step, poison, heal=None):
    trainer = build_trainer(*parse_config(tiny_argv(out, *FAST, "--nan_policy", "skip", "--save_steps", "100",
                                                    "--warmup_steps", "2", "--weight_decay", "0.1")))
    snap = Snapshot()
    trainer.add_callback(AtStep(trainer, step, begin=lambda t: (snap.take(t), poison(t)),
                                end=lambda t: (snap.compare(t), heal and heal(t))))
    trainer.train()
    assert getattr(snap, "compared", False)
    return trainer


@pytest.mark.e2e
def test_a_skipped_nan_loss_step_changes_no_weight_optimizer_or_scheduler_state(tmp_path):
    trainer = run_with_skipped_step(tmp_path, 2, poison_beta, heal_beta)
    logs = read_metrics(tmp_path)
    assert [m["skipped_steps"] for m in logs if "skipped_steps" in m] == [0, 0, 1, 1]
    kept = [m["loss"] for m in logs if "loss" in m and m["step"] != 3]
    assert len(kept) == 3 and all(math.isfinite(v) and v > 0 for v in kept)
    assert not any(m["step"] == 3 and "loss" in m for m in logs)  # the skipped step logs no loss of 0
    assert trainer.state.log_history[-1]["train_loss"] == pytest.approx(sum(kept) / 3, rel=1e-6)
    assert all(math.isfinite(m.get("rewards/margins", 0.0)) for m in logs)


@pytest.mark.e2e
def test_a_skipped_step_leaves_the_weight_average_unchanged(tmp_path):
    trainer = build_trainer(*parse_config(tiny_argv(tmp_path, *FAST, "--nan_policy", "skip", "--save_steps", "100",
                                                    "--ema_decay", "0.9")))
    seen = {}

    def average(t):
        return [p.clone() for p in t.weight_average.ema.shadow_params], t.weight_average.ema.optimization_step

    trainer.add_callback(AtStep(trainer, 2, begin=lambda t: (seen.update(before=average(t)), poison_beta(t)),
                                end=lambda t: (seen.update(after=average(t)), heal_beta(t))))
    trainer.train()
    (before, count_before), (after, count_after) = seen["before"], seen["after"]
    assert count_after == count_before == 2
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert trainer.weight_average.ema.optimization_step == 3  # 4 steps, 1 skipped


def infinite_gradient(trainer):
    param = next(iter(lora_params(trainer).values()))
    trainer.hook = param.register_hook(lambda grad: grad * float("inf"))


def remove_hook(trainer):
    trainer.hook.remove()


@pytest.mark.e2e
def test_an_inf_gradient_under_a_finite_loss_is_skipped(tmp_path):
    trainer = run_with_skipped_step(tmp_path, 2, infinite_gradient, remove_hook)
    assert all(torch.isfinite(p).all() for p in lora_params(trainer).values())
    assert [m["skipped_steps"] for m in read_metrics(tmp_path) if "skipped_steps" in m][-1] == 1


@pytest.mark.e2e
def test_an_inf_gradient_under_a_finite_loss_stops_with_the_last_good_state(tmp_path):
    trainer = build_trainer(*parse_config(tiny_argv(tmp_path, *FAST, "--save_steps", "100")))
    trainer.add_callback(AtStep(trainer, 2, begin=infinite_gradient))
    with pytest.raises(NonFiniteLossError, match=r"gradient norm is (inf|nan) at step 2 .*pairs \['toy-"):
        trainer.train()
    live = {k: v.clone() for k, v in trainer.backbone.lora_state_dict("dpo").items()}
    assert all(torch.isfinite(v).all() for v in live.values())
    trainer.backbone.load_lora(tmp_path / "checkpoint-2", "dpo")
    for key, value in trainer.backbone.lora_state_dict("dpo").items():
        assert torch.equal(value, live[key])


@pytest.mark.e2e
def test_non_finite_weights_are_never_saved_as_the_last_good_state(tmp_path):
    def break_weights(trainer):
        with torch.no_grad():
            next(iter(lora_params(trainer).values())).fill_(float("nan"))

    trainer = build_trainer(*parse_config(tiny_argv(tmp_path, *FAST, "--save_steps", "2")))
    trainer.add_callback(AtStep(trainer, 3, begin=break_weights))
    with pytest.raises(NonFiniteLossError, match="no longer finite.*checkpoint-2") as err:
        trainer.train()
    assert "checkpoint-3" not in str(err.value) and not (tmp_path / "checkpoint-3").exists()


# ---- seeding ---------------------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_same_seed_same_lora_from_a_saved_pipeline_in_separate_processes(tmp_path):
    from focusdpo.models.tiny import tiny_sd_pipeline

    tiny_sd_pipeline(seed=0).save_pretrained(tmp_path / "pipe")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    argv = [*FAST, "--max_steps", "3", "--save_steps", "100", "--toy_num_pairs", "4",
            "--pretrained_path", str(tmp_path / "pipe")]
    procs = {name: subprocess.Popen([sys.executable, "-m", "focusdpo.train", *tiny_argv(tmp_path / name, *argv)],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name in ("a", "b")}
    for proc in procs.values():
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
    # the whole file's bytes, header included: its LoraConfig lists target_modules, a set in peft (hash-seed order)
    lora = {name: (tmp_path / name / LORA_WEIGHTS_NAME).read_bytes() for name in procs}
    losses = {name: [m["loss"] for m in read_metrics(tmp_path / name) if "loss" in m] for name in procs}
    assert lora["a"] == lora["b"] and losses["a"] == losses["b"] and len(losses["a"]) == 3
    # a different seed draws a different LoRA, whatever state the global RNG was left in
    initial = {}
    for seed in (0, 1):
        torch.manual_seed(123)
        trainer = build_trainer(*parse_config(tiny_argv(tmp_path / f"s{seed}", *argv, "--seed", str(seed))))
        initial[seed] = {n: p.detach().clone() for n, p in lora_params(trainer).items() if "lora_A" in n}
    assert not all(torch.equal(initial[0][n], initial[1][n]) for n in initial[0])


# ---- winner-preserving safeguard and winner drift --------------------------------------------------------------------
@pytest.mark.e2e
def test_trainer_with_the_safeguard_runs_and_logs_the_scale(tmp_path):
    trainer = build_trainer(*parse_config(tiny_argv(tmp_path, *FAST, "--sdpo_mu", "0.1", "--max_steps", "2",
                                                    "--save_steps", "100")))
    trainer.train()
    logs = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(0 <= m["sdpo/loser_scale"] <= 1 for m in logs)


def test_winner_drift_growing_by_hand():
    assert winner_drift_growing([0.1, 0.2, 0.3, 0.4], 4)
    assert not winner_drift_growing([0.4, 0.3, 0.2, 0.1], 4)  # positive but shrinking
    assert not winner_drift_growing([-0.1, 0.2, 0.3, 0.4], 4)  # not positive throughout
    assert not winner_drift_growing([0.1, 0.2, 0.3], 4)  # window not full yet
    assert not winner_drift_growing([0.1, 0.2, 0.3, 0.4], 0)  # switched off


def test_winner_drift_warns_once_naming_the_remedy():
    fake = types.SimpleNamespace(_drift=[], _drift_warned=False, loss_config=LossConfig(winner_drift_window=3),
                                 state=types.SimpleNamespace(global_step=7), is_world_process_zero=lambda: True)
    with pytest.warns(UserWarning, match="sdpo_mu") as record:
        for value in (0.1, 0.2, 0.3, 0.4, 0.5):
            FocusDPOTrainer.watch_winner_drift(fake, value)
    assert len(record) == 1


# ---- precision, memory and throughput options ------------------------------------------------------------------------
@pytest.mark.e2e
def test_bf16_keeps_a_half_precision_base_and_fp32_lora(tmp_path):
    trainer = main(tiny_argv(tmp_path, "--bf16", "true", "--use_cpu", "true", "--max_steps", "2",
                             "--sample_every_run", "false"))
    dtypes = {name: p.dtype for name, p in trainer.backbone.denoiser.named_parameters()}
    assert {d for n, d in dtypes.items() if ".dpo." in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora" not in n} == {torch.bfloat16}
    assert losses_by_step(tmp_path)[1] == pytest.approx(math.log(2), abs=1e-6)  # step 0: policy == reference in bf16


@pytest.mark.e2e
def test_activation_checkpointing_goes_through_diffusers(tmp_path):
    trainer = main(tiny_argv(tmp_path, "--activation_checkpointing", "true", "--max_steps", "1",
                             "--sample_every_run", "false"))
    assert trainer.backbone.denoiser.is_gradient_checkpointing


@pytest.mark.e2e
def test_lora_saved_from_a_gathered_state_dict_equals_the_live_one(tmp_path):
    """The FSDP/ZeRO-3 path: the Trainer hands ``_save`` the full state dict of the wrapped model."""
    from safetensors.torch import load_file

    trainer = main(tiny_argv(tmp_path / "run", "--max_steps", "1", "--sample_every_run", "false"))
    trainer._save(str(tmp_path / "gathered"), state_dict=trainer.model.state_dict())
    live, gathered = (load_file(str(p / "pytorch_lora_weights.safetensors")) for p in (tmp_path / "run",
                                                                                       tmp_path / "gathered"))
    assert live.keys() == gathered.keys() and all(torch.equal(live[k], gathered[k]) for k in live)


@pytest.mark.e2e
def test_full_fine_tune_with_a_frozen_copy_reference(tmp_path):
    trainer = main(tiny_argv(tmp_path, "--lora_rank", "0", "--reference_mode", "frozen_copy", "--max_steps", "2",
                             "--sample_every_run", "false", "--learning_rate", "1e-4"))
    assert losses_by_step(tmp_path)[1] == pytest.approx(math.log(2), abs=1e-6)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    moved = [not torch.equal(p, q) for p, q in zip(trainer.backbone.denoiser.parameters(),
                                                   trainer.frozen_copy.parameters())]
    assert any(moved) and all(not p.requires_grad for p in trainer.frozen_copy.parameters())


@pytest.mark.e2e
def test_training_with_offloaded_text_encoders(tmp_path):
    trainer = main(tiny_argv(tmp_path, "--offload_text_encoders", "true", "--max_steps", "2"))
    assert trainer.backbone.offload_text_encoders and (tmp_path / "samples_before_after.png").is_file()


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["sd", "flux2"])
def test_a_run_on_cached_encoders_decodes_no_image_and_matches_the_decoding_run(family, tmp_path, monkeypatch):
    import focusdpo.data.collate
    from focusdpo.data.load import with_array_format

    args = [*FAST_ARGS, "--family", family, "--dataset", embed_latents(tmp_path, [*FAST_ARGS, "--family", family])]
    decoding = build_trainer(*parse_config([*args, "--output_dir", str(tmp_path / "decoding")]))
    assert decoding.pixels is False
    decoding.data_collator.pixels = True  # as before: every image decoded, each batch carrying pixel_values
    decoding.train_dataset = with_array_format(decoding.pairs)  # and the image columns read out of arrow for it
    decoding.train()
    monkeypatch.setattr(focusdpo.data.collate, "open_image", lambda *a, **k: pytest.fail("an image was decoded"))
    build_trainer(*parse_config([*args, "--output_dir", str(tmp_path / "cached")])).train()
    assert step_losses(tmp_path / "cached") == step_losses(tmp_path / "decoding")  # exact: the pixels were unused


@pytest.mark.e2e
def test_loading_in_worker_processes_trains_exactly_like_loading_in_the_trainer(tmp_path):
    """``dataloader_num_workers`` moves fetching and collating (and image decoding) out of the training process;
    batches, noise and so losses are unchanged."""
    main([*FAST_ARGS, "--output_dir", str(tmp_path / "inline")])
    main([*FAST_ARGS, "--output_dir", str(tmp_path / "workers"), "--dataloader_num_workers", "2",
          "--dataloader_persistent_workers", "true"])
    inline = step_losses(tmp_path / "inline")
    assert inline[0] == pytest.approx(math.log(2), abs=1e-6)
    assert step_losses(tmp_path / "workers") == inline


@pytest.mark.e2e
def test_channels_last_trains_like_the_default_layout(tmp_path):
    main([*FAST_ARGS, "--output_dir", str(tmp_path / "default")])
    trainer = main([*FAST_ARGS, "--output_dir", str(tmp_path / "nhwc"), "--channels_last", "true"])
    conv = trainer.backbone.denoiser.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    default, nhwc = step_losses(tmp_path / "default"), step_losses(tmp_path / "nhwc")
    assert nhwc[0] == pytest.approx(math.log(2), abs=1e-6)
    assert nhwc == pytest.approx(default, rel=1e-3)  # NHWC kernels round differently; β = 5000 amplifies it


def c_compiler() -> str | None:
    return next((cc for cc in ("cc", "gcc", "clang", "g++") if shutil.which(cc)), None)


@pytest.mark.e2e
@pytest.mark.skipif(c_compiler() is None, reason="inductor needs a C/C++ compiler on the CPU; none found on PATH")
@pytest.mark.skipif(os.environ.get("FOCUSDPO_COMPILE_TESTS") != "1",
                    reason="inductor takes 5-10 min to compile the tiny UNet on 2 shared CPU cores (policy, reference "
                           "and backward graphs): set FOCUSDPO_COMPILE_TESTS=1 to run")
@pytest.mark.parametrize("family", ["sd", "flux2"])
def test_torch_compile_compiles_the_denoiser_in_place_and_starts_from_ln2(family, tmp_path):
    out = tmp_path / "compiled"
    trainer = main([*FAST_ARGS, "--family", family, "--max_steps", "1", "--output_dir", str(out),
                    "--torch_compile", "true"])
    assert trainer.backbone.denoiser._compiled_call_impl is not None  # nn.Module.compile: policy and reference
    assert not hasattr(trainer.model_wrapped, "_orig_mod")  # the Trainer did not compile the PolicyModel on top
    # Not bit-exact: inductor compiles the no_grad reference as an inference graph and the policy as a training
    # graph, which round differently (max |Δ| ≈ 2e-6 on the tiny UNet); β = 5000 turns that into ~1e-4 of loss.
    assert step_losses(out)[0] == pytest.approx(math.log(2), abs=2e-4)


# ---- subject-wise preferences in training ----------------------------------------------------------------------------
TINY = ["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "--toy_num_pairs", "4", "--max_steps", "2",
        "--logging_steps", "1", "--save_steps", "100", "--sample_every_run", "false", "--report_to", "none",
        "--preference_unit", "subject"]


def saved_pairs(tmp_path, edit):
    """The toy pairs with ``edit(rows)`` applied, saved as a pair folder."""
    from datasets import Dataset, Features

    pairs = load_pairs("toy", toy_num_pairs=4, resolution=32)
    rows = edit([pairs[i] for i in range(len(pairs))])
    features = Features({k: v for k, v in pairs.features.items() if k in rows[0]})
    Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "pairs"))
    return str(tmp_path / "pairs")


@pytest.mark.parametrize("edit, message", [
    (lambda rows: [{**r, "subject_scores": [s[:-1] for s in r["subject_scores"]]} if i == 2 else r
                   for i, r in enumerate(rows)], r"pair toy-00002: subject_scores must be two rows .* of \d finite"),
    (lambda rows: [{**r, "subject_scores": [[math.nan] * len(r["references"])] * 2} if i == 1 else r
                   for i, r in enumerate(rows)], r"pair toy-00001: subject_scores must be"),
    (lambda rows: [{**r, "references": [], "reference_masks": [], "subject_scores": [[], []]} if i == 3 else r
                   for i, r in enumerate(rows)], "pair toy-00003 has no references: preference_unit: subject"),
    (lambda rows: [{k: v for k, v in r.items() if k != "subject_scores"} for r in rows], "needs per-subject scores"),
])
def test_bad_subject_data_is_refused_before_the_model_loads(edit, message, tmp_path, monkeypatch):
    monkeypatch.setattr(focusdpo.training.trainer, "load_backbone", None)  # a model load would raise TypeError
    dataset = saved_pairs(tmp_path, edit)
    with pytest.raises(PairDataError, match=message):
        build_trainer(*parse_config([*TINY, "--dataset", dataset, "--output_dir", str(tmp_path / "run")]))


@pytest.mark.e2e
def test_a_focus_cache_without_subject_masks_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    image_unit = [a for a in TINY if a not in ("--preference_unit", "subject")]
    cli(["focus", "--out", str(tmp_path / "cached"), "--device", "cpu", *image_unit])
    monkeypatch.setattr(focusdpo.training.trainer, "load_backbone", None)
    with pytest.raises(PairDataError, match="re-run `focusdpo focus` with this recipe"):
        build_trainer(*parse_config([*TINY, "--dataset", str(tmp_path / "cached"), "--output_dir", str(tmp_path)]))


@pytest.mark.e2e
def test_the_subject_unit_trains_from_ln2_and_cached_masks_equal_masks_made_on_the_fly(tmp_path):
    """Step 0: every subject's Δ is 0, so each labelled subject costs ln 2 and the image term ω·ln 2."""
    live = build_trainer(*parse_config([*TINY, "--output_dir", str(tmp_path / "live")]))
    live.train()
    omega = live.loss_config.subject_image_weight
    losses = step_losses(tmp_path / "live")
    assert losses[0] == pytest.approx(math.log(2) * (1 + omega), abs=1e-5)
    assert losses[1] != pytest.approx(losses[0], abs=1e-6)
    cli(["focus", "--out", str(tmp_path / "cached"), "--device", "cpu", *TINY])
    assert "subject_masks" in load_pairs(str(tmp_path / "cached")).column_names
    cached = build_trainer(*parse_config([*TINY, "--dataset", str(tmp_path / "cached"),
                                          "--output_dir", str(tmp_path / "run")]))
    cached.train()
    assert step_losses(tmp_path / "run") == pytest.approx(losses, rel=1e-3)

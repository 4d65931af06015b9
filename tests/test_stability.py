"""Stable, reproducible training: seeding, the NaN/inf guards, the winner-preserving safeguard, pair weights
and soft labels, and the noise conventions users bring from diffusers."""

import copy
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from diffusers.training_utils import compute_density_for_timestep_sampling
from transformers import TrainerCallback

from focusdpo.errors import ConfigError
from focusdpo.config.training import LossConfig, ModelConfig

from focusdpo.config.recipe import parse_config
from focusdpo.data.collate import PairCollator
from focusdpo.errors import PairDataError
from focusdpo.losses import (diffusion_dpo_loss, error_output_gradient, scale_loser_gradient, sdpo_loser_scale,
                             weighted_error)
from focusdpo.models import load_backbone
from focusdpo.models.base import LORA_WEIGHTS_NAME
from focusdpo.training.trainer import winner_drift_growing
from focusdpo.training.trainer import FocusDPOTrainer, build_trainer
from focusdpo.errors import NonFiniteLossError

from conftest import REPO
from test_train import read_metrics, tiny_argv

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


def test_a_skipped_nan_loss_step_changes_no_weight_optimizer_or_scheduler_state(tmp_path):
    trainer = run_with_skipped_step(tmp_path, 2, poison_beta, heal_beta)
    logs = read_metrics(tmp_path)
    assert [m["skipped_steps"] for m in logs if "skipped_steps" in m] == [0, 0, 1, 1]
    kept = [m["loss"] for m in logs if "loss" in m and m["step"] != 3]
    assert len(kept) == 3 and all(math.isfinite(v) and v > 0 for v in kept)
    assert not any(m["step"] == 3 and "loss" in m for m in logs)  # the skipped step logs no loss of 0
    assert trainer.state.log_history[-1]["train_loss"] == pytest.approx(sum(kept) / 3, rel=1e-6)
    assert all(math.isfinite(m.get("rewards/margins", 0.0)) for m in logs)


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


def test_an_inf_gradient_under_a_finite_loss_is_skipped(tmp_path):
    trainer = run_with_skipped_step(tmp_path, 2, infinite_gradient, remove_hook)
    assert all(torch.isfinite(p).all() for p in lora_params(trainer).values())
    assert [m["skipped_steps"] for m in read_metrics(tmp_path) if "skipped_steps" in m][-1] == 1


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


def test_non_finite_weights_are_never_saved_as_the_last_good_state(tmp_path):
    def break_weights(trainer):
        with torch.no_grad():
            next(iter(lora_params(trainer).values())).fill_(float("nan"))

    trainer = build_trainer(*parse_config(tiny_argv(tmp_path, *FAST, "--save_steps", "2")))
    trainer.add_callback(AtStep(trainer, 3, begin=break_weights))
    with pytest.raises(NonFiniteLossError, match="no longer finite.*checkpoint-2") as err:
        trainer.train()
    assert "checkpoint-3" not in str(err.value) and not (tmp_path / "checkpoint-3").exists()


# ---- seeding ---------------------------------------------------------------------------------------------
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


# ---- winner-preserving safeguard (Diffusion-SDPO) ----------------------------------------------------------
def test_error_output_gradient_matches_autograd():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 3, 2, 5, generator=g, requires_grad=True), torch.randn(4, 3, 2, 5, generator=g)
    for weights in (None, torch.rand(4, 2, 5, generator=g)):
        (grad,) = torch.autograd.grad(weighted_error(pred, target, weights).sum(), pred)
        torch.testing.assert_close(error_output_gradient(pred, target, weights), grad)


def test_sdpo_loser_scale_by_hand():
    # One value per sample (C = h = w = 1): g = 2·(pred − target).
    pred = torch.tensor([1.0, 1.0, 1.0, 3.0, -1.0, 0.5]).view(6, 1, 1, 1)  # winners 0..2, losers 3..5
    target = torch.zeros(6, 1, 1, 1)
    # pair 0: g_w = 2, g_l = 6, dot 12 > 0: λ = 0.9·4/12 = 0.3; pair 1: dot < 0: 1; pair 2: 0.9·4/2 > 1: 1
    scale = sdpo_loser_scale(pred, target, None, mu=0.1)
    torch.testing.assert_close(scale, torch.tensor([0.3, 1.0, 1.0]))


def test_safeguard_changes_gradients_only_and_off_is_bit_identical():
    pol, ref = torch.tensor([0.3, 0.2, 0.5, 0.1], requires_grad=True), torch.tensor([0.3, 0.2, 0.4, 0.3])
    plain, _ = diffusion_dpo_loss(pol, ref, 10.0)
    guarded, _ = diffusion_dpo_loss(scale_loser_gradient(pol, torch.tensor([0.5, 1.0])), ref, 10.0)
    assert torch.equal(plain, guarded)  # the forward loss is unchanged
    (g_plain,) = torch.autograd.grad(plain, pol)
    (g_guarded,) = torch.autograd.grad(guarded, pol)
    torch.testing.assert_close(g_guarded, g_plain * torch.tensor([1.0, 1.0, 0.5, 1.0]), rtol=0, atol=0)
    ones, _ = diffusion_dpo_loss(scale_loser_gradient(pol, torch.ones(2)), ref, 10.0)
    assert torch.equal(torch.autograd.grad(ones, pol)[0], g_plain)


def test_safeguard_keeps_the_winner_error_from_rising_after_an_sgd_step():
    # A shared parameter θ predicts both images (pred = θ + offset): the loser's gradient points along the
    # winner's and is larger, so plain DPO's step raises the winner's error.
    theta0 = torch.tensor([[[[0.0, 0.0]]]])
    offsets = torch.tensor([[[[0.0, 0.0]]], [[[0.0, 0.0]]]])
    target = torch.tensor([[[[-1.0, 0.0]]], [[[-3.0, 0.5]]]])  # [winner; loser]
    ref_err = weighted_error(theta0 + offsets, target).detach()

    def winner_error_after_step(mu):
        theta = theta0.clone().requires_grad_(True)
        pred = theta + offsets
        err = weighted_error(pred, target)
        if mu is not None:
            err = scale_loser_gradient(err, sdpo_loser_scale(pred, target, None, mu))
        loss, _ = diffusion_dpo_loss(err, ref_err, beta=1.0)
        loss.backward()
        with torch.no_grad():
            return weighted_error(theta - 1e-3 * theta.grad + offsets, target)[0].item()

    before = weighted_error(theta0 + offsets, target)[0].item()
    assert winner_error_after_step(None) > before  # the failure users report
    assert winner_error_after_step(0.1) < before  # first order: the winner's error falls (margin μ)
    assert winner_error_after_step(0.0) <= before + 1e-8


def test_trainer_with_the_safeguard_runs_and_logs_the_scale(tmp_path):
    trainer = build_trainer(*parse_config(tiny_argv(tmp_path, *FAST, "--sdpo_mu", "0.1", "--max_steps", "2",
                                                    "--save_steps", "100")))
    trainer.train()
    logs = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(0 <= m["sdpo/loser_scale"] <= 1 for m in logs)


# ---- pair weights and soft labels ----------------------------------------------------------------------
POLICY = torch.tensor([0.0, 1.0, 0.5, 0.0])  # [w0, w1; l0, l1]
REF = torch.tensor([0.5, 0.0, 0.0, 1.0])


def test_pair_weights_and_soft_labels_by_hand():
    # inside = −½·β·[(pw − rw) − (pl − rl)] with β = 2: pair 0: −(−0.5 − 0.5) = 1; pair 1: −(1 + 1) = −2
    weight, pref = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.75])
    loss, _ = diffusion_dpo_loss(POLICY, REF, 2.0, pair_weight=weight, preference=pref)
    expected = (2.0 * -math.log(1 / (1 + math.exp(-1.0))) + 0.5 * -math.log(1 / (1 + math.exp(1.0)))) / 2
    assert loss.item() == pytest.approx(expected)
    plain, _ = diffusion_dpo_loss(POLICY, REF, 2.0)
    assert torch.equal(diffusion_dpo_loss(POLICY, REF, 2.0, pair_weight=torch.ones(2),
                                          preference=torch.ones(2))[0], plain)


def test_preference_one_half_gives_no_gradient():
    pol = POLICY.clone().requires_grad_(True)
    loss, _ = diffusion_dpo_loss(pol, REF, 2.0, preference=torch.tensor([0.5, 0.5]))
    assert loss.item() == pytest.approx(math.log(2))
    assert torch.equal(torch.autograd.grad(loss, pol)[0], torch.zeros(4))


def test_collator_passes_optional_pair_columns():
    from test_data import png

    image = {"bytes": png("red", (16, 16)), "path": None}
    row = dict(pair_id="p", prompt="x", chosen=image, rejected=image, references=[], reference_masks=[],
               prior_mask=None)
    rows = [dict(row, pair_weight=2.0, preference=0.8, original_size=[64, 48], crop_top_left=None),
            dict(row, pair_weight=None, preference=1.0, original_size=[[20, 30], [40, 50]], crop_top_left=[1, 2])]
    batch = PairCollator(16)(rows)
    assert batch["pair_weight"].tolist() == [2.0, 1.0]
    assert batch["preference"].tolist() == pytest.approx([0.8, 1.0])
    assert batch["original_size"].tolist() == [[64, 48], [20, 30], [64, 48], [40, 50]]  # [winners; losers]
    assert batch["crop_top_left"].tolist() == [[0, 0], [1, 2], [0, 0], [1, 2]]
    assert "pair_weight" not in PairCollator(16)([row])
    with pytest.raises(PairDataError, match=r"pair p: preference=0.2 must be in \[0.5, 1.0\]"):
        PairCollator(16)([dict(row, preference=0.2)])


# ---- winner drift warning and config checks --------------------------------------------------------------
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


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type="hinge", label_smoothing=0.1), "no meaning for loss_type='hinge'"),
    (dict(loss_type="ipo", label_smoothing=0.1), "no meaning for loss_type='ipo'"),
    (dict(sdpo_mu=1.0), r"sdpo_mu=1.0 must be in \[0, 1\)"),
])
def test_loss_config_refuses_meaningless_combinations(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LossConfig(**kwargs)


def test_flow_shift_needs_static_mode():
    with pytest.raises(ConfigError, match="flow_shift=3.0 with flow_shift_mode='pipeline'"):
        ModelConfig(family="flux2", flow_shift=3.0)
    with pytest.raises(ConfigError, match="flow_shift=None with flow_shift_mode='static'"):
        ModelConfig(family="flux2", flow_shift_mode="static")
    assert ModelConfig(family="flux2", flow_shift_mode="static", flow_shift=3.0).adapter_options(1)["flow_shift"] == 3


# ---- noise conventions -------------------------------------------------------------------------------------
def test_ddpm_noise_level_is_the_flow_sigma_of_the_same_snr():
    backbone = load_backbone("sd")
    t = torch.tensor([0, 100, 500, 999])
    u = backbone.flow_equivalent_sigma(t).double()
    alpha_bar = backbone.noise_scheduler.alphas_cumprod[t].double()
    snr_ddpm = alpha_bar / (1 - alpha_bar)
    snr_flow = ((1 - u) / u) ** 2  # x_t = (1 − σ)·x0 + σ·ε
    torch.testing.assert_close(snr_flow, snr_ddpm, rtol=1e-5, atol=0)
    batch = {"pixel_values": torch.zeros(2, 3, 32, 32), "prompts": ["a"], "pair_ids": ["p"]}
    prepared = backbone.prepare(batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(prepared.noise_level, backbone.flow_equivalent_sigma(
        prepared.model_kwargs["timestep"]))


def test_flux2_pipeline_shift_matches_the_pipelines_inference_schedule():
    backbone = load_backbone("flux2")  # tiny FLUX.2 [klein]; its scheduler has use_dynamic_shifting
    steps, seq_len = 50, 64
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(backbone.pipeline.scheduler.config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(seq_len, steps))
    plain = torch.from_numpy(np.linspace(1.0, 1 / steps, steps)).float()
    torch.testing.assert_close(backbone.shift_sigmas(plain, seq_len), scheduler.sigmas[:-1])
    backbone.flow_shift_mode = "none"
    assert torch.equal(backbone.shift_sigmas(plain, seq_len), plain)


def test_logit_mean_follows_the_diffusers_training_scripts():
    # The diffusers flow scripts: u from compute_density_for_timestep_sampling indexes the (descending,
    # unshifted) training schedule; σ = sigmas[int(u·T)].
    backbone = load_backbone("flux2", flow_density="logit_normal", logit_mean=1.0, logit_std=0.5,
                             flow_shift_mode="none")
    u = compute_density_for_timestep_sampling("logit_normal", 2000, 1.0, 0.5,
                                              generator=torch.Generator().manual_seed(0))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    script_sigma = scheduler.sigmas[(u * 1000).long()]
    ours = backbone.sample_sigmas(2000, 64, torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, script_sigma, rtol=0, atol=1.01e-3)
    assert ours.mean() < 0.5  # a positive logit_mean favours low noise, as in diffusers recipes


def test_sdxl_keeps_a_force_upcast_vae_in_fp32_and_reads_size_columns():
    backbone = load_backbone("sdxl").to("cpu", torch.bfloat16)
    assert backbone.pipeline.vae.config.force_upcast and backbone.pipeline.vae.dtype == torch.float32
    assert backbone.pipeline.unet.dtype == torch.float32  # the trainable denoiser is cast elsewhere
    batch = {"pixel_values": torch.zeros(4, 3, 32, 32), "prompts": ["a", "b"], "pair_ids": ["p", "q"],
             "original_size": torch.tensor([[64, 48], [20, 30], [64, 48], [40, 50]]),
             "crop_top_left": torch.tensor([[0, 0], [1, 2], [0, 0], [3, 4]])}
    prepared = backbone.prepare(batch, torch.Generator().manual_seed(0))
    time_ids = prepared.model_kwargs["added_cond_kwargs"]["time_ids"]
    dim = backbone.pipeline.text_encoder_2.config.projection_dim
    for row, (size, crop) in enumerate(zip(batch["original_size"].tolist(), batch["crop_top_left"].tolist())):
        expected = backbone.pipeline._get_add_time_ids(tuple(size), tuple(crop), (32, 32), dtype=time_ids.dtype,
                                                       text_encoder_projection_dim=dim)
        torch.testing.assert_close(time_ids[row], expected[0])
    del batch["original_size"], batch["crop_top_left"]
    plain = backbone.prepare(batch, torch.Generator().manual_seed(0)).model_kwargs["added_cond_kwargs"]["time_ids"]
    assert plain.tolist() == [[32, 32, 0, 0, 32, 32]] * 4

"""End-to-end behaviour of the trainer on the tiny SD generator (CPU, seconds per run)."""

import json
import math

import pytest
import torch
from transformers import TrainerCallback

from focusdpo.config.recipe import parse_config
from focusdpo.models.tiny import tiny_sd_pipeline
from focusdpo.errors import NonFiniteLossError
from focusdpo.training.trainer import build_trainer
from focusdpo.commands.train import main

from conftest import REPO


def tiny_argv(out, *extra):
    return ["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "--output_dir", str(out), "--max_steps", "4",
            "--toy_num_pairs", "8", "--save_steps", "2", "--logging_steps", "1", "--sample_steps", "2", *extra]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


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


class CrashAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


def losses(out):
    return {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}


def full_and_resumed_runs(tmp_path, argv: list[str], saved: str):
    """An uninterrupted 6-step run, and one killed at step 4 (``saved`` checked in checkpoint-3) then resumed."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    main(tiny_argv(full, *argv))
    trainer = build_trainer(*parse_config(tiny_argv(killed, *argv)), callbacks=[CrashAt(4)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (killed / "checkpoint-3" / saved).is_file()
    main(tiny_argv(killed, *argv, "--resume_from_checkpoint", str(killed / "checkpoint-3")))
    return full, killed


def test_resume_after_a_kill_continues_the_loss_trajectory(tmp_path):
    argv = ["--max_steps", "6", "--save_steps", "3", "--sample_every_run", "false"]
    full, killed = full_and_resumed_runs(tmp_path, argv, "optimizer.pt")
    expected, got = losses(full), losses(killed)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


class PoisonBetaAt(TrainerCallback):
    """Make the loss NaN from ``step`` on, without touching the weights."""

    def __init__(self, trainer, step):
        self.trainer, self.step = trainer, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.trainer.loss_config.beta = float("nan")


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


def test_nan_loss_skip_policy_keeps_training_without_learning_from_it(tmp_path):
    trainer = build_trainer(*parse_config(tiny_argv(tmp_path, "--nan_policy", "skip", "--save_steps", "100")))
    trainer.add_callback(PoisonBetaAt(trainer, 2))
    trainer.train()
    assert trainer.state.global_step == 4
    # a NaN loss that reached backward would have made every LoRA weight NaN
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.state.log_history[-1]["train_loss"] == trainer.state.log_history[-1]["train_loss"]


def test_bf16_keeps_a_half_precision_base_and_fp32_lora(tmp_path):
    trainer = main(tiny_argv(tmp_path, "--bf16", "true", "--use_cpu", "true", "--max_steps", "2",
                             "--sample_every_run", "false"))
    dtypes = {name: p.dtype for name, p in trainer.backbone.denoiser.named_parameters()}
    assert {d for n, d in dtypes.items() if ".dpo." in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora" not in n} == {torch.bfloat16}
    assert losses(tmp_path)[1] == pytest.approx(math.log(2), abs=1e-6)  # step 0: policy == reference in bf16


def test_activation_checkpointing_goes_through_diffusers(tmp_path):
    trainer = main(tiny_argv(tmp_path, "--activation_checkpointing", "true", "--max_steps", "1",
                             "--sample_every_run", "false"))
    assert trainer.backbone.denoiser.is_gradient_checkpointing


def test_lora_saved_from_a_gathered_state_dict_equals_the_live_one(tmp_path):
    """The FSDP/ZeRO-3 path: the Trainer hands ``_save`` the full state dict of the wrapped model."""
    from safetensors.torch import load_file

    trainer = main(tiny_argv(tmp_path / "run", "--max_steps", "1", "--sample_every_run", "false"))
    trainer._save(str(tmp_path / "gathered"), state_dict=trainer.model.state_dict())
    live, gathered = (load_file(str(p / "pytorch_lora_weights.safetensors")) for p in (tmp_path / "run",
                                                                                       tmp_path / "gathered"))
    assert live.keys() == gathered.keys() and all(torch.equal(live[k], gathered[k]) for k in live)


def test_full_fine_tune_with_a_frozen_copy_reference(tmp_path):
    trainer = main(tiny_argv(tmp_path, "--lora_rank", "0", "--reference_mode", "frozen_copy", "--max_steps", "2",
                             "--sample_every_run", "false", "--learning_rate", "1e-4"))
    assert losses(tmp_path)[1] == pytest.approx(math.log(2), abs=1e-6)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    moved = [not torch.equal(p, q) for p, q in zip(trainer.backbone.denoiser.parameters(),
                                                   trainer.frozen_copy.parameters())]
    assert any(moved) and all(not p.requires_grad for p in trainer.frozen_copy.parameters())


@pytest.mark.parametrize("family", ["sd", "flux2"])
def test_offloaded_text_encoders_stay_on_the_cpu(family):
    from focusdpo.models import load_backbone

    backbone = load_backbone(family)
    backbone.offload_text_encoders = True
    backbone.to("meta")  # stands in for an accelerator: only placement is checked here
    devices = {name: next(m.parameters()).device.type for name, m in backbone.pipeline.components.items()
               if isinstance(m, torch.nn.Module)}
    assert {d for n, d in devices.items() if n.startswith("text_encoder")} == {"cpu"}
    assert {d for n, d in devices.items() if not n.startswith("text_encoder")} == {"meta"}
    assert backbone.text_device.type == "cpu"


def test_training_with_offloaded_text_encoders(tmp_path):
    trainer = main(tiny_argv(tmp_path, "--offload_text_encoders", "true", "--max_steps", "2"))
    assert trainer.backbone.offload_text_encoders and (tmp_path / "samples_before_after.png").is_file()


class Snapshots(TrainerCallback):
    """The trainable weights after every optimizer step."""

    def __init__(self):
        self.trainer, self.taken = None, []

    def on_step_end(self, args, state, control, **kwargs):
        self.taken.append([p.detach().clone() for p in self.trainer.model.trainable_parameters()])


def test_ema_is_the_warmed_up_average_of_the_steps_weights(tmp_path):
    snapshots = Snapshots()
    argv = tiny_argv(tmp_path, "--sample_every_run", "false", "--ema_decay", "0.2", "--save_steps", "100")
    trainer = snapshots.trainer = build_trainer(*parse_config(argv), callbacks=[snapshots])
    expected = [p.detach().clone() for p in trainer.model.trainable_parameters()]
    trainer.train()
    for n, weights in enumerate(snapshots.taken, start=1):  # diffusers' warm-up: 0, then min(decay, n / (9 + n))
        decay = 0.0 if n == 1 else min(0.2, n / (9 + n))  # n = 3, 4 hit the cap: 0.25, 0.31 > 0.2
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights)]
    assert len(snapshots.taken) == 4
    for average, want in zip(trainer.weight_average.ema.shadow_params, expected):
        torch.testing.assert_close(average, want, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(a, w) for a, w in zip(trainer.weight_average.ema.shadow_params, snapshots.taken[-1]))


def test_ema_survives_a_kill_and_is_what_the_run_writes(tmp_path):
    from safetensors.torch import load_file

    argv = ["--max_steps", "6", "--save_steps", "3", "--sample_every_run", "false", "--ema_decay", "0.9"]
    full, killed = full_and_resumed_runs(tmp_path, argv, "ema.safetensors")
    written, resumed = (load_file(str(out / "pytorch_lora_weights.safetensors")) for out in (full, killed))
    raw = load_file(str(full / "checkpoint-6" / "pytorch_lora_weights.safetensors"))  # the step-6 weights
    assert written.keys() == resumed.keys() == raw.keys()
    for key in written:
        torch.testing.assert_close(resumed[key], written[key], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(written[k], raw[k]) for k in written)  # the run wrote the average, not step 6
    main(tiny_argv(tmp_path / "plain", "--max_steps", "2", "--save_steps", "2", "--sample_every_run", "false"))
    with pytest.raises(ValueError, match="has no ema.safetensors"):  # a checkpoint saved without an EMA
        main(tiny_argv(tmp_path / "plain", "--max_steps", "3", "--save_steps", "2", "--sample_every_run", "false",
                       "--ema_decay", "0.9", "--resume_from_checkpoint", "latest"))

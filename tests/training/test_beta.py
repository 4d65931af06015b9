"""The automatic β (beta_target_gradient_factor): its state, and a tiny run that follows the rule step by step."""

import math

import pytest
from transformers import TrainerCallback

from focusdpo.commands.train import main
from focusdpo.config.recipe import parse_config
from focusdpo.config.training import LossConfig
from focusdpo.losses import adapted_beta
from focusdpo.training.beta import AUTO_BETA_FILE, AutoBeta
from focusdpo.training.trainer import build_trainer

from conftest import read_metrics, tiny_argv


def auto_beta(**fields) -> AutoBeta:
    return AutoBeta(LossConfig(beta=1000.0, beta_target_gradient_factor=0.3, **fields))


def test_one_update_on_the_mean_of_the_steps_micro_batches():
    state = auto_beta(beta_adapt_rate=math.log(2) / 0.2)  # g − target = ±0.2 doubles or halves β
    state.update([0.4, 0.6])  # mean 0.5
    assert state.value == pytest.approx(2000.0, rel=1e-12)
    state.update([])  # a step without DPO metrics changes nothing
    assert state.value == pytest.approx(2000.0, rel=1e-12)


def test_saved_beta_reads_back_bit_identical_and_a_checkpoint_without_it_starts_from_beta(tmp_path, capsys):
    saved = auto_beta(beta_adapt_rate=0.05)
    saved.update([0.123456789])
    saved.save(tmp_path)
    loaded = auto_beta()
    loaded.load(tmp_path)
    assert loaded.value == saved.value != 1000.0
    fresh = auto_beta()
    fresh.load(tmp_path / "elsewhere")
    assert fresh.value == 1000.0
    assert f"no {AUTO_BETA_FILE}" in capsys.readouterr().err


@pytest.mark.e2e
def test_a_tiny_run_follows_the_rule_logs_beta_and_the_loss_reads_it(tmp_path):
    """Two micro-batches a step (gradient accumulation), a log line per step: each logged β is one step of the rule on
    that step's logged gradient factor, the loss of the next step used it, and the clamp holds."""
    rate, target, beta, high = 2.0, 0.45, 5000.0, 5300.0
    main(tiny_argv(tmp_path, "--lambda_structure", "0", "--lambda_detail", "0", "--sample_every_run", "false",
                   "--save_steps", "100", "--gradient_accumulation_steps", "2", "--beta_target_gradient_factor",
                   str(target), "--beta_adapt_rate", str(rate), "--beta_max", str(high)))
    logs = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert [m["step"] for m in logs] == [1, 2, 3, 4]
    previous = beta
    for m in logs:
        assert m["dpo/beta"] == adapted_beta(previous, m["dpo/gradient_factor"], target, rate, beta / 100, high)
        if m["step"] > 1:  # rewards/chosen = −½·β·mse/winner_drift (0 at step 1: policy = reference)
            assert -2 * m["rewards/chosen"] / m["mse/winner_drift"] == pytest.approx(previous, rel=1e-3)
        previous = m["dpo/beta"]
    betas = [m["dpo/beta"] for m in logs]
    assert betas[0] == high  # step 1: g = 0.5 (policy = reference) > 0.45 raises β, here past beta_max
    assert min(betas) < high  # a step with g < 0.45 (pairs separating) lowered it
    assert all(beta / 100 <= b <= high for b in betas)


class InfiniteGradientAt(TrainerCallback):
    """An inf gradient under a finite loss in optimizer step ``step`` (0-based), so the NaN guard skips it; records β
    after every step."""

    def __init__(self, trainer, step):
        self.trainer, self.step, self.betas = trainer, step, []

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            param = self.trainer.model.trainable_parameters()[0]
            self.hook = param.register_hook(lambda grad: grad * float("inf"))

    def on_step_end(self, args, state, control, **kwargs):
        self.betas.append(self.trainer.beta)
        if state.global_step == self.step + 1:
            self.hook.remove()


@pytest.mark.e2e
def test_a_skipped_step_leaves_beta_unchanged(tmp_path):
    trainer = build_trainer(*parse_config(tiny_argv(tmp_path, "--lambda_structure", "0", "--lambda_detail", "0",
                                                    "--sample_every_run", "false", "--save_steps", "100",
                                                    "--nan_policy", "skip", "--beta_target_gradient_factor", "0.45",
                                                    "--beta_adapt_rate", "2.0")))
    watch = InfiniteGradientAt(trainer, 2)
    trainer.add_callback(watch)
    trainer.train()
    assert [m["skipped_steps"] for m in trainer.state.log_history if "skipped_steps" in m] == [0, 0, 1, 1]
    assert watch.betas[2] == watch.betas[1] != watch.betas[0]  # step 3 skipped: no trace in β either
    assert watch.betas[3] != watch.betas[2]

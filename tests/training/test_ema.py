"""The weight average (ema_decay): diffusers' warm-up, step by step."""

import pytest
import torch
from transformers import TrainerCallback

from focusdpo.config.recipe import parse_config
from focusdpo.training.trainer import build_trainer

from conftest import tiny_argv


class Snapshots(TrainerCallback):
    """The trainable weights after every optimizer step."""

    def __init__(self):
        self.trainer, self.taken = None, []

    def on_step_end(self, args, state, control, **kwargs):
        self.taken.append([p.detach().clone() for p in self.trainer.model.trainable_parameters()])


@pytest.mark.e2e
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

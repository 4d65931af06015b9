"""The Trainer's private hooks FocusDPOTrainer overrides still exist with the arguments it relies on, and each override
does its job. A transformers upgrade that renames one fails here, in seconds, instead of silently skipping it."""

import inspect

import pytest
from transformers import Trainer

from focusdpo.config.recipe import parse_config
from focusdpo.training.trainer import FocusDPOTrainer, build_trainer

from conftest import REPO

# hook -> the parameters the override receives or passes on
HOOKS = {"_build_accelerator_args": [], "_clip_grad_norm": ["model"], "_get_grad_norm": ["model", "grad_norm"],
         "_save": ["output_dir", "state_dict"], "_load_from_checkpoint": ["resume_from_checkpoint", "model"],
         "_save_checkpoint": ["model", "trial"]}


@pytest.mark.parametrize("hook", HOOKS)
def test_every_overridden_private_hook_exists_in_the_trainer(hook):
    assert hook in vars(FocusDPOTrainer), f"FocusDPOTrainer no longer overrides {hook}: update HOOKS"
    parameters = inspect.signature(getattr(Trainer, hook)).parameters
    assert set(HOOKS[hook]) <= set(parameters), (hook, list(parameters))


def test_no_other_private_trainer_method_is_overridden():
    private = {name for name in vars(FocusDPOTrainer) if name.startswith("_") and not name.startswith("__")}
    assert private == set(HOOKS)


def test_torch_compile_compiles_the_denoiser_in_place_not_the_wrapped_policy(tmp_path):
    """The Trainer's own compilation is switched off (its dynamo plugin backend is "no"): the denoiser is compiled in
    place, so the reference pass runs the same compiled module. Building compiles nothing yet (it is lazy)."""
    trainer = build_trainer(*parse_config(["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "--toy_num_pairs", "2",
                                           "--output_dir", str(tmp_path), "--torch_compile", "true",
                                           "--lambda_structure", "0", "--lambda_detail", "0"]))
    assert str(trainer.accelerator.state.dynamo_plugin.backend).lower().endswith("no")
    assert trainer.backbone.denoiser._compiled_call_impl is not None

"""The accelerate process state of the commands that shard prompts over processes (``pairs``, ``evaluate``)."""

from __future__ import annotations

import os

import torch


def process_state(cpu: bool = False):
    """accelerate's ``PartialState``. Without CUDA it must be told to use CPU processes (gloo): otherwise every
    process of ``accelerate launch --num_processes N`` believes it is alone and does all the work.

    ``cpu``: the command was asked to run on the CPU (a ``device: cpu`` setting).
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or (several and not torch.cuda.is_available())
    return PartialState(cpu=cpu)

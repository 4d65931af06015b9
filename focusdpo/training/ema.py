"""An exponential moving average of the trained weights (``ema_decay``), kept beside the run and saved with it.

Built on diffusers' ``EMAModel`` (its decay warm-up: ``min(ema_decay, (1 + n) / (10 + n))`` at update n ≥ 1,
0 at the first update, so the average starts at the first trained weights). The average is updated after every
optimizer step, written into each checkpoint as ``ema.safetensors`` (inside the checkpoint's staging folder, so a
checkpoint never lacks it), read back on resume, and copied into the model before the final weights are saved:
the LoRA (or, with ``lora_rank: 0``, the denoiser) a run writes is the EMA's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import TrainerCallback

EMA_FILE = "ema.safetensors"


class WeightAverage:
    """The EMA of ``parameters`` (the trainable ones: the DPO LoRA, or the whole denoiser in a full fine-tune)."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float):
        from diffusers.training_utils import EMAModel

        self.parameters = parameters
        self.ema = EMAModel(parameters, decay=decay, foreach=True)

    def update(self) -> None:
        self.ema.step(self.parameters)

    def copy_to_model(self) -> None:
        """The averaged weights into the model (done once, at the end, before the final save)."""
        self.ema.copy_to(self.parameters)

    def save(self, folder: Path) -> None:
        state = self.ema.state_dict()
        shadows = {f"shadow.{i}": p.detach().contiguous() for i, p in enumerate(state.pop("shadow_params"))}
        save_file(shadows, str(Path(folder) / EMA_FILE), metadata={"state": json.dumps(state)})

    def load(self, folder: Path) -> None:
        path = Path(folder) / EMA_FILE
        if not path.is_file():
            raise ValueError(f"{folder} has no {EMA_FILE}: it was saved by a run without ema_decay. Resume it "
                             "without ema_decay, or start a new run (another output_dir) with it")
        with safe_open(str(path), "pt") as handle:  # one read: the scalars (metadata) and the averaged tensors
            state = json.loads(handle.metadata()["state"])
            shadows = {key: handle.get_tensor(key) for key in handle.keys()}
        if len(shadows) != len(self.parameters):
            raise ValueError(f"{path} holds {len(shadows)} averaged tensors but the model trains "
                             f"{len(self.parameters)}: it belongs to another model or LoRA rank")
        state["shadow_params"] = [shadows[f"shadow.{i}"] for i in range(len(shadows))]
        self.ema.load_state_dict(state)
        self.ema.to(self.parameters[0].device)


class EMAUpdate(TrainerCallback):
    """Updates the average after each optimizer step (``on_step_end`` follows the step and ``zero_grad``), but not
    after a step the NaN guard skipped (``skipped_steps()`` grew): a skipped step leaves no trace, in the average
    neither."""

    def __init__(self, average: WeightAverage, skipped_steps: Callable[[], int]):
        self.average, self.skipped_steps = average, skipped_steps
        self.skipped_seen = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.skipped_seen = self.skipped_steps()

    def on_step_end(self, args, state, control, **kwargs):
        skipped = self.skipped_steps()
        if skipped == self.skipped_seen:
            self.average.update()
        self.skipped_seen = skipped

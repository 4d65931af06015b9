"""SIGINT/SIGTERM during training: save a checkpoint at the next optimizer-step boundary, then stop.

The first signal only sets a flag (a step is never cut in half); the handlers are then restored, so a
second Ctrl-C interrupts at once. Under several processes the flag is agreed on at every step end, so
all ranks save the same step together.
"""

from __future__ import annotations

import signal
import sys

import torch
from transformers import TrainerCallback

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SaveOnSignal(TrainerCallback):
    """Install with :meth:`install` before training; ``received`` names the signal once one arrived."""

    def __init__(self):
        self.received: str | None = None
        self.previous: dict = {}
        self.accelerator = None

    def install(self, accelerator=None) -> SaveOnSignal:
        self.accelerator = accelerator
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        print(f"[focusdpo] {self.received}: saving a checkpoint at the end of this step, then stopping "
              "(send it again to stop at once, without saving)", file=sys.stderr, flush=True)
        self.restore()

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def on_step_end(self, args, state, control, **kwargs):
        flag = self.received is not None
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            local = torch.tensor([float(flag)], device=self.accelerator.device)
            flag = self.accelerator.reduce(local, reduction="sum").item() > 0
            self.received = self.received or ("SIGTERM" if flag else None)
        if flag:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

"""The automatic β (``beta_target_gradient_factor``): β as trainer state that follows a target gradient factor.

β starts at ``beta``; after each kept optimizer step it takes one step of :func:`focusdpo.losses.adapted_beta` on
that step's mean ``dpo/gradient_factor``. The loss reads the current value. It is written into every checkpoint as
``auto_beta.json`` (inside the checkpoint's staging folder, beside the EMA) and read back on resume, so a resumed run
continues with the β the uninterrupted run would have had.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from focusdpo.config.training import LossConfig
from focusdpo.losses import adapted_beta

AUTO_BETA_FILE = "auto_beta.json"


class AutoBeta:
    """The current β of a run with ``beta_target_gradient_factor`` set."""

    def __init__(self, config: LossConfig):
        self.value = float(config.beta)
        self.target, self.rate = config.beta_target_gradient_factor, config.beta_adapt_rate
        self.low, self.high = config.beta_range

    def update(self, gradient_factors: list[float]) -> None:
        """One step on the mean of an optimizer step's ``dpo/gradient_factor`` values (one per micro-batch, each
        already averaged over processes by the step's metrics collective): every rank computes the same β, with no
        collective or device sync of its own."""
        if gradient_factors:
            mean = sum(gradient_factors) / len(gradient_factors)
            self.value = adapted_beta(self.value, mean, self.target, self.rate, self.low, self.high)

    def save(self, folder: Path) -> None:
        """Into a checkpoint's staging folder (renamed whole, so no half-written file). JSON writes a float's shortest
        repr, which reads back to the same float: the resumed β is bit-identical."""
        (Path(folder) / AUTO_BETA_FILE).write_text(json.dumps({"beta": self.value}))

    def load(self, folder: Path) -> None:
        """The β saved in ``folder``; a checkpoint of a run without the automatic β starts it from ``beta``."""
        path = Path(folder) / AUTO_BETA_FILE
        if not path.is_file():
            print(f"[focusdpo] {folder} has no {AUTO_BETA_FILE} (saved without beta_target_gradient_factor): the "
                  f"automatic β starts from beta={self.value}", file=sys.stderr)
            return
        self.value = float(json.loads(path.read_text())["beta"])

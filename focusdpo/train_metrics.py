"""Training metrics: TRL-named values averaged over processes, margins per noise-level quarter, metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import TrainerCallback

TIMESTEP_BUCKETS = 4  # margins are also logged per quarter of the noise range


class MetricsFileCallback(TrainerCallback):
    """Append every log line to ``metrics.jsonl`` as it happens, so a crash loses nothing logged.

    Strict JSON: a NaN/inf value is written as null, and its name and value (as a string) under ``non_finite``.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, **logs}
            bad = {k: str(v) for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
            record.update({k: None for k in bad}, **({"non_finite": bad} if bad else {}))
            with open(Path(args.output_dir) / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")


def focus_summary(weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """``focus/mean|max|entropy`` of ``(N, h, w)`` weights; entropy is normalised (1 = uniform)."""
    flat = weights.detach().float().flatten(1)
    p = flat / flat.sum(1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(1) / math.log(flat.shape[1])
    return {"focus/mean": flat.mean(), "focus/max": flat.amax(1).mean(), "focus/entropy": entropy.mean()}


class MetricsLogging:
    """Trainer mixin: keep each step's metrics (one collective per step) and add their means to every log.

    Needs the :class:`~focusdpo.guards.StepGuards` state (``_step_metrics``, ``_metrics``, skipped-step counts).
    """

    def store_metrics(self, metrics: dict, inside: torch.Tensor, noise_level: torch.Tensor, weights) -> bool:
        """Average metrics over processes and keep them until the next log, if every process's ``metrics["_loss"]``
        is finite; return whether it is. One collective and one device sync a step (the NaN guard's included)."""
        if weights is not None:
            metrics.update(focus_summary(weights))
        names = list(metrics)
        bucket = (noise_level.float() * TIMESTEP_BUCKETS).long().clamp(max=TIMESTEP_BUCKETS - 1)
        sums = torch.zeros(TIMESTEP_BUCKETS, device=inside.device).index_add_(0, bucket, inside)
        counts = torch.bincount(bucket, minlength=TIMESTEP_BUCKETS).float()
        values = torch.stack([metrics[n].float() for n in names]).to(inside.device)
        bad = (~torch.isfinite(metrics["_loss"].float())).float().reshape(1).to(inside.device)
        total = self.accelerator.reduce(torch.cat([bad, values, sums, counts]), reduction="sum").tolist()
        if total[0] > 0:
            return False
        world = self.accelerator.num_processes
        for name, value in zip(names, total[1: len(names) + 1]):
            self._step_metrics[name].append(value / world)
        self._step_metrics["_bucket_sums"].append(total[len(names) + 1:-TIMESTEP_BUCKETS])
        self._step_metrics["_bucket_counts"].append(total[-TIMESTEP_BUCKETS:])
        return True

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:  # training logs only
            self.average_kept_steps(logs)
        if self._metrics and "loss" in logs:
            sums = torch.tensor(self._metrics.pop("_bucket_sums")).sum(0)
            counts = torch.tensor(self._metrics.pop("_bucket_counts")).sum(0)
            logs.update({name: sum(values) / len(values) for name, values in self._metrics.items()})
            for i in range(TIMESTEP_BUCKETS):
                if counts[i] > 0:
                    lo, hi = i / TIMESTEP_BUCKETS, (i + 1) / TIMESTEP_BUCKETS
                    logs[f"rewards/margins_u{lo:.2f}-{hi:.2f}"] = (sums[i] / counts[i]).item()
            self._metrics.clear()
            if "mse/winner_drift" in logs:  # DPO only: SFT has no reference pass
                self.watch_winner_drift(logs["mse/winner_drift"])
        if "train_loss" in logs and self._skipped_steps and self._kept_loss[1]:
            logs["train_loss"] = self._kept_loss[0] / self._kept_loss[1]  # skipped steps left out
        super().log(logs, start_time)

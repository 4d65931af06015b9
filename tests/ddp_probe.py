"""Run the trainer under ``accelerate launch`` and record, per rank, what the DDP test checks:
the pairs this rank saw, its local (un-gathered) metrics per step, and a hash of its trainable weights."""

import hashlib
import json
import sys
from pathlib import Path

import torch

from focusdpo.recipe import parse_config
from focusdpo.train import build_trainer


def main(argv):
    trainer = build_trainer(*parse_config(argv))
    seen, local = [], []
    collate, store = trainer.data_collator, trainer.store_metrics

    def recording_collate(rows):
        seen.extend(row["pair_id"] for row in rows)
        return collate(rows)

    def recording_store(metrics, *args):
        local.append({k: v.item() for k, v in metrics.items()})
        return store(metrics, *args)

    trainer.data_collator, trainer.store_metrics = recording_collate, recording_store
    trainer.train()
    weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters() if p.requires_grad])
    rank = trainer.args.process_index
    report = {"rank": rank, "world": trainer.accelerator.num_processes, "pairs": seen, "local": local,
              "weights": hashlib.sha256(weights.numpy().tobytes()).hexdigest()}
    (Path(trainer.args.output_dir) / f"probe-rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])

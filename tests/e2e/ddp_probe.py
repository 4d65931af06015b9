"""Run the trainer under ``accelerate launch`` and record, per rank, what the DDP test checks:
the pairs this rank saw, its local (un-gathered) metrics per step, and its trainable weights (safetensors)."""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from focusdpo.config.recipe import parse_config
from focusdpo.training.trainer import build_trainer


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
    rank = trainer.args.process_index
    save_file({name: p.detach().contiguous() for name, p in trainer.model.named_parameters() if p.requires_grad},
              Path(trainer.args.output_dir) / f"probe-rank{rank}.safetensors")
    report = {"rank": rank, "world": trainer.accelerator.num_processes, "pairs": seen, "local": local}
    (Path(trainer.args.output_dir) / f"probe-rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])

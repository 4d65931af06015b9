"""Pair-generation throughput at toy size: images/s, scored candidates/s, and sampling vs scoring time.

    python benchmarks/pairs_benchmark.py [--prompts 4] [--candidates 4] [--steps 8] [--resolution 32]

For each family (tiny random sd, flux2, flux_kontext; DreamBench subset prompts from UNO's multi-subject
file) it times, over the same prompts in one run, (a) ``sample_images`` for all candidates of a prompt and
(b) ``CandidateScorer.score`` on them (DINOv2 ViT-S/14 with random weights at --dino_size px: throughput
does not depend on the weights). A warm-up prompt is excluded. Prints one row per family.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def time_family(family: str, items, args) -> dict:
    import torch

    from focusdpo.config.focus import FocusConfig
    from focusdpo.models import load_backbone
    from focusdpo.config.pairs import PairGenConfig
    from focusdpo.pairs.scoring import CandidateScorer
    from focusdpo.pairs.generate import open_references
    from focusdpo.models.sampling import sample_images

    backbone = load_backbone(family)
    cfg = PairGenConfig(prompts="-", out="-", resolution=args.resolution, num_candidates=args.candidates)
    scorer = CandidateScorer(cfg, FocusConfig(dino_random_weights=True, dino_image_size=args.dino_size))
    sampling = scoring = 0.0
    for n, item in enumerate(items):
        refs = open_references(item)
        seeds = list(range(args.candidates))
        start = time.perf_counter()
        images = sample_images(backbone, [item.prompt] * len(seeds), [refs] * len(seeds), seeds, args.resolution,
                               args.steps, batch_size=args.candidates)
        middle = time.perf_counter()
        with torch.no_grad():
            scorer.score(images, item, refs)
        end = time.perf_counter()
        if n:  # the first prompt warms up allocators and kernels
            sampling, scoring = sampling + middle - start, scoring + end - middle
    count = (len(items) - 1) * args.candidates
    return {"images/s": count / sampling, "scored/s": count / scoring,
            "end-to-end cand/s": count / (sampling + scoring), "sampling share": sampling / (sampling + scoring)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4, help="Prompts timed (plus one warm-up).")
    parser.add_argument("--candidates", type=int, default=4, help="Candidates per prompt (one batch).")
    parser.add_argument("--steps", type=int, default=8, help="Denoising steps.")
    parser.add_argument("--resolution", type=int, default=32, help="Image size in pixels.")
    parser.add_argument("--dino_size", type=int, default=224, help="DINOv2 input size.")
    parser.add_argument("--families", default="sd,flux2,flux_kontext", help="Comma-separated families.")
    args = parser.parse_args()

    import torch

    from focusdpo.data.prompt_sets import load_prompt_set

    torch.set_num_threads(1)
    prompts = SHARED / "uno" / "dreambench_multiip_covered_by_subset.json"
    items = load_prompt_set(prompts, data_root=SHARED / "dreambench").items[: args.prompts + 1]
    print(f"{args.prompts} prompts x {args.candidates} candidates, {args.steps} steps, {args.resolution} px, "
          f"DINOv2 ViT-S/14 @ {args.dino_size}, 1 thread")
    print(f"{'family':<14}{'images/s':>10}{'scored/s':>10}{'end-to-end cand/s':>19}{'sampling share':>16}")
    for family in args.families.split(","):
        row = time_family(family, items, args)
        print(f"{family:<14}{row['images/s']:>10.2f}{row['scored/s']:>10.2f}{row['end-to-end cand/s']:>19.2f}"
              f"{row['sampling share']:>15.0%}")


if __name__ == "__main__":
    main()

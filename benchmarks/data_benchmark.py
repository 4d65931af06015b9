"""Memory and disk of the data paths, old and new side by side in one run, on the toy pairs.

    python benchmarks/data_benchmark.py [--rows maps disk read] [--pairs 400] [--grid 64] [--pickapic_rows 600]

Rows:
  focus maps     extra peak RSS of `precompute_focus_maps` per 1000 pairs (after a warm-up run on 8 pairs):
                 batched Dataset.map (now) vs the previous approach (a Python list of every map, then
                 add_column of nested lists); each in its own process, peak RSS (VmHWM) reset after warm-up.
  saved load     time and bytes written (HF cache + temp dir + dataset folder) by loading a saved pair folder:
                 now vs the previous image-column casts (cast_column rewrites lists of images).
  pickapic       bytes written by loading Pick-a-Pic parquet and saving it as a pair folder (the import),
                 as multiples of the kept image bytes: now (one generator copy + the saved folder) vs before.
  batch read     CPU time of reading a batch of 4 pairs for a cached step (`ArrayRows.__getitems__`), pairs with
                 two references and PNG-sized image bytes: image columns copied out of arrow (pixels=True, the
                 previous read) vs passed as counts (pixels=False, what a step over caches does now); interleaved.
The grid is the loss grid of the maps (64 = SD at 512 px); the toy images are 2×grid px.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY_FOCUS = dict(lambda_detail=1.0, lambda_structure=1.0, dino_random_weights=True, dino_depth=2,
                  dino_image_size=56)


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def list_precompute(pairs, cfg, grid, resolution, batch_size):
    """The previous focus-map cache writer, kept here to measure against: every map in one Python list."""
    import torch
    from focusdpo.data import PairCollator, add_array_column
    from focusdpo.mapper import FocusMapper, focus_cache_key
    mapper, collate, maps = FocusMapper(cfg), PairCollator(resolution), []
    for start in range(0, len(pairs), batch_size):
        rows = [pairs[i] for i in range(start, min(start + batch_size, len(pairs)))]
        out = mapper.batch_maps(collate(rows), grid).cpu()
        maps.extend(torch.stack([out[:len(rows)], out[len(rows):]], dim=1).half().numpy())
    pairs = add_array_column(pairs, "focus_maps", maps)
    return pairs.add_column("focus_key", [focus_cache_key(cfg, grid)] * len(pairs))


def maps_child(mode: str, pairs: int, grid: int) -> dict:
    from focusdpo.config import FocusConfig
    from focusdpo.data import load_pairs
    from focusdpo.mapper import precompute_focus_maps
    data = load_pairs("toy", toy_num_pairs=pairs, resolution=2 * grid)
    writer = precompute_focus_maps if mode == "batched" else list_precompute
    writer(data.select(range(8)), FocusConfig(**TINY_FOCUS), (grid, grid), 2 * grid, 8)  # model, allocator warm
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: count only what the cache writer adds per pair
    start_rss, start = peak_rss_mib(), time.perf_counter()
    cached = writer(data, FocusConfig(**TINY_FOCUS), (grid, grid), 2 * grid, 8)
    assert len(cached) == pairs
    return {"rss_per_1000": (peak_rss_mib() - start_rss) * 1000 / pairs, "seconds": time.perf_counter() - start}


def folder_bytes(*paths: Path) -> int:
    return sum(f.stat().st_size for p in paths for f in Path(p).rglob("*") if f.is_file())


def old_undecoded(ds):
    from datasets import Image, List
    from focusdpo.data import IMAGE_COLUMNS
    for column in IMAGE_COLUMNS:
        image = Image(decode=False)
        ds = ds.cast_column(column, List(image) if column.startswith("reference") else image)
    return ds


def old_pickapic(path: Path):
    """The previous Pick-a-Pic import: from_parquet, select, map to the schema, then the casts."""
    from datasets import Dataset, Features
    from focusdpo.data import PAIR_FEATURES
    from focusdpo.hub_data import preference_rows
    raw = Dataset.from_parquet(str(path))
    raw = raw.select(preference_rows(raw["label_0"], str(path)))

    def to_schema(row, index):
        first = row["label_0"] == 1
        return {"pair_id": f"pickapic-{index}", "prompt": row["caption"],
                "chosen": {"bytes": row["jpg_0" if first else "jpg_1"], "path": None},
                "rejected": {"bytes": row["jpg_1" if first else "jpg_0"], "path": None}}

    ds = raw.map(to_schema, with_indices=True, remove_columns=raw.column_names,
                 features=Features({k: PAIR_FEATURES[k] for k in ("pair_id", "prompt", "chosen", "rejected")}))
    for column, empty in (("references", []), ("reference_masks", []), ("prior_mask", None)):
        ds = ds.add_column(column, [empty] * len(ds), feature=PAIR_FEATURES[column])
    return old_undecoded(ds)


def disk_child(mode: str, pairs: int, rows: int) -> dict:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from focusdpo.data import check_pairs, load_pairs, no_cache_files
    from focusdpo.pair_checks import preflight
    from focusdpo.toy_pairs import make_toy_pairs
    root = Path(tempfile.mkdtemp(prefix="data-benchmark-"))
    for name in ("hf-cache", "tmp"):
        (root / name).mkdir()
    datasets.config.HF_DATASETS_CACHE, tempfile.tempdir = str(root / "hf-cache"), str(root / "tmp")
    toy = make_toy_pairs(pairs, 64)
    toy.save_to_disk(str(root / "pairs"))
    before, start = folder_bytes(root), time.perf_counter()
    with no_cache_files():
        if mode == "now":
            loaded = load_pairs(str(root / "pairs"))
        else:
            loaded = preflight(old_undecoded(datasets.load_from_disk(str(root / "pairs"))))
    load = {"seconds": time.perf_counter() - start, "written": folder_bytes(root) - before,
            "dataset": folder_bytes(root / "pairs")}
    assert len(loaded) == pairs
    undecoded = old_undecoded(toy)
    jpgs = [r["bytes"] for r in undecoded["chosen"]] * (rows // pairs + 1)
    labels = [(1.0, 0.0, 0.5)[i % 3] for i in range(rows)]
    pq.write_table(pa.table({"caption": [f"p{i}" for i in range(rows)], "jpg_0": jpgs[:rows], "jpg_1": jpgs[1:rows + 1],
                             "label_0": labels}), root / "pickapic.parquet")
    kept = sum(len(jpgs[i]) + len(jpgs[i + 1]) for i in range(rows) if labels[i] != 0.5)
    before = folder_bytes(root)
    with no_cache_files():
        pairs_now = load_pairs(str(root / "pickapic.parquet")) if mode == "now" else \
            check_pairs(old_pickapic(root / "pickapic.parquet"), "pickapic")
        pairs_now.save_to_disk(str(root / "imported"))
    return {"load": load, "import_written_x_kept": (folder_bytes(root) - before) / kept}


def run_child(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def batch_read_row(pairs: int, image_kib: int, repeats: int = 60) -> dict[str, float]:
    """Median CPU ms of one 4-pair batch read, image columns read (True) or passed as counts (False)."""
    import statistics

    import numpy as np
    from datasets import Array3D, Dataset, Features, Image, List, Value

    from focusdpo.data import with_array_format

    image = {"bytes": os.urandom(image_kib * 1024), "path": None}  # never decoded: the bytes' size is what counts
    features = Features({"pair_id": Value("string"), "chosen": Image(), "rejected": Image(),
                         "references": List(Image()), "latents": Array3D((2, 8, 128), "float16")})
    ds = Dataset.from_dict({"pair_id": [str(i) for i in range(pairs)], "chosen": [image] * pairs,
                            "rejected": [image] * pairs, "references": [[image, image]] * pairs,
                            "latents": [np.zeros((2, 8, 128), np.float16)] * pairs}, features=features)
    readers = {pixels: with_array_format(ds, pixels) for pixels in (True, False)}
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(repeats):
        for pixels in ((True, False) if i % 2 else (False, True)):
            start = time.thread_time()
            readers[pixels].__getitems__([(4 * i + j) % pairs for j in range(4)])
            times[pixels].append((time.thread_time() - start) * 1000)
    return {pixels: statistics.median(values) for pixels, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=400, help="Pairs for the focus-map rows.")
    parser.add_argument("--grid", type=int, default=64, help="Loss grid side of the maps.")
    parser.add_argument("--load_pairs", type=int, default=200, help="Pairs in the saved folder that is loaded.")
    parser.add_argument("--pickapic_rows", type=int, default=600, help="Rows of the Pick-a-Pic file (1/3 ties).")
    parser.add_argument("--read_image_kib", type=int, default=1536, help="Bytes of each image in the batch-read "
                        "row, in KiB (1536: a 1024 px PNG photo).")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="Which rows to run.")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, mode, *numbers = args.child
        child = maps_child if kind == "maps" else disk_child
        print(json.dumps(child(mode, *map(int, numbers))))
        return
    for row in args.rows:
        ROWS[row](args)


def print_maps_row(args) -> None:
    maps = {m: run_child(["maps", m, str(args.pairs), str(args.grid)]) for m in ("list", "batched")}
    print(f"focus maps, {args.pairs} pairs on a {args.grid}x{args.grid} grid: extra peak RSS per 1000 pairs "
          f"list {maps['list']['rss_per_1000']:.0f} MiB, batched {maps['batched']['rss_per_1000']:.0f} MiB "
          f"(ratio {maps['list']['rss_per_1000'] / max(maps['batched']['rss_per_1000'], 1e-9):.1f}x); "
          f"time list {maps['list']['seconds']:.1f} s, batched {maps['batched']['seconds']:.1f} s")


def print_disk_rows(args) -> None:
    disk = {m: run_child(["disk", m, str(args.load_pairs), str(args.pickapic_rows)]) for m in ("before", "now")}
    old, new = disk["before"]["load"], disk["now"]["load"]
    print(f"saved-folder load, {args.load_pairs} pairs ({new['dataset'] / 2**20:.1f} MiB on disk): bytes written "
          f"before {old['written'] / 2**20:.2f} MiB ({old['written'] / new['dataset']:.2f}x the dataset), "
          f"now {new['written'] / 2**20:.2f} MiB ({new['written'] / new['dataset']:.2f}x); "
          f"time before {old['seconds']:.2f} s, now {new['seconds']:.2f} s "
          f"(ratio {old['seconds'] / new['seconds']:.2f})")
    print(f"pickapic import, {args.pickapic_rows} rows: bytes written per kept image byte before "
          f"{disk['before']['import_written_x_kept']:.2f}x, now {disk['now']['import_written_x_kept']:.2f}x")


def print_read_row(args) -> None:
    read = batch_read_row(32, args.read_image_kib)
    print(f"batch read, 4 pairs with 2 references, {args.read_image_kib} KiB images, cached latents: image columns "
          f"read {read[True]:.2f} ms, passed as counts {read[False]:.2f} ms (ratio {read[False] / read[True]:.2f})")


ROWS = {"maps": print_maps_row, "disk": print_disk_rows, "read": print_read_row}

if __name__ == "__main__":
    main()

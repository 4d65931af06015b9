"""Import pairs (a folder with pairs.jsonl, parquet in the pair schema or Pick-a-Pic's, a hub-style parquet
folder, or a hub id when online) into the focusdpo schema on disk.

    python data_tools/import_pairs.py SOURCE --out data/pairs [--format auto|jsonl|pickapic|parquet|...]
        [--split train] [--max_samples N]
"""

import argparse

from focusdpo.config.training import DATASET_FORMATS
from focusdpo.data.load import load_pairs
from focusdpo.atomic import check_out_is_not_input
from focusdpo.data.load import save_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="A folder with pairs.jsonl, parquet file(s), or a hub id.")
    parser.add_argument("--out", required=True, help="Folder to write the dataset to.")
    parser.add_argument("--format", default="auto", choices=DATASET_FORMATS, help="Source layout.")
    parser.add_argument("--split", default="train", help="Split, for sources with splits.")
    parser.add_argument("--max_samples", type=int, default=None, help="Keep only the first N pairs.")
    args = parser.parse_args()
    check_out_is_not_input(args.out, args.source)
    pairs = load_pairs(args.source, args.format, split=args.split, max_samples=args.max_samples)
    save_dataset(pairs, args.out)
    print(f"{len(pairs)} pairs written to {args.out}")


if __name__ == "__main__":
    main()

"""Import pairs (a folder with pairs.jsonl, or Pick-a-Pic parquet) into the focusdpo schema on disk.

    python data_tools/import_pairs.py SOURCE --out data/pairs [--format auto|jsonl|pickapic]
"""

import argparse

from focusdpo.data import load_pairs
from focusdpo.safe_write import check_out_is_not_input, save_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="A folder with pairs.jsonl, or Pick-a-Pic parquet file(s).")
    parser.add_argument("--out", required=True, help="Folder to write the dataset to.")
    parser.add_argument("--format", default="auto", choices=("auto", "jsonl", "pickapic"), help="Source layout.")
    args = parser.parse_args()
    check_out_is_not_input(args.out, args.source)
    pairs = load_pairs(args.source, args.format)
    save_dataset(pairs, args.out)
    print(f"{len(pairs)} pairs written to {args.out}")


if __name__ == "__main__":
    main()

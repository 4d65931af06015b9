"""Write a one-pair jsonl folder from DreamBench photos: two subjects pasted side by side on a third
photo (winner), the same with the first subject swapped for another of its class (loser).

    python data_tools/dreambench_composite.py --dreambench ../shared/data/dreambench --out runs/composite

References are other photos of the two winner subjects, with central-box masks (DreamBench subjects
sit in the middle). The folder loads with ``dataset: runs/composite`` (format jsonl); `runs/` is git-ignored,
so the photos (third-party: DreamBench, CC BY 4.0 / Unsplash License) are never committed.
"""

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

SIZE, BOX = 224, 96
BOXES = ((16, 64), (112, 64))  # (left, top) of the two pasted subjects


def central_crop(path: Path, size: int, keep: float) -> Image.Image:
    image = Image.open(path).convert("RGB")
    w, h = image.size
    m = (1 - keep) / 2
    return image.crop((round(w * m), round(h * m), round(w * (1 - m)), round(h * (1 - m)))).resize(
        (size, size), Image.BICUBIC)


def composite(background: Path, subjects: list[Path]) -> Image.Image:
    canvas = central_crop(background, SIZE, 1.0)
    for path, corner in zip(subjects, BOXES):
        canvas.paste(central_crop(path, BOX, 0.6), corner)
    return canvas


def box_mask(size: int, box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dreambench", required=True, help="The DreamBench folder (one sub-folder per subject).")
    parser.add_argument("--out", required=True, help="Folder to write pairs.jsonl and its PNGs to.")
    parser.add_argument("--subjects", nargs=2, default=["dog", "can"], help="Two subjects of different classes.")
    parser.add_argument("--swap", default="dog6", help="Another subject of the first one's class (the loser's).")
    parser.add_argument("--background", default="pink_sunglasses/03.jpg", help="Background photo (subject/file).")
    args = parser.parse_args()
    root, out = Path(args.dreambench), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    first, second = (root / s / "01.jpg" for s in args.subjects)
    composite(root / args.background, [first, second]).save(out / "chosen.png")
    composite(root / args.background, [root / args.swap / "01.jpg", second]).save(out / "rejected.png")
    margin = round(SIZE * 0.2)
    box_mask(SIZE, (margin, margin, SIZE - margin - 1, SIZE - margin - 1)).save(out / "reference_mask.png")
    for subject in args.subjects:
        central_crop(root / subject / "00.jpg", SIZE, 1.0).save(out / f"ref_{subject}.png")
    row = {"pair_id": f"{'_'.join(args.subjects)}_swap_{args.swap}",
           "prompt": f"a {args.subjects[0]} and a {args.subjects[1]}", "chosen": "chosen.png",
           "rejected": "rejected.png", "references": [f"ref_{s}.png" for s in args.subjects],
           "reference_masks": ["reference_mask.png"] * 2}
    (out / "pairs.jsonl").write_text(json.dumps(row) + "\n")
    print(f"1 pair written to {out / 'pairs.jsonl'}")


if __name__ == "__main__":
    main()

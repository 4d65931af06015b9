"""Check every pair of a dataset before any model loads: files exist, headers decode, sizes agree, prompts are set.

Fast by default (``verify_images: header``): image headers and file endings only (a truncated PNG/JPEG is caught by
its missing end marker), sizes as displayed (after the EXIF orientation, read from the header); a tqdm bar shows
progress. Corrupt pixel data behind a sound header and end marker shows only when the pixels are decoded:
``verify_images: full`` decodes every image here, as the loader will, instead of failing mid-run. With
``on_bad_pair: skip`` bad pairs are logged, counted and dropped instead of stopping the run.
"""

from __future__ import annotations

import io
import math
import sys

from datasets import Dataset
from PIL import Image as PILImage
from tqdm.auto import tqdm

from focusdpo.errors import PairDataError
from focusdpo.images import displayed_size, open_upright

ON_BAD_PAIR = ("error", "skip")

VERIFY_IMAGES = ("header", "full")

IMAGE_VALUE_COLUMNS = ("chosen", "rejected", "references", "reference_masks", "prior_mask")

MASK_COLUMNS = ("reference_masks", "prior_mask")

PNG_END = b"IEND\xaeB`\x82"

JPEG_END = b"\xff\xd9"

TAIL_BYTES = 1024  # JPEG writers may append a little padding after the end marker

HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def image_header(value: dict | None, column: str, pair_id: str) -> tuple[int, int]:
    """Width and height of an undecoded datasets Image value as displayed (EXIF orientation applied), from its
    header; refuse an unreadable or truncated file, naming the pair, the column and the file."""
    where = value.get("path") or "embedded bytes"
    try:
        data = value.get("bytes")
        source = io.BytesIO(data) if data else open(value["path"], "rb")
        with source, PILImage.open(source) as image:
            size, fmt = displayed_size(image, source), image.format
            peak = to_eight_bit(image, where).convert("L").getextrema()[1] if column in MASK_COLUMNS else None
            source.seek(0, io.SEEK_END)
            source.seek(max(0, source.tell() - TAIL_BYTES))
            tail = source.read()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise PairDataError(f"pair {pair_id}: {column} image ({where}) cannot be read: {e}. "
                            "Replace the file or drop the pair (on_bad_pair: skip)") from None
    if (fmt == "PNG" and not tail.endswith(PNG_END)) or (fmt == "JPEG" and JPEG_END not in tail):
        raise PairDataError(f"pair {pair_id}: {column} image ({where}) cannot be read: the {fmt} file is "
                            "truncated (no end marker). Replace the file or drop the pair (on_bad_pair: skip)")
    if peak is not None:
        check_mask_peak(peak, f"pair {pair_id}: {column} image ({where})", column)
    return size


MASK_MEANINGS = {
    "prior_mask": "a prior mask marks in white where the loser differs from the winner; draw that region, or leave "
                  "prior_mask out (the pair then has no prior)",
    "reference_masks": "a reference mask marks its subject in white; draw the subject, or give this pair no "
                       "reference_masks (each whole reference is then its subject)",
}


def check_mask_peak(peak: int, where: str, column: str) -> None:
    """Masks are the one image whose pixels are checked up front (one channel, small to decode): a blank mask
    would silently mean "no prior", or a subject with no pixels; a 0/1 array saved as is reads as almost black."""
    if peak == 0:
        raise PairDataError(f"{where} is blank (every pixel 0): {MASK_MEANINGS[column]}")
    if peak == 1:
        raise PairDataError(f"{where} holds only 0 and 1 (a 0/1 array saved as is), which reads as almost black: "
                            "save it as 0 and 255 (mask * 255)")


def check_row(row: dict, max_references: int | None) -> None:
    """Every check of one pair that needs no pixels: the prompt, counts, sizes of the images and masks."""
    pair_id = row["pair_id"]
    check_prompt(row["prompt"], pair_id)
    chosen = image_header(row["chosen"], "chosen", pair_id)
    rejected = image_header(row["rejected"], "rejected", pair_id)
    if chosen != rejected:
        raise PairDataError(f"pair {pair_id}: chosen is {chosen[0]}x{chosen[1]} but rejected is "
                            f"{rejected[0]}x{rejected[1]}; a pair's images must have the same size")
    refs, masks = row["references"] or [], row["reference_masks"] or []
    if max_references is not None and len(refs) > max_references:
        raise PairDataError(f"pair {pair_id} has {len(refs)} references but max_references={max_references}: "
                            "raise max_references or drop references")
    if masks and len(masks) != len(refs):
        raise PairDataError(f"pair {pair_id}: {len(masks)} reference masks for {len(refs)} references; give "
                            "one mask per reference or none")
    for k, (ref, mask) in enumerate(zip(refs, masks)):
        check_mask_size(image_header(ref, "references", pair_id), image_header(mask, "reference_masks", pair_id),
                        f"reference_masks[{k}]", f"references[{k}]", pair_id)
    for ref in refs[len(masks):]:  # references without a mask
        image_header(ref, "references", pair_id)
    if row["prior_mask"]:
        check_mask_size(chosen, image_header(row["prior_mask"], "prior_mask", pair_id), "prior_mask", "chosen",
                        pair_id)


def check_prompt(prompt: str | None, pair_id: str) -> None:
    """Refuse an empty prompt, from every source alike (jsonl, parquet, Pick-a-Pic, saved datasets). A pair with
    no prompt is an unconditional pair: its preference would train the generator's unconditional prediction, which
    classifier-free guidance subtracts, rather than the prompt-following the pairs are about. Empty captions in
    scraped data (Pick-a-Pic has some) are faults of the data, not a deliberate caption dropout."""
    if not (prompt or "").strip():
        raise PairDataError(f"pair {pair_id}: the prompt is empty ({prompt!r}); a preference pair needs the prompt its "
                            "images were made for: write the caption, or drop the pair (on_bad_pair: skip)")


def open_image(value: dict, column: str, pair_id: str, mode: str = "RGB") -> PILImage.Image:
    """Decode an undecoded datasets Image value fully (corrupt or truncated data fails here), upright as displayed,
    in ``mode``; an unreadable one is refused naming the pair, the column and the file."""
    where = value.get("path") or "embedded bytes"
    try:
        image = open_upright(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise PairDataError(f"pair {pair_id}: {column} image ({where}) cannot be read: {e}. Replace the file "
                            "(export it again from its source), or drop the pair (on_bad_pair: skip)") from None
    return to_eight_bit(image, f"pair {pair_id}: {column} image ({where})").convert(mode)


def decode_row(row: dict) -> None:
    """Decode every image of one pair as the loader will (``verify_images: full``)."""
    for column in IMAGE_VALUE_COLUMNS:
        values = row[column] if column.startswith("reference") else [row[column]]
        for value in (v for v in values or [] if v):
            open_image(value, column, row["pair_id"], "L" if column in MASK_COLUMNS else "RGB")


def check_mask_size(image: tuple[int, int], mask: tuple[int, int], mask_name: str, image_name: str,
                    pair_id: str) -> None:
    """A mask of another size would be centre-cropped out of alignment with its image: refuse it."""
    if mask != image:
        raise PairDataError(f"pair {pair_id}: {mask_name} is {mask[0]}x{mask[1]} but {image_name} is "
                            f"{image[0]}x{image[1]}; resize the mask to its image's size")


def preflight(ds: Dataset, max_references: int | None = None, on_bad_pair: str = "error",
              verify_images: str = "header") -> Dataset:
    """Check every pair (see :func:`check_row`; ``verify_images: full`` also decodes every image); stop at the
    first bad one, or drop and count bad pairs."""
    columns = ds.select_columns(["pair_id", "prompt", *IMAGE_VALUE_COLUMNS])
    full = verify_images == "full"
    kept, bad = [], []
    desc = "decoding every image (verify_images: full)" if full else "checking pairs"
    for i, row in enumerate(tqdm(columns, desc=desc, unit="pair", leave=False)):
        try:
            check_row(row, max_references)
            if full:
                decode_row(row)
            kept.append(i)
        except PairDataError as e:
            if on_bad_pair != "skip":
                raise
            bad.append(str(e))
            print(f"[focusdpo] skipped: {e}", file=sys.stderr)
    if not bad:
        return ds
    if not kept:
        raise PairDataError(f"no pairs left: all {len(ds)} pairs are bad (on_bad_pair: skip); the first: {bad[0]}")
    print(f"[focusdpo] on_bad_pair: skip dropped {len(bad)} of {len(ds)} pairs; training on {len(kept)}",
          file=sys.stderr)
    return ds.select(kept)


def to_eight_bit(image: PILImage.Image, where: str) -> PILImage.Image:
    """16-bit greyscale (PNG ``I;16``/``I``) scaled to 8 bits: PIL's own conversion clips it to white."""
    import numpy as np

    if image.mode not in HIGH_BIT_MODES:
        if image.mode == "F":
            raise PairDataError(f"{where} is a floating-point image; save it as an 8- or 16-bit PNG or a JPEG")
        return image
    array = np.asarray(image).astype(np.float64)
    if array.max(initial=0) > 65535:
        raise PairDataError(f"{where} has 32-bit pixel values; save it as an 8- or 16-bit PNG or a JPEG")
    return PILImage.fromarray(np.round(array / 257.0).astype(np.uint8), mode="L")


JSONL_PATHS = ("chosen", "rejected")

JSONL_PATH_LISTS = ("references", "reference_masks")

JSONL_KEYS = ("prompt", *JSONL_PATHS, *JSONL_PATH_LISTS, "prior_mask", "pair_id", "subject_scores")

JSONL_RENAMES = {"id": "pair_id"}  # a prompt set's entry id; here the pair's


def check_jsonl_row(row, where: str) -> None:
    """One parsed ``pairs.jsonl`` line has the schema's keys and types; ``where`` names file and line."""
    check_json_object(row, where, '{"prompt": ..., "chosen": ..., "rejected": ...}', PairDataError)
    check_known_keys(row, JSONL_KEYS, where, PairDataError, "A line's", JSONL_RENAMES)
    missing = [k for k in ("prompt", *JSONL_PATHS) if k not in row]
    if missing:
        raise PairDataError(f"{where}: missing key(s) {missing}; every line needs prompt, chosen and rejected")
    for key in ("prompt", *JSONL_PATHS):
        check_text(row, key, where, PairDataError)
    for key in JSONL_PATH_LISTS:
        check_text_list(row, key, where, PairDataError)
    if row.get("prior_mask") is not None and not isinstance(row["prior_mask"], str):
        raise PairDataError(f"{where}: prior_mask must be an image path or null, got {row['prior_mask']!r}")
    scores = row.get("subject_scores")
    if scores is not None and not subject_scores_fit(scores, len(row.get("references", []))):
        raise PairDataError(f"{where}: subject_scores must be [[chosen scores], [rejected scores]] with one finite "
                            f"number per reference ({len(row.get('references', []))}), got {scores!r}")
    if "pair_id" in row and not isinstance(row["pair_id"], (str, int)):
        raise PairDataError(f"{where}: pair_id must be a string, got {row['pair_id']!r}")


def check_json_object(row, where: str, example: str, error: type[Exception]) -> None:
    """A jsonl line holds one object: a list or a bare value has no named fields to read."""
    if not isinstance(row, dict):
        raise error(f"{where}: expected a JSON object like {example}, got a {type(row).__name__}")


def check_known_keys(row: dict, known: tuple[str, ...], where: str, error: type[Exception], whose: str,
                     renames: dict[str, str] | None = None) -> None:
    """Refuse a key the reader does not know: a misspelt one ('referneces') would silently drop its data."""
    import difflib

    for key in (k for k in row if k not in known):
        near = (renames or {}).get(key) or next(iter(difflib.get_close_matches(key, known, n=1)), None)
        hint = f"; did you mean {near!r}?" if near else "."
        raise error(f"{where}: unknown key {key!r}{hint} {whose} keys are {', '.join(known)}")


def check_text(row: dict, key: str, where: str, error: type[Exception]) -> None:
    """``row[key]`` is a non-empty string (a prompt or an image path)."""
    if not isinstance(row[key], str) or not row[key]:
        raise error(f"{where}: {key} must be a non-empty string, got {row[key]!r}")


def check_text_list(row: dict, key: str, where: str, error: type[Exception], what: str = "image paths") -> None:
    """``row[key]`` (optional) is a list of strings: a lone string would be read character by character."""
    value = row.get(key, [])
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        hint = f" (write [{value!r}])" if isinstance(value, str) else ""
        raise error(f"{where}: {key} must be a list of {what}, got {value!r}{hint}")


def subject_scores_fit(scores, references: int) -> bool:
    """``scores`` is two lists of ``references`` finite numbers (chosen, rejected)."""
    rows_ok = isinstance(scores, list) and len(scores) == 2 and all(isinstance(r, list) for r in scores)
    return rows_ok and all(len(r) == references and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                        and math.isfinite(v) for v in r) for r in scores)

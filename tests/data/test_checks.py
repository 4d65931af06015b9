"""Every pair is checked up front, before any model loads, with a message naming its line or pair."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from focusdpo.config.training import DataConfig
from focusdpo.data.checks import open_image
from focusdpo.data.collate import PairCollator
from focusdpo.data.load import load_pairs, load_recipe_pairs
from focusdpo.errors import ConfigError, PairDataError

from conftest import jsonl_folder, png

GOOD = {"prompt": "a dog", "chosen": "w.png", "rejected": "l.png"}


@pytest.mark.parametrize("line, files, message", [
    ('["a dog", "w.png", "l.png"]', {}, r"pairs.jsonl line 2: expected a JSON object .* got a list"),
    ({"prompt": "a dog", "chosen": "w.png"}, {}, r"line 2: missing key\(s\) \['rejected'\]"),
    ({**GOOD, "prompt": None}, {}, "line 2: prompt must be a non-empty string, got None"),
    ({**GOOD, "prompt": " "}, {}, r"pair line-2: the prompt is empty .* write the caption, or drop the pair"),
    ({**GOOD, "chosen": 3}, {}, "line 2: chosen must be a non-empty string, got 3"),
    ({**GOOD, "references": "r.png"}, {}, r"line 2: references must be a list .*write \['r.png'\]"),
    ({**GOOD, "prior_mask": [1]}, {}, r"line 2: prior_mask must be an image path or null"),
    ({**GOOD, "references": ["r.png"], "reference_masks": ["m.png"]}, {"m.png": png("white", (8, 8), "L")},
     r"pair line-2: reference_masks\[0\] is 8x8 but references\[0\] is 16x16"),
    ({**GOOD, "prior_mask": "m.png"}, {"m.png": png("white", (16, 8), "L")},
     "pair line-2: prior_mask is 16x8 but chosen is 16x16"),
    ({**GOOD, "references": ["r.png"] * 7}, {}, "pair line-2 has 7 references but max_references=6"),
    ({**GOOD, "rejected": "cut.png"}, {"cut.png": png("blue")[:-20]}, r"pair line-2: rejected .*cut.png.* truncated"),
    ({**GOOD, "id": "x7"}, {}, r"line 2: unknown key 'id'; did you mean 'pair_id'\? A line's keys are prompt, chosen"),
    ({**GOOD, "referneces": ["r.png"]}, {}, r"line 2: unknown key 'referneces'; did you mean 'references'\?"),
    ({**GOOD, "prior_mask": "m.png"}, {"m.png": png("black", (16, 16), "L")},
     r"pair line-2: prior_mask image \(.*m.png\) is blank \(every pixel 0\).*leave prior_mask out"),
    ({**GOOD, "prior_mask": "m.png"}, {"m.png": png(1, (16, 16), "L")},
     r"pair line-2: prior_mask image \(.*m.png\) holds only 0 and 1.*save it as 0 and 255"),
    ({**GOOD, "references": ["r.png"], "reference_masks": ["m.png"]}, {"m.png": png("black", (16, 16), "L")},
     r"pair line-2: reference_masks image \(.*m.png\) is blank"),
])
def test_bad_pairs_are_named_by_line_or_pair(tmp_path, line, files, message):
    with pytest.raises(PairDataError, match=message):
        load_pairs(jsonl_folder(tmp_path, [GOOD, line], files), max_references=6)


def test_the_whole_dataset_is_checked_not_only_the_first_pairs(tmp_path):
    lines = [GOOD] * 20 + [{**GOOD, "chosen": "bad.png", "pair_id": "p21"}]
    with pytest.raises(PairDataError, match=r"pair p21: chosen image .*bad.png"):
        load_pairs(jsonl_folder(tmp_path, lines, {"bad.png": b"not an image"}))


def test_on_bad_pair_skip_logs_counts_and_drops(tmp_path, capsys):
    lines = [GOOD, {**GOOD, "chosen": "bad.png", "pair_id": "p2"}, GOOD]
    pairs = load_pairs(jsonl_folder(tmp_path, lines, {"bad.png": b"junk"}), on_bad_pair="skip")
    assert pairs["pair_id"] == ["line-1", "line-3"]
    err = capsys.readouterr().err
    assert "skipped: pair p2: chosen image" in err and "dropped 1 of 3 pairs" in err
    with pytest.raises(PairDataError, match="no pairs left: all 1 pairs are bad"):
        load_pairs(jsonl_folder(tmp_path, [{**GOOD, "chosen": "bad.png"}]), on_bad_pair="skip")


def noise_png():
    buffer = io.BytesIO()
    Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()  # ~3 kB: cutting it short truncates the pixel data itself


def test_truncated_image_names_the_pair_and_column(tmp_path):
    jsonl_folder(tmp_path, [{"pair_id": "p7", "prompt": "x", "chosen": "w.png", "rejected": "l.png"}],
                 {"w.png": noise_png()[:500], "l.png": png("blue")})
    with pytest.raises(PairDataError, match=r"pair p7: chosen image .*w.png.* cannot be read"):
        load_pairs(str(tmp_path))  # caught when loading, before any model loads


def test_chosen_and_rejected_of_different_sizes(tmp_path):
    jsonl_folder(tmp_path, [{"prompt": "x", "chosen": "w.png", "rejected": "l.png"}],
                 {"w.png": png("red", (16, 16)), "l.png": png("blue", (16, 24))})
    with pytest.raises(PairDataError, match="chosen is 16x16 but rejected is 16x24"):
        load_pairs(str(tmp_path))


def test_sixteen_bit_png_keeps_its_grey_level(tmp_path):
    grey = Image.fromarray(np.full((16, 16), 32896, np.uint16))  # 128 * 257: mid grey in 16 bits
    grey.save(tmp_path / "w.png")
    Image.fromarray(np.zeros((16, 16), np.uint16)).save(tmp_path / "l.png")
    pairs = load_pairs(jsonl_folder(tmp_path, [GOOD], {"w.png": (tmp_path / "w.png").read_bytes(),
                                                       "l.png": (tmp_path / "l.png").read_bytes()}))
    chosen = (PairCollator(16)([pairs[0]])["pixel_values"][0] + 1) / 2
    assert chosen.mean().item() == pytest.approx(128 / 255, abs=1e-3)  # PIL's own convert gives white (1.0)


def test_jsonl_pairs_carry_subject_scores_and_a_wrong_count_names_the_line(tmp_path):
    from PIL import Image

    for name in ("w.png", "l.png", "a.png", "b.png"):
        Image.new("RGB", (16, 16), "red").save(tmp_path / name)
    good = {"prompt": "a dog and a cat", "chosen": "w.png", "rejected": "l.png", "references": ["a.png", "b.png"],
            "subject_scores": [[0.9, 0.2], [0.1, 0.8]]}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(good) + "\n")
    torch.testing.assert_close(torch.tensor(load_pairs(str(tmp_path))["subject_scores"]),
                               torch.tensor([[[0.9, 0.2], [0.1, 0.8]]]))
    (tmp_path / "pairs.jsonl").write_text(json.dumps({**good, "subject_scores": [[0.9], [0.1]]}) + "\n")
    with pytest.raises(PairDataError, match="pairs.jsonl line 1: subject_scores must be .* per reference \\(2\\)"):
        load_pairs(str(tmp_path))


def oriented_png(size, orientation, colour="red") -> bytes:
    """A PNG stored ``size`` with an EXIF orientation (6 and 8: displayed turned by 90°, width and height swapped);
    its stored top-left pixel is blue, to see where it is displayed."""
    image = Image.new("RGB", size, colour)
    image.putpixel((0, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    return buffer.getvalue()


def test_a_pair_is_compared_at_its_displayed_sizes(tmp_path):
    """Both stored 16x24; the winner's orientation turns it to 24x16, the size the loader would train on."""
    jsonl_folder(tmp_path, [GOOD], {"w.png": oriented_png((16, 24), 6), "l.png": png("blue", (16, 24))})
    with pytest.raises(PairDataError, match="chosen is 24x16 but rejected is 16x24"):
        load_pairs(str(tmp_path))


def test_turned_images_with_masks_of_their_displayed_size_load_upright(tmp_path):
    line = {**GOOD, "references": ["r.png"], "reference_masks": ["m.png"], "prior_mask": "p.png"}
    mask = png("white", (24, 16), "L")
    files = {"w.png": oriented_png((16, 24), 6), "l.png": png("blue", (24, 16)), "r.png": oriented_png((16, 24), 8),
             "m.png": mask, "p.png": mask}
    row = load_pairs(jsonl_folder(tmp_path, [line], files))[0]
    chosen, reference = open_image(row["chosen"], "chosen", "x"), open_image(row["references"][0], "references", "x")
    assert chosen.size == reference.size == (24, 16)
    assert chosen.getpixel((23, 0)) == reference.getpixel((0, 15)) == (0, 0, 255)  # 90° clockwise / anticlockwise
    assert PairCollator(16)([row])["prior_mask"][0].shape == (16, 16)


def pixels_cut_short() -> bytes:
    """A PNG whose pixel data stops half-way but whose header and end marker are sound."""
    data = noise_png()
    return data[:1500] + data[-12:]  # the IEND chunk


def test_verify_images_full_decodes_every_image_before_the_model_loads(tmp_path):
    lines = [GOOD, {**GOOD, "pair_id": "p2", "references": ["cut.png"]}]
    folder = jsonl_folder(tmp_path, lines, {"cut.png": pixels_cut_short()})
    assert len(load_pairs(folder)) == 2  # the header check cannot see it: it would fail mid-run
    with pytest.raises(PairDataError, match=r"pair p2: references image .*cut.png.* cannot be read: image file is "
                                            r"truncated\. Replace the file .* or drop the pair \(on_bad_pair: skip\)"):
        load_recipe_pairs(DataConfig(dataset=folder, verify_images="full"))
    assert load_pairs(folder, verify_images="full", on_bad_pair="skip")["pair_id"] == ["line-1"]
    with pytest.raises(ConfigError, match="verify_images='pixels'"):
        DataConfig(verify_images="pixels")

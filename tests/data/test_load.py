"""Pair schema, importers and collation to [w; l], with the errors a user meets on bad data."""

import io
import json

import pytest
import torch
from datasets import Dataset
from PIL import Image

from focusdpo.data.collate import PairCollator
from focusdpo.errors import PairDataError
from focusdpo.data.load import load_pairs


def png(colour, size=(16, 16)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_toy_pairs_follow_the_schema_and_collate_winners_first():
    ds = load_pairs("toy", toy_num_pairs=4, resolution=32)
    assert len(ds) == 4
    assert {"pair_id", "prompt", "chosen", "rejected", "references", "prior_mask"} <= set(ds.column_names)
    rows = [ds[0], ds[1]]
    batch = PairCollator(32)(rows)
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert batch["pair_ids"] == ["toy-00000", "toy-00001"]
    assert 2 <= batch["references"][0].shape[0] <= 3 and batch["prior_mask"][0].shape == (32, 32)
    # instance disruption: winner and loser differ only inside the prior mask
    diff = (batch["pixel_values"][0] - batch["pixel_values"][2]).abs().sum(0)
    assert diff[batch["prior_mask"][0] == 0].max() < 0.1 and diff.max() > 0.5


def noise_png():
    buffer = io.BytesIO()
    Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()  # ~3 kB: cutting it short truncates the pixel data itself


def write_jsonl_folder(folder, rows, images):
    for name, data in images.items():
        (folder / name).write_bytes(data)
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def test_jsonl_folder_import(tmp_path):
    write_jsonl_folder(tmp_path, [{"prompt": "a dog", "chosen": "w.png", "rejected": "l.png", "references": ["r.png"]}],
                       {"w.png": png("red"), "l.png": png("blue"), "r.png": png("green")})
    ds = load_pairs(str(tmp_path))
    batch = PairCollator(16)([ds[0]])
    assert batch["prompts"] == ["a dog"]
    assert torch.allclose(batch["pixel_values"][0, 0], torch.ones(16, 16))  # red winner first
    assert torch.allclose(batch["pixel_values"][1, 2], torch.ones(16, 16))  # blue loser second
    assert batch["references"][0].shape == (1, 3, 16, 16)


def test_pickapic_import_drops_ties_and_swaps_when_label_0_is_0(tmp_path):
    red, blue = png("red"), png("blue")
    Dataset.from_dict({"jpg_0": [red, red, red], "jpg_1": [blue, blue, blue], "label_0": [1.0, 0.0, 0.5],
                       "caption": ["first wins", "second wins", "tie"]}).to_parquet(str(tmp_path / "p.parquet"))
    ds = load_pairs(str(tmp_path / "p.parquet"))
    assert ds["prompt"] == ["first wins", "second wins"]
    batch = PairCollator(16)([ds[0], ds[1]])
    winners_red = batch["pixel_values"][:2, 0].mean(dim=(1, 2))
    assert winners_red.tolist() == pytest.approx([1.0, -1.0])  # pair 2: the blue image won


@pytest.mark.parametrize("rows, message", [
    ({"prompt": ["x"], "chosen": [png("red")]}, r"lacks column\(s\) \['rejected'\]"),
    ({"prompt": [], "chosen": [], "rejected": []}, "holds no pairs"),
])
def test_bad_datasets_are_named(tmp_path, rows, message):
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(PairDataError, match=message):
        load_pairs(str(tmp_path / "ds"))


def test_missing_dataset_path():
    with pytest.raises(PairDataError, match="does not exist"):
        load_pairs("/nonexistent/pairs")


def test_truncated_image_names_the_pair_and_column(tmp_path):
    write_jsonl_folder(tmp_path, [{"pair_id": "p7", "prompt": "x", "chosen": "w.png", "rejected": "l.png"}],
                       {"w.png": noise_png()[:500], "l.png": png("blue")})
    with pytest.raises(PairDataError, match=r"pair p7: chosen image .*w.png.* cannot be read"):
        load_pairs(str(tmp_path))  # caught when loading, before any model loads


def test_chosen_and_rejected_of_different_sizes(tmp_path):
    write_jsonl_folder(tmp_path, [{"prompt": "x", "chosen": "w.png", "rejected": "l.png"}],
                       {"w.png": png("red", (16, 16)), "l.png": png("blue", (16, 24))})
    with pytest.raises(PairDataError, match="chosen is 16x16 but rejected is 16x24"):
        load_pairs(str(tmp_path))


def test_missing_image_file_in_jsonl(tmp_path):
    write_jsonl_folder(tmp_path, [{"prompt": "x", "chosen": "w.png", "rejected": "gone.png"}], {"w.png": png("red")})
    with pytest.raises(PairDataError, match="line 1: image 'gone.png' not found"):
        load_pairs(str(tmp_path))

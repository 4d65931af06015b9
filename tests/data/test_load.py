"""Loading pairs: jsonl folders, saved datasets and their errors, what a load writes, and which image columns a step
decodes."""

import io
import os

import pytest
import torch
from datasets import Dataset, Image, load_from_disk
from PIL import Image as PILImage

from focusdpo.commands import main as cli
from focusdpo.config.training import DataConfig
from focusdpo.data.collate import PairCollator
from focusdpo.data.load import load_pairs
from focusdpo.data.toy import make_toy_pairs
from focusdpo.errors import ConfigError, PairDataError

from conftest import FAST_ARGS, embed_latents, folder_bytes, jsonl_folder, png


def test_jsonl_folder_import(tmp_path):
    jsonl_folder(tmp_path, [{"prompt": "a dog", "chosen": "w.png", "rejected": "l.png", "references": ["r.png"]}],
                 {"w.png": png("red"), "l.png": png("blue"), "r.png": png("green")})
    ds = load_pairs(str(tmp_path))
    batch = PairCollator(16)([ds[0]])
    assert batch["prompts"] == ["a dog"]
    assert torch.allclose(batch["pixel_values"][0, 0], torch.ones(16, 16))  # red winner first
    assert torch.allclose(batch["pixel_values"][1, 2], torch.ones(16, 16))  # blue loser second
    assert batch["references"][0].shape == (1, 3, 16, 16)


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


def test_missing_image_file_in_jsonl(tmp_path):
    jsonl_folder(tmp_path, [{"prompt": "x", "chosen": "w.png", "rejected": "gone.png"}], {"w.png": png("red")})
    with pytest.raises(PairDataError, match="line 1: image 'gone.png' not found"):
        load_pairs(str(tmp_path))


def test_max_train_samples_counts_after_pickapic_ties(scratch):
    png = io.BytesIO()
    PILImage.new("RGB", (8, 8), "red").save(png, format="PNG")
    rows = {"jpg_0": [png.getvalue()] * 5, "jpg_1": [png.getvalue()] * 5, "label_0": [0.5, 1.0, 0.5, 0.0, 1.0],
            "caption": list("abcde")}
    Dataset.from_dict(rows).to_parquet(str(scratch / "p.parquet"))
    assert load_pairs(str(scratch / "p.parquet"), max_samples=2)["prompt"] == ["b", "d"]
    assert len(load_pairs("toy", toy_num_pairs=5, max_samples=3)) == 3
    with pytest.raises(ConfigError, match="max_train_samples=0"):
        DataConfig(max_train_samples=0)


def test_loading_a_saved_dataset_writes_nothing(scratch):
    make_toy_pairs(32, 32).save_to_disk(str(scratch / "pairs"))
    before = folder_bytes(scratch)
    for _ in range(2):
        pairs = load_pairs(str(scratch / "pairs"), max_samples=20)
        PairCollator(32)([pairs[0], pairs[19]])
    assert folder_bytes(scratch) == before  # no cache-*.arrow beside the data, in the HF cache or in tmp
    assert load_from_disk(str(scratch / "pairs")).features["chosen"] == Image()  # saved decodable
    assert isinstance(load_from_disk(str(scratch / "pairs"))[0]["references"][0], PILImage.Image)


@pytest.mark.e2e
def test_reading_a_dataset_writes_nothing_into_its_folder(tmp_path):
    cli(["pairs", "--out", str(tmp_path / "ds"), "--num_pairs", "2", "--resolution", "16"])
    before = sorted(os.listdir(tmp_path / "ds"))
    load_pairs(str(tmp_path / "ds"))
    assert sorted(os.listdir(tmp_path / "ds")) == before  # a read-only location would have failed here


def test_images_are_decoded_whenever_a_reader_of_them_is_not_cached():
    from focusdpo.data.load import needs_pixels

    cached = ["latents", "reference_latents", "focus_maps", "mosaic_points"]
    assert not needs_pixels(cached, flow=True, focus_on=True, mosaic_on=True)
    assert not needs_pixels(["latents"], flow=False, focus_on=False, mosaic_on=False)  # SD reads no references
    for missing, flow, focus_on, mosaic_on in (("latents", False, False, False), ("reference_latents", True, False,
                                               False), ("focus_maps", False, True, False),
                                               ("mosaic_points", True, False, True)):
        assert needs_pixels([c for c in cached if c != missing], flow, focus_on, mosaic_on), missing


@pytest.mark.e2e
def test_a_dataset_no_step_decodes_from_drops_its_image_columns_and_the_batch_keeps_reference_counts(tmp_path):
    """pixels=False: the image columns are left out of the rows (their bytes stay in arrow); the collator's batch equals
    the one from the full rows, the reference counts read from the cached reference latents."""
    from focusdpo.data.load import with_array_format
    from focusdpo.data.schema import IMAGE_COLUMNS

    cached = load_pairs(embed_latents(tmp_path, [*FAST_ARGS, "--family", "flux2", "--toy_num_pairs", "6"]))
    full, counted = with_array_format(cached), with_array_format(cached, pixels=False)
    assert not set(IMAGE_COLUMNS) & set(counted.column_names)
    indices = [4, 0, 3, 3]
    got, want = [counted[i] for i in indices], [full[i] for i in indices]
    assert any(row["references"] for row in want)  # the toy pairs have references: the counts are checked
    fast, slow = PairCollator(32, pixels=False)(got), PairCollator(32)(want)
    assert [len(r) for r in fast["references"]] == [len(r) for r in slow["references"]]
    assert torch.equal(fast["latents"], slow["latents"]) and fast["pair_ids"] == slow["pair_ids"]
    assert "pixel_values" not in fast


def test_a_cut_arrow_file_is_refused_naming_the_file(tmp_path, capsys):
    """A save_to_disk folder copied or written only in part: its .arrow file lacks arrow's end-of-stream marker."""
    make_toy_pairs(4, 16).save_to_disk(str(tmp_path / "pairs"))
    data = next((tmp_path / "pairs").glob("*.arrow"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(PairDataError, match=r"dataset .*pairs.*: data-00000-of-00001.arrow is cut short .* copy"):
        load_pairs(str(tmp_path / "pairs"))
    data.write_bytes(data.read_bytes() + b"\xff\xff\xff\xff\x00\x00\x00\x00")  # cut, yet ending in the marker
    with pytest.raises(PairDataError, match=r"dataset .*pairs.* cannot be read"):
        load_pairs(str(tmp_path / "pairs"))

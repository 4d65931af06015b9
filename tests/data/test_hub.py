"""Pairs the way the hub stores them: split-named parquet folders, pair-schema parquet, hub ids, and Pick-a-Pic's
layout (ties, swapped labels, invalid labels)."""

import io

import datasets
import pytest
from datasets import Dataset, Image, load_from_disk
from PIL import Image as PILImage

from focusdpo.config.recipe import parse_config
from focusdpo.data.collate import PairCollator
from focusdpo.data.load import load_pairs, save_dataset
from focusdpo.data.toy import make_toy_pairs
from focusdpo.errors import PairDataError
from focusdpo.training.trainer import build_trainer

from conftest import REPO, folder_bytes, png


def test_hub_style_parquet_folder_with_splits(scratch):
    toy = make_toy_pairs(6, 32)
    (scratch / "hub" / "data").mkdir(parents=True)
    toy.select(range(4)).to_parquet(str(scratch / "hub" / "data" / "train-00000-of-00001.parquet"))
    toy.select(range(4, 6)).to_parquet(str(scratch / "hub" / "data" / "test-00000-of-00001.parquet"))
    train = load_pairs(str(scratch / "hub"))
    assert train["pair_id"] == toy["pair_id"][:4]  # the pair schema, not read as Pick-a-Pic
    assert [len(r) for r in train["references"]] == [len(r) for r in toy["references"][:4]]
    assert load_pairs(str(scratch / "hub"), split="test")["pair_id"] == toy["pair_id"][4:]
    with pytest.raises(PairDataError, match=r"no split 'validation'; its splits are \['test', 'train'\]"):
        load_pairs(str(scratch / "hub"), split="validation")


def test_parquet_is_told_apart_by_its_columns(scratch):
    Dataset.from_dict({"text": ["x"], "image": [b"1"]}).to_parquet(str(scratch / "odd.parquet"))
    with pytest.raises(PairDataError, match=r"columns \['text', 'image'\]: neither the pair schema"):
        load_pairs(str(scratch / "odd.parquet"))
    with pytest.raises(PairDataError, match="only the 'train' split, but dataset_split is 'test'"):
        load_pairs(str(scratch / "odd.parquet"), split="test")


def test_pickapic_import_drops_ties_and_swaps_when_label_0_is_0(tmp_path):
    red, blue = png("red"), png("blue")
    Dataset.from_dict({"jpg_0": [red, red, red], "jpg_1": [blue, blue, blue], "label_0": [1.0, 0.0, 0.5],
                       "caption": ["first wins", "second wins", "tie"]}).to_parquet(str(tmp_path / "p.parquet"))
    ds = load_pairs(str(tmp_path / "p.parquet"))
    assert ds["prompt"] == ["first wins", "second wins"]
    batch = PairCollator(16)([ds[0], ds[1]])
    winners_red = batch["pixel_values"][:2, 0].mean(dim=(1, 2))
    assert winners_red.tolist() == pytest.approx([1.0, -1.0])  # pair 2: the blue image won


def test_pickapic_invalid_labels_are_counted_and_no_pairs_left_says_why(tmp_path, capsys):
    red, blue = png("red"), png("blue")
    Dataset.from_dict({"jpg_0": [red] * 4, "jpg_1": [blue] * 4, "label_0": [1.0, 0.5, 2.0, None],
                       "caption": ["a", "tie", "bad", "none"]}).to_parquet(str(tmp_path / "p.parquet"))
    assert load_pairs(str(tmp_path / "p.parquet"))["prompt"] == ["a"]
    assert "1 of 4 rows kept; dropped 1 ties (label_0 = 0.5) and 2 invalid label_0" in capsys.readouterr().err
    Dataset.from_dict({"jpg_0": [red] * 2, "jpg_1": [blue] * 2, "label_0": [0.5, 7.0],
                       "caption": ["tie", "bad"]}).to_parquet(str(tmp_path / "q.parquet"))
    with pytest.raises(PairDataError, match="no pairs left in .*q.parquet: of 2 rows, 1 ties .* and 1 invalid"):
        load_pairs(str(tmp_path / "q.parquet"))


def test_pickapic_is_copied_once(scratch):
    toy = make_toy_pairs(12, 64)
    images = toy.cast_column("chosen", Image(decode=False)).cast_column("rejected", Image(decode=False))
    rows = {"jpg_0": [r["bytes"] for r in images["chosen"]], "jpg_1": [r["bytes"] for r in images["rejected"]],
            "label_0": [1.0] * 12, "caption": toy["prompt"]}
    Dataset.from_dict(rows).to_parquet(str(scratch / "p.parquet"))
    image_bytes = sum(len(b) for b in rows["jpg_0"] + rows["jpg_1"])
    before = sum(folder_bytes(scratch).values())
    for _ in range(2):  # the second load reuses the first one's copy
        pairs = load_pairs(str(scratch / "p.parquet"))
    written = sum(folder_bytes(scratch).values()) - before
    assert image_bytes < written < 1.2 * image_bytes and not folder_bytes(scratch / "tmp")
    save_dataset(pairs, str(scratch / "imported"))  # the import: its one copy of the output
    saved = load_from_disk(str(scratch / "imported"))
    assert saved.features["chosen"] == Image() and saved[0]["chosen"].size == (64, 64)  # decodable
    assert load_pairs(str(scratch / "imported"))["pair_id"] == [f"pickapic-{i}" for i in range(12)]


def test_hub_id_offline_is_refused_before_the_model_loads(tmp_path):
    argv = ["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "--output_dir", str(tmp_path / "run"),
            "--dataset", "someone/pick-a-pic-like", "--dataset_split", "validation"]
    with pytest.raises(PairDataError, match="would be read from the Hugging Face hub, but HF_HUB_OFFLINE is set"):
        build_trainer(*parse_config(argv))
    assert not (tmp_path / "run").exists()


def test_hub_pickapic_rows_are_converted_like_local_ones(scratch, monkeypatch):
    """The online path past the offline guard, on a local folder (load_dataset reads both the same way)."""
    from focusdpo.data.hub import load_hub_pairs
    png, loser = io.BytesIO(), io.BytesIO()
    PILImage.new("RGB", (8, 8), "red").save(png, format="PNG")
    PILImage.new("RGB", (8, 8), "blue").save(loser, format="PNG")
    (scratch / "hub" / "data").mkdir(parents=True)
    Dataset.from_dict({"jpg_0": [png.getvalue(), loser.getvalue()], "jpg_1": [loser.getvalue(), png.getvalue()],
                       "label_0": [1.0, 0.0], "caption": ["a", "b"]}).to_parquet(
        str(scratch / "hub" / "data" / "train-00000-of-00001.parquet"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    pairs = load_hub_pairs(str(scratch / "hub"), "train")
    assert pairs["prompt"] == ["a", "b"]
    assert [pairs[i]["chosen"].getpixel((0, 0)) for i in range(2)] == [(255, 0, 0)] * 2  # the winners, swapped


def test_pickapic_empty_caption_is_refused_like_jsonl(tmp_path, capsys):
    """An empty caption makes an unconditional pair: refused naming the row, as jsonl refuses it (test_checks)."""
    red, blue = png("red"), png("blue")
    Dataset.from_dict({"jpg_0": [red] * 3, "jpg_1": [blue] * 3, "label_0": [1.0] * 3,
                       "caption": ["a dog", "", " "]}).to_parquet(str(tmp_path / "p.parquet"))
    with pytest.raises(PairDataError, match=r"pair pickapic-1: the prompt is empty \(''\); .* write the caption, "
                                            r"or drop the pair \(on_bad_pair: skip\)"):
        load_pairs(str(tmp_path / "p.parquet"))
    assert load_pairs(str(tmp_path / "p.parquet"), on_bad_pair="skip")["prompt"] == ["a dog"]
    assert "dropped 2 of 3 pairs" in capsys.readouterr().err

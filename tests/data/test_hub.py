"""Pairs the way the hub stores them: split-named parquet folders, pair-schema parquet, hub ids, sample limits,
the disk a load writes, and focus maps for pairs without references."""

import io
import tempfile
from pathlib import Path

import datasets
import pytest
import torch
from datasets import Dataset, Image, load_from_disk
from PIL import Image as PILImage

from focusdpo.errors import ConfigError
from focusdpo.config.training import DataConfig
from focusdpo.config.focus import FocusConfig

from focusdpo.config.recipe import parse_config
from focusdpo.data.collate import PairCollator
from focusdpo.errors import PairDataError
from focusdpo.data.load import check_pairs, load_pairs
from focusdpo.focus.maps import complexity_map
from focusdpo.focus.mapper import precompute_focus_maps
from focusdpo.data.toy import make_toy_pairs
from focusdpo.data.load import save_dataset
from focusdpo.training.trainer import build_trainer

from conftest import REPO

TINY = dict(dino_random_weights=True, dino_depth=2, dino_image_size=56)


def folder_bytes(path: Path) -> dict[str, int]:
    return {str(f.relative_to(path)): f.stat().st_size for f in path.rglob("*") if f.is_file()}


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """The datasets cache and the temp dir inside tmp_path, so that every byte a load writes is counted."""
    for name in ("hf-cache", "tmp"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return tmp_path


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


def test_hub_id_offline_is_refused_before_the_model_loads(tmp_path):
    argv = ["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "--output_dir", str(tmp_path / "run"),
            "--dataset", "someone/pick-a-pic-like", "--dataset_split", "validation"]
    with pytest.raises(PairDataError, match="would be read from the Hugging Face hub, but HF_HUB_OFFLINE is set"):
        build_trainer(*parse_config(argv))
    assert not (tmp_path / "run").exists()


def test_loading_a_saved_dataset_writes_nothing(scratch):
    make_toy_pairs(32, 32).save_to_disk(str(scratch / "pairs"))
    before = folder_bytes(scratch)
    for _ in range(2):
        pairs = load_pairs(str(scratch / "pairs"), max_samples=20)
        PairCollator(32)([pairs[0], pairs[19]])
    assert folder_bytes(scratch) == before  # no cache-*.arrow beside the data, in the HF cache or in tmp
    assert load_from_disk(str(scratch / "pairs")).features["chosen"] == Image()  # saved decodable
    assert isinstance(load_from_disk(str(scratch / "pairs"))[0]["references"][0], PILImage.Image)


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


def test_detail_term_without_references():
    pairs = make_toy_pairs(3, 32).map(lambda row: {"references": [], "reference_masks": []})
    pairs = check_pairs(pairs, "toy without references")
    cached = precompute_focus_maps(pairs, FocusConfig(lambda_detail=1.0, **TINY), (8, 8), 32, batch_size=2)
    maps = torch.tensor(cached["focus_maps"])  # (B, [w, l], [structure, detail], h, w)
    batch = PairCollator(32)([pairs[i] for i in range(3)])
    expected = complexity_map((batch["pixel_values"] + 1) / 2, (8, 8))
    assert maps[:, :, 0].abs().max() == 0
    torch.testing.assert_close(torch.cat([maps[:, 0, 1], maps[:, 1, 1]]).float(), expected, atol=1e-3, rtol=1e-3)
    with pytest.raises(PairDataError, match="pair toy-00000 has no references: the structure term"):
        precompute_focus_maps(pairs, FocusConfig(lambda_structure=1.0, **TINY), (8, 8), 32)


def test_structure_term_on_pairs_without_references_is_refused_before_the_model_loads(tmp_path):
    refs = make_toy_pairs(3, 32).map(lambda row, i: {"references": [] if i == 1 else row["references"],
                                                     "reference_masks": []}, with_indices=True)
    refs.save_to_disk(str(tmp_path / "pairs"))
    argv = ["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "--output_dir", str(tmp_path / "run"),
            "--dataset", str(tmp_path / "pairs"), "--lambda_structure", "1"]
    with pytest.raises(PairDataError, match="pair toy-00001 has no references: the structure term"):
        build_trainer(*parse_config(argv))


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

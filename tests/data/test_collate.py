"""Collation to [winners; losers], with the optional pair columns."""

import pytest

from focusdpo.data.collate import PairCollator
from focusdpo.data.load import load_pairs
from focusdpo.errors import PairDataError

from conftest import png


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


def test_collator_passes_optional_pair_columns():
    image = {"bytes": png("red", (16, 16)), "path": None}
    row = dict(pair_id="p", prompt="x", chosen=image, rejected=image, references=[], reference_masks=[],
               prior_mask=None)
    rows = [dict(row, pair_weight=2.0, preference=0.8, original_size=[64, 48], crop_top_left=None),
            dict(row, pair_weight=None, preference=1.0, original_size=[[20, 30], [40, 50]], crop_top_left=[1, 2])]
    batch = PairCollator(16)(rows)
    assert batch["pair_weight"].tolist() == [2.0, 1.0]
    assert batch["preference"].tolist() == pytest.approx([0.8, 1.0])
    assert batch["original_size"].tolist() == [[64, 48], [20, 30], [64, 48], [40, 50]]  # [winners; losers]
    assert batch["crop_top_left"].tolist() == [[0, 0], [1, 2], [0, 0], [1, 2]]
    assert "pair_weight" not in PairCollator(16)([row])
    with pytest.raises(PairDataError, match=r"pair p: preference=0.2 must be in \[0.5, 1.0\]"):
        PairCollator(16)([dict(row, preference=0.2)])

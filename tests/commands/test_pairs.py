"""`focusdpo pairs` without a prompt set writes the toy pairs."""

import pytest

from focusdpo.commands import main as cli
from focusdpo.data.load import load_pairs


@pytest.mark.e2e
def test_pairs_command_writes_a_loadable_dataset(tmp_path):
    cli(["pairs", "--out", str(tmp_path / "toy"), "--num_pairs", "3", "--resolution", "48"])
    pairs = load_pairs(str(tmp_path / "toy"))
    assert len(pairs) == 3 and pairs[0]["pair_id"] == "toy-00000"

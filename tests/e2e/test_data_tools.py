"""The data_tools scripts run as a user runs them and write datasets the trainer loads."""

import subprocess
import sys

import pytest

from focusdpo.data.load import load_pairs

from conftest import REPO

pytestmark = pytest.mark.e2e


def test_import_script_converts_a_jsonl_folder(tmp_path):
    from PIL import Image

    source = tmp_path / "jsonl"
    source.mkdir()
    for name, colour in (("w.png", "red"), ("l.png", "blue")):
        Image.new("RGB", (16, 16), colour).save(source / name)
    (source / "pairs.jsonl").write_text('{"prompt": "a dog", "chosen": "w.png", "rejected": "l.png"}\n')
    subprocess.run([sys.executable, str(REPO / "data_tools" / "import_pairs.py"), str(source), "--out",
                    str(tmp_path / "out")], check=True, capture_output=True)
    assert load_pairs(str(tmp_path / "out"))["prompt"] == ["a dog"]


def test_dreambench_composite_script_writes_a_loadable_pair(tmp_path, dreambench):
    subprocess.run([sys.executable, str(REPO / "data_tools" / "dreambench_composite.py"), "--dreambench",
                    str(dreambench), "--out", str(tmp_path)], check=True, capture_output=True)
    pair = load_pairs(str(tmp_path))[0]
    assert pair["pair_id"] == "dog_can_swap_dog6" and len(pair["references"]) == len(pair["reference_masks"]) == 2

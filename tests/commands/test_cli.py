"""The command line: usage, the toy pair generator and the data_tools scripts."""

import subprocess
import sys

import pytest

from focusdpo.commands import main as cli
from focusdpo.data.load import load_pairs

from conftest import REPO


def test_usage_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["frobnicate"])
    assert exit_.value.code == 2
    out = capsys.readouterr().out
    assert all(name in out for name in ("train", "pairs", "focus", "embed", "inspect"))


def test_pairs_command_writes_a_loadable_dataset(tmp_path):
    cli(["pairs", "--out", str(tmp_path / "toy"), "--num_pairs", "3", "--resolution", "48"])
    pairs = load_pairs(str(tmp_path / "toy"))
    assert len(pairs) == 3 and pairs[0]["pair_id"] == "toy-00000"


def test_import_script_converts_a_jsonl_folder(tmp_path):
    from PIL import Image

    for name, colour in (("w.png", "red"), ("l.png", "blue")):
        Image.new("RGB", (16, 16), colour).save(tmp_path / name)
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "a dog", "chosen": "w.png", "rejected": "l.png"}\n')
    subprocess.run([sys.executable, str(REPO / "data_tools" / "import_pairs.py"), str(tmp_path), "--out",
                    str(tmp_path / "out")], check=True, capture_output=True)
    assert load_pairs(str(tmp_path / "out"))["prompt"] == ["a dog"]

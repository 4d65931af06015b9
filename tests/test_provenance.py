"""A resumable writer's record: a changed setting or input is named down to the field; the inputs of parts a rerun does
not use (an entry's reference, a variant's LoRA) are not compared, and are kept for a later run over them."""

import json

import pytest

from focusdpo.errors import OutputError
from focusdpo.provenance import RECORD_NAME, changed_inputs, check_record, write_record


def test_a_parts_input_is_compared_only_where_both_runs_used_it():
    old = {"prompts": "a", "reference r1.png": "1", "lora dpo": "x"}
    assert changed_inputs(old, {"prompts": "a", "reference r2.png": "2"}) == []  # other entries, variants
    assert changed_inputs(old, {"prompts": "b", "reference r1.png": "9", "lora dpo": "y"}) == [
        "lora dpo", "prompts", "reference r1.png"]
    assert changed_inputs({"prompts": "a", "dpo_lora": None}, {"prompts": "a", "dpo_lora": "z"}) == ["dpo_lora"]


def test_a_record_names_each_changed_setting_with_both_values_and_keeps_unused_digests(tmp_path):
    write_record(tmp_path, {"sampling": {"seed": 0, "steps": 2}, "inputs": {"reference a.png": "1"}})
    write_record(tmp_path, {"sampling": {"seed": 0, "steps": 2}, "inputs": {"reference b.png": "2"}})
    assert json.loads((tmp_path / RECORD_NAME).read_text())["inputs"] == {"reference a.png": "1",
                                                                          "reference b.png": "2"}
    check_record(tmp_path, {"inputs": {"reference a.png": "1"}}, OutputError, "images", "--out")  # a part: passes
    with pytest.raises(OutputError, match=r"holds images made with other settings or inputs \(changed: "
                                          r"sampling.seed \(0 → 1\); reference a.png\): write to a new --out"):
        check_record(tmp_path, {"sampling": {"seed": 1, "steps": 2}, "inputs": {"reference a.png": "3"}},
                     OutputError, "images", "--out")
    check_record(tmp_path / "fresh", {"sampling": {"seed": 5}}, OutputError, "images", "--out")  # nothing recorded

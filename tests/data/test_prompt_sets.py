"""Prompt sets for pair generation: UNO, DreamBench, XVerse and jsonl layouts, missing images listed."""

import json
import os

import pytest

from focusdpo.data.prompt_sets import load_prompt_set
from focusdpo.errors import PromptSetError

from conftest import SHARED_DATA


def test_uno_wrapper_resolves_against_data_root_with_classes(uno, dreambench):
    items = load_prompt_set(uno, data_root=dreambench)
    assert items.layout == "uno" and len(items) == 175 and not items.skipped
    first = items.items[0]
    assert first.prompt == "a bowl and a can in the jungle" and first.classes == ("bowl", "can")
    assert all(os.path.isfile(p) for p in first.references)


def test_jsonl_missing_images_are_listed_or_refused(tmp_path, dreambench):
    lines = [{"prompt": "a can", "references": [str(dreambench / "can" / "01.jpg")], "classes": ["can"]},
             {"prompt": "a ghost", "references": ["nowhere/ghost.jpg"]}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    items = load_prompt_set(path)
    assert [i.prompt for i in items.items] == ["a can"] and items.skipped[0][0] == "p-00001"
    with pytest.raises(PromptSetError, match="ghost.jpg"):
        load_prompt_set(path, missing="error")
    with pytest.raises(PromptSetError, match="layout"):
        load_prompt_set(path, layout="csv")


def test_dreambench_prompts_and_xverse_layout(dreambench):
    bench = load_prompt_set(dreambench / "prompts_and_classes.txt", unique_token="sks")
    dog = [i for i in bench.items if i.subjects[0] == "dog"]
    assert len(dog) == 25 and dog[10].prompt == "a sks dog wearing a red hat"  # live-subject list
    xverse = SHARED_DATA / "xversebench" / "XVerseBench_multi.json"
    if xverse.is_file():  # its images are not in the subset: every entry is listed as skipped, none silently
        loaded = load_prompt_set(xverse)
        assert len(loaded) == 0 and len(loaded.skipped) > 0


@pytest.mark.parametrize("line, message", [
    ('[1, 2]', r"p.jsonl line 1: expected a JSON object like \{\"prompt\": ..., \"references\": \[...\]\}, got a list"),
    ({"prompt": "a dog", "references": "r.png"}, r"line 1: references must be a list of image paths, got 'r.png' "
                                                 r"\(write \['r.png'\]\)"),
    ({"prompt": "a dog", "classes": "dog"}, r"line 1: classes must be a list of strings, got 'dog'"),
    ({"prompt": 3}, "line 1: prompt must be a non-empty string, got 3"),
    ({"prompt": "a dog", "reference": ["r.png"]}, r"line 1: unknown key 'reference'; did you mean 'references'\? An "
                                                  "entry's keys are prompt, references"),
])
def test_a_bad_jsonl_entry_is_named_by_its_line_not_walked(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text(line if isinstance(line, str) else json.dumps(line))
    with pytest.raises(PromptSetError, match=message):
        load_prompt_set(path)

"""Pair generation end to end with tiny in-process generators on the DreamBench subset (UNO prompts).

Sizes are toy (32 px, 2 candidates, 2 steps, a 1-block random DINOv2 at 56 px): the scores carry no meaning,
the tests check the plumbing: seeds, selection, DIP compositing, shards, resume, two processes, iterative
rounds, bad input (the prompt-set loaders: tests/data/test_prompt_sets.py).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from datasets import Image as ImageFeature
from datasets import load_from_disk

from focusdpo.config.pairs import build_pair_configs
from focusdpo.data.load import load_pairs
from focusdpo.data.prompt_sets import load_prompt_set
from focusdpo.errors import ConfigError, PairGenError, PromptSetError
from focusdpo.pairs.generate import generate_pairs

from conftest import REPO, SHARED_DATA, accelerate_launch

TINY = dict(data_root=str(SHARED_DATA / "dreambench"), num_candidates=2, steps=2, resolution=32, max_items=1,
            dino_random_weights=True, dino_depth=1, dino_image_size=56, min_similarity=-1.0, items_per_shard=1)


def configs(out, prompts, **overrides):
    return build_pair_configs({"prompts": str(prompts), "out": str(out), **TINY, **overrides})


def run(out, prompts, **overrides):
    return generate_pairs(*configs(out, prompts, **overrides))


def raw_rows(path):
    """Every column of a saved dataset with images as their stored bytes (for byte-exact comparison)."""
    ds = load_from_disk(str(path))
    for column in ("chosen", "rejected", "prior_mask"):
        ds = ds.cast_column(column, ImageFeature(decode=False))
    return ds.to_list()


# ---- generation ------------------------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("family", ["flux2", "flux_kontext", "sdxl"])
def test_each_family_generates_loadable_pairs(family, uno, tmp_path):
    summary = run(tmp_path, uno, family=family)
    assert summary["counts"]["kept"] == 1
    ds = load_pairs(summary["dataset"])
    row = ds[0]
    assert row["candidate_seeds"] == [0, 1] and row["chosen_seed"] != row["rejected_seed"]
    assert len(row["candidate_scores"]) == 2 and row["margin"] >= 0 and len(row["references"]) == 2
    info = json.loads(load_from_disk(summary["dataset"]).info.description)
    assert info["generator"]["family"] == family and info["scorer"]["weights"]
    if family == "flux2":  # and a FLUX.2 policy trains on its own pairs (SD trains in the round test)
        out = train_two_steps(summary["dataset"], tmp_path / "train", "--family", "flux2", "--beta", "500")
        assert (out / "pytorch_lora_weights.safetensors").is_file()


def train_two_steps(dataset, out, *extra):
    from focusdpo.commands.train import main

    main(["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "--dataset", dataset, "--output_dir", str(out),
          "--max_steps", "2", "--per_device_train_batch_size", "1", "--save_steps", "100", "--sample_every_run",
          "false", "--lambda_structure", "0", "--lambda_detail", "0", "--learning_rate", "0.05", *extra])
    return out


@pytest.mark.e2e
def test_iterative_round_uses_the_trained_lora(uno, tmp_path):
    first = run(tmp_path / "r1", uno, family="sd")
    lora = train_two_steps(first["dataset"], tmp_path / "train")
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    second = run(tmp_path / "r2", uno, family="sd", dpo_lora=str(lora))
    a, b = raw_rows(first["dataset"])[0], raw_rows(second["dataset"])[0]
    assert a["candidate_seeds"] == b["candidate_seeds"]
    assert a["candidate_scores"] != b["candidate_scores"]  # same seeds, other policy: other candidates
    assert json.loads(load_from_disk(second["dataset"]).info.description)["generator"]["dpo_lora"] == str(lora)


@pytest.mark.e2e
def test_dip_loser_equals_winner_outside_the_prior_mask(uno, tmp_path):
    summary = run(tmp_path / "dip", uno, family="sd", strategy="disrupt", inpaint_steps=2)
    assert summary["counts"]["kept"] == 1, summary["not_kept"]
    row = load_from_disk(summary["dataset"])[0]
    chosen, rejected = (np.asarray(row[k], dtype=int) for k in ("chosen", "rejected"))
    inside = np.asarray(row["prior_mask"]) > 0
    assert inside.any() and not inside.all()
    assert (chosen[~inside] == rejected[~inside]).all()
    assert (chosen[inside] != rejected[inside]).any()
    before, after = json.loads(row["score_parts"])["region_fidelity"]
    assert after < before
    load_pairs(summary["dataset"])  # prior_mask and all: loads in the trainer
    # a fidelity drop no region can reach: the pair is dropped and counted, with the reason
    dropped = run(tmp_path / "strict", uno, family="sd", strategy="disrupt", inpaint_steps=2, min_fidelity_drop=2.0)
    assert dropped["counts"]["dropped_dip"] == 1 and dropped["dataset"] is None
    assert "did not fall" in dropped["not_kept"][0]["reason"]


@pytest.mark.e2e
def test_dip_starts_from_a_real_target_image(dreambench, tmp_path):
    """A jsonl entry with ``target``: the real photo is the winner (not sampled) and the loser is it, repainted."""
    from PIL import Image

    entry = {"prompt": "a dog", "references": [str(dreambench / "dog" / "01.jpg")], "classes": ["dog"],
             "target": str(dreambench / "dog" / "00.jpg")}
    prompts = tmp_path / "real.jsonl"
    prompts.write_text(json.dumps(entry) + "\n")
    summary = run(tmp_path / "dip", prompts, family="sd", strategy="disrupt", inpaint_steps=2, data_root=None)
    assert summary["counts"]["kept"] == 1, summary["not_kept"]
    row = load_from_disk(summary["dataset"])[0]
    photo = Image.open(entry["target"]).convert("RGB").resize((32, 32), Image.BICUBIC)
    chosen, rejected = (np.asarray(row[k], dtype=int) for k in ("chosen", "rejected"))
    assert (chosen == np.asarray(photo, dtype=int)).all()  # the winner is the photo itself
    inside = np.asarray(row["prior_mask"]) > 0
    assert (chosen[~inside] == rejected[~inside]).all() and (chosen[inside] != rejected[inside]).any()


# ---- scale and safety: resume and two processes ----------------------------------------------------------------------
RECIPE_ARGS = ["--family", "sd", "--max_items", "4", "--num_candidates", "2", "--steps", "3", "--items_per_shard", "1",
               "--dino_random_weights", "true", "--dino_depth", "1", "--dino_image_size", "56",
               "--min_similarity", "-1.0", "--margin_threshold", "0.0"]


@pytest.fixture(scope="module")
def reference_run(uno, tmp_path_factory):
    """One uninterrupted single-process run of 4 entries."""
    out = tmp_path_factory.mktemp("reference")
    run(out, uno, family="sd", max_items=4, num_candidates=2, steps=3, margin_threshold=0.0)
    return out


def cli_args(out, uno):
    recipe = REPO / "recipes" / "pairs_tiny_cpu.yaml"
    return ["-m", "focusdpo", "pairs", "--config", str(recipe), "--prompts", uno, "--data_root",
            str(SHARED_DATA / "dreambench"), "--out", str(out), *RECIPE_ARGS]


@pytest.mark.e2e
def test_kill_and_resume_equals_an_uninterrupted_run(uno, reference_run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, *cli_args(tmp_path, uno)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((tmp_path / "shards").glob("item-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list((tmp_path / "shards").glob("item-*")))
    assert 1 <= written < 4 and not (tmp_path / "dataset").exists()
    run(tmp_path, uno, family="sd", max_items=4, num_candidates=2, steps=3, margin_threshold=0.0)  # the restart
    assert raw_rows(tmp_path / "dataset") == raw_rows(reference_run / "dataset")
    assert json.loads((tmp_path / "summary.json").read_text())["counts"]["kept"] == 4


@pytest.mark.e2e
def test_two_processes_write_disjoint_shards_equal_to_one(uno, reference_run, tmp_path):
    accelerate_launch(cli_args(tmp_path, uno), processes=2, port=29561)
    ranks = {}
    for shard in (tmp_path / "shards").glob("item-*"):
        for record in json.loads((shard / "items.json").read_text()):
            ranks.setdefault(record["item_id"], []).append(shard.name.rsplit("-r", 1)[1])
    assert len(ranks) == 4 and all(len(r) == 1 for r in ranks.values())
    assert {r[0] for r in ranks.values()} == {"0", "1"}
    assert raw_rows(tmp_path / "dataset") == raw_rows(reference_run / "dataset")


# ---- bad input -------------------------------------------------------------------------------------------------------
def jsonl(tmp_path, entries):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in entries))
    return path


def test_bad_inputs_fail_before_generation(uno, tmp_path, dreambench):
    missing = jsonl(tmp_path, [{"prompt": "a can", "references": ["gone.jpg"]}])
    with pytest.raises(PromptSetError, match="gone.jpg"):
        run(tmp_path / "a", missing, family="sd")
    bare = jsonl(tmp_path, [{"prompt": "a can", "references": []}])
    with pytest.raises(PairGenError, match="generates from reference images"):
        run(tmp_path / "b", bare, family="flux2")
    with pytest.raises(PromptSetError, match="layout"):
        load_prompt_set(uno, layout="csv")
    with pytest.raises(ConfigError, match="prompt_layout"):
        configs(tmp_path / "c", uno, prompt_layout="csv")
    with pytest.raises(ConfigError, match="margin_threshold"):
        configs(tmp_path / "d", uno, margin_threshold=3.0)
    with pytest.raises(ConfigError, match="no function"):
        run(tmp_path / "e", uno, family="sd", scorer="focusdpo.pairs:no_such_scorer")
    from focusdpo.models.tiny import tiny_sd_pipeline
    with pytest.raises(ConfigError, match="not an inpainting pipeline"):
        generate_pairs(*configs(tmp_path / "f", uno, family="sd", strategy="disrupt"), inpainter=tiny_sd_pipeline())
    for out in "abcdef":
        assert not (tmp_path / out / "shards").exists()


@pytest.mark.e2e
def test_a_failing_entry_is_listed_and_the_run_goes_on(tmp_path, dreambench):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    good = str(dreambench / "can" / "01.jpg")
    path = jsonl(tmp_path, [{"prompt": "a can", "references": [str(broken)]},
                            {"prompt": "a can", "references": [good]}])
    summary = run(tmp_path / "out", path, family="sd", max_items=0, scorer="conftest:brightness",
                  scorer_weight=0.5)
    assert summary["counts"]["failed"] == 1 and summary["counts"]["kept"] == 1
    assert "cannot be read" in summary["not_kept"][0]["reason"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["counts"]["failed"] == 1
    with pytest.raises(ValueError, match=r"other settings or inputs \(changed: sampling\.steps \(2 → 3\)\)"):
        run(tmp_path / "out", path, family="sd", max_items=0, scorer="conftest:brightness",
            scorer_weight=0.5, steps=3)


# ---- pure parts ------------------------------------------------------------------------------------------------------
def test_ranking_loser_rules_and_seeds():
    from focusdpo.pairs.generate import item_seeds, pick_loser, ranking

    order = ranking([0.2, 0.9, 0.2, -0.1])
    assert order == [1, 0, 2, 3]  # ties keep the lower index first
    assert [pick_loser(order, r) for r in ("worst", "second", "median")] == [3, 0, 2]
    cfg, _, _ = build_pair_configs({"prompts": "p.json", "out": "o", "num_candidates": 3, "seed": 10})
    assert item_seeds(cfg, 2) == [16, 17, 18]


# ---- the output folder: keyed by its inputs, max_items honoured, locked, a full disk named ----------------------------
def refuse_models(monkeypatch):
    """Loading the scorer or the generator fails the test: a refusal must come before any model loads."""
    from focusdpo.pairs import generate

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the rerun was refused")
    monkeypatch.setattr(generate, "CandidateScorer", loaded)
    monkeypatch.setattr(generate, "load_generator", loaded)


def two_entries(tmp_path, dreambench):
    """A prompt file of two entries, each with its own reference copied here (so a test can replace it)."""
    entries = []
    for subject in ("can", "dog"):
        reference = tmp_path / f"{subject}.jpg"
        reference.write_bytes((dreambench / subject / "01.jpg").read_bytes())
        entries.append({"prompt": f"a {subject}", "references": [str(reference)]})
    return jsonl(tmp_path, entries)


def test_max_items_selects_the_entries_of_a_rerun_and_a_changed_reference_is_refused(tmp_path, dreambench,
                                                                                     monkeypatch):
    prompts, out = two_entries(tmp_path, dreambench), tmp_path / "out"
    settings = dict(family="sd", data_root=None, margin_threshold=0.0)
    assert run(out, prompts, max_items=2, **settings)["counts"]["kept"] == 2
    fewer = run(out, prompts, max_items=1, **settings)  # fewer entries: only theirs are merged
    assert fewer["total"] == 1 and len(load_from_disk(fewer["dataset"])) == 1
    more = run(out, prompts, max_items=2, **settings)  # more again: the other entry's shard is reused
    assert more["counts"]["kept"] == 2 and len(load_from_disk(more["dataset"])) == 2
    (tmp_path / "can.jpg").write_bytes((dreambench / "can" / "00.jpg").read_bytes())  # another photo, same name
    refuse_models(monkeypatch)
    with pytest.raises(PairGenError, match=rf"changed: reference {tmp_path / 'can.jpg'}\).*new out folder"):
        run(out, prompts, max_items=1, **settings)


def test_a_second_generator_into_one_folder_is_refused_while_the_first_lives(uno, tmp_path, monkeypatch):
    import socket

    from focusdpo.errors import OutputError

    owner = os.getppid()  # a live process on this host that is not this one
    (tmp_path / ".out.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": owner}))
    refuse_models(monkeypatch)
    with pytest.raises(OutputError, match=f"another process is writing {tmp_path / 'out'} \\(pid {owner}"):
        run(tmp_path / "out", uno, family="sd")


def test_a_full_disk_while_writing_a_shard_names_the_folder_and_leaves_no_staging(uno, tmp_path, monkeypatch):
    import errno

    from datasets import Dataset

    from focusdpo.errors import OutputError

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Dataset, "save_to_disk", full_disk)
    shards = tmp_path / "out" / "shards"
    with pytest.raises(OutputError, match=f"no space left on the device of {shards} "):
        run(tmp_path / "out", uno, family="sd", margin_threshold=0.0)
    assert list(shards.iterdir()) == [] and not (tmp_path / ".out.lock").exists()

"""Pictures and scores during training: validation grids (files, tracker images, fixed seeds, runs without text
encoders), focus panels, subject-fidelity evaluation."""

import json

import numpy as np
import pytest
from PIL import Image

from focusdpo.commands.train import main

from conftest import TINY_ARGS, tiny_argv

TINY = [*TINY_ARGS, "--toy_num_pairs", "4", "--save_steps", "100", "--sample_every_run", "false",
        "--validation_steps", "2", "--num_validation_images", "2"]


def sd_run(out, report="tensorboard"):
    return main([*TINY, "--output_dir", str(out), "--report_to", report,
                 "--validation_prompts", "a red cube", "a blue ball"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("tensorboard")
    first, second = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    sd_run(first)
    sd_run(second, report="none")
    return first, second


@pytest.mark.e2e
def test_validation_writes_grids_every_n_steps_and_tensorboard_images(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = runs[0]
    assert {p.name for p in (out / "validation").glob("*.png")} == {"reference.png", "step-2.png", "step-4.png"}
    assert len(list((out / "validation" / "focus").glob("*.png"))) == 2
    events = EventAccumulator(str(next(out.glob("runs/*/events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert {"validation/policy", "validation/reference"} <= set(tags)
    assert [e.step for e in events.Images("validation/policy")] == [2, 4]
    assert sum(t.startswith("validation/focus/") for t in tags) == 2
    grid = Image.open(out / "validation" / "step-2.png")
    assert (events.Images("validation/policy")[0].width, events.Images("validation/policy")[0].height) == grid.size


@pytest.mark.e2e
def test_same_seeds_give_the_same_grids_and_training_changes_them(runs):
    first, second = runs
    for name in ("reference.png", "step-2.png", "step-4.png"):
        a, b = (np.asarray(Image.open(run / "validation" / name)) for run in runs)
        assert np.array_equal(a, b), name
    reference, trained = (np.asarray(Image.open(first / "validation" / n)) for n in ("reference.png", "step-4.png"))
    assert not np.array_equal(reference[:-40], trained[:-40])  # the policy moved (labels/captions cut off)


@pytest.mark.e2e
def test_runs_without_text_encoders_still_get_validation_grids(tmp_path):
    from focusdpo.commands import main as cli

    args = [*TINY, "--family", "flux2", "--max_sequence_length", "32", "--lambda_structure", "0",
            "--lambda_detail", "0", "--max_steps", "2", "--report_to", "none"]
    cli(["embed", "--out", str(tmp_path / "cached"), "--device", "cpu", *args])
    trainer = main([*args, "--output_dir", str(tmp_path / "run"), "--dataset", str(tmp_path / "cached"),
                    "--drop_text_encoders", "true"])
    assert all(v is None for k, v in trainer.backbone.pipeline.components.items() if k.startswith("text_encoder"))
    assert (tmp_path / "run" / "validation" / "step-2.png").is_file()
    assert (tmp_path / "run" / "validation" / "reference.png").is_file()


@pytest.mark.e2e
def test_focus_panels_reach_the_trackers_when_maps_come_from_a_cache(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from focusdpo.commands import main as cli

    args = [*TINY, "--max_steps", "2", "--report_to", "tensorboard"]
    cli(["focus", "--out", str(tmp_path / "cached"), "--device", "cpu", *args])
    trainer = main([*args, "--output_dir", str(tmp_path / "run"), "--dataset", str(tmp_path / "cached")])
    assert trainer.focus_mapper is None  # the trainer read the cached maps
    assert len(list((tmp_path / "run" / "validation" / "focus").glob("*.png"))) == 2
    events = EventAccumulator(str(next((tmp_path / "run").glob("runs/*/events.out.tfevents.*")).parent))
    events.Reload()
    assert sum(t.startswith("validation/focus/") for t in events.Tags()["images"]) == 2


@pytest.mark.e2e
def test_training_time_evaluation_logs_next_to_the_dpo_metrics(tmp_path):
    from focusdpo.commands.train import main as train

    train(tiny_argv(tmp_path, "--max_steps", "2", "--toy_num_pairs", "4", "--save_steps", "10", "--sample_every_run",
                    "false", "--subject_eval_steps", "2", "--subject_eval_prompts", "2", "--report_to", "tensorboard"))
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in logs if "subject_eval/fidelity_mean" in m]
    assert [m["step"] for m in evals] == [2] and any("loss" in m for m in logs)
    assert {"subject_eval/fidelity_min_delta", "subject_eval/subject_count", "subject_eval/backbone_i"} <= set(evals[0])
    assert (tmp_path / "subject_eval" / "step-2.png").is_file()
    assert list(tmp_path.rglob("events.out.tfevents.*"))  # the grid and scalars went to TensorBoard

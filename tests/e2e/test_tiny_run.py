"""One tiny training run, read by several tests: the kohya file, the model card, the plot, the tracker's run config
and the resolved config reproduce the run."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from focusdpo.commands import main as cli
from focusdpo.commands.train import main
from focusdpo.config.recipe import parse_config
from focusdpo.models.tiny import tiny_sd_pipeline

from conftest import tiny_argv

pytestmark = pytest.mark.e2e

SMALL = ("--max_steps", "2", "--toy_num_pairs", "4")


def has_tensorboard():
    try:
        import tensorboard  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    report = "tensorboard" if has_tensorboard() else "none"
    trainer = main(tiny_argv(out, *SMALL, "--save_kohya_format", "true", "--lora_alpha", "8", "--report_to", report,
                             "--accelerator_config", '{"split_batches": false, "even_batches": true}'))
    return out, trainer


def read_losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line and "train_loss" not in line]


def test_training_writes_a_kohya_file_that_reproduces_the_run(run):
    out, trainer = run
    assert (out / "lora_kohya.safetensors").is_file() and (out / "checkpoint-2" / "lora_kohya.safetensors").is_file()
    pipe = tiny_sd_pipeline(0)
    pipe.load_lora_weights(str(out), weight_name="lora_kohya.safetensors")
    x, t, text = torch.randn(1, 4, 16, 16), torch.tensor([300]), torch.randn(1, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, text).sample, trainer.backbone.denoiser.eval()(x, t, text).sample,
                                   rtol=0, atol=1e-6)


def test_model_card_names_base_family_beta_lambda_data_steps_and_samples(run):
    card = (run[0] / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card
    for fact in ("| family | sd |", "| β (Diffusion-DPO scale) | 5000", "| λ_structure, λ_detail | 1, 1 |",
                 "| data | toy (4 pairs, 32 px) |", "| steps | 2 ", "rank 4, alpha 8", "tiny random sd generator",
                 "![samples](samples_before_after.png)", "lora_kohya.safetensors"):
        assert fact in card, fact


def test_plot_draws_every_panel_from_metrics_jsonl(run, tmp_path, capsys):
    from PIL import Image

    from focusdpo.training.plot import PANEL, PANELS, read_training_logs, select_series

    cli(["plot", str(run[0]), "--out", str(tmp_path / "curves.png")])
    image = Image.open(tmp_path / "curves.png")
    assert image.size == (2 * PANEL[0], 2 * PANEL[1])
    logs = read_training_logs(run[0])
    for _, names in PANELS:  # every panel has data in a focus run
        assert select_series(logs, names), names
    assert any(k.startswith("rewards/margins_u") for k in select_series(logs, ("rewards/margins_u*",)))
    for i in range(4):  # no panel is blank: each has coloured (line) pixels
        panel = image.crop(((i % 2) * PANEL[0], (i // 2) * PANEL[1], (i % 2 + 1) * PANEL[0], (i // 2 + 1) * PANEL[1]))
        pixels = np.asarray(panel.convert("RGB")).astype(int)
        assert (pixels.max(-1) != pixels.min(-1)).any(), i
    with pytest.raises(SystemExit) as stopped:  # a user error: its message, exit status 2, no traceback
        cli(["plot", str(tmp_path)])
    assert stopped.value.code == 2 and "no metrics.jsonl" in capsys.readouterr().err


def test_tracker_run_config_carries_every_section(run):
    if not has_tensorboard():
        pytest.skip("tensorboard is not installed (pip install 'focusdpo[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dirs = {p.parent for p in run[0].glob("runs/*/events.out.tfevents.*")}
    assert len(event_dirs) == 1
    events = EventAccumulator(str(event_dirs.pop()))
    events.Reload()
    logged = json.loads(events.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode())
    expected = {"beta": 5000.0, "lambda_structure": 1.0, "lambda_detail": 1.0, "lora_rank": 4, "family": "sd",
                "dataset": "toy", "dino_depth": 2, "learning_rate": 1e-3}
    assert {k: logged.get(k) for k in expected} == expected
    trainer = run[1]
    sections = (trainer.model_config, trainer.data_config, trainer.loss_config, trainer.focus_config)
    every_field = {f.name for section in (trainer.args, *sections) for f in dataclasses.fields(section) if f.init}
    assert every_field - set(logged) == set()


def test_resolved_config_round_trips_every_field_and_retrains_the_same_run(run, tmp_path):
    out, _ = run
    assert "AcceleratorConfig(" not in (out / "config.yaml").read_text()
    first = parse_config(tiny_argv(out, *SMALL, "--save_kohya_format", "true", "--lora_alpha", "8", "--report_to",
                                   "none", "--accelerator_config", '{"split_batches": false, "even_batches": true}'))
    again = parse_config(["--config", str(out / "config.yaml"), "--report_to", "none"])
    from focusdpo.config.recipe import config_fields

    a, b = config_fields(*first), config_fields(*again)
    assert a.keys() == b.keys()
    assert {k: (a[k], b[k]) for k in a if a[k] != b[k]} == {}
    retrain = tmp_path / "again"
    main(["--config", str(out / "config.yaml"), "--output_dir", str(retrain), "--report_to", "none",
          "--sample_every_run", "false"])
    assert read_losses(retrain) == pytest.approx(read_losses(out), rel=1e-6)

"""Fitting the tools users already have: LoRA export, plots, model card, trackers, round-tripping configs."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from focusdpo.commands import main as cli
from focusdpo.errors import ConfigError
from focusdpo.config.training import FocusDPOConfig, LossConfig, ModelConfig
from focusdpo.config.recipe import parse_config
from focusdpo.errors import LoraFileError, OutputError
from focusdpo.export import export_lora, read_lora
from focusdpo.models import load_backbone
from focusdpo.models.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline
from focusdpo.models.tiny_flux import tiny_flux2_pipeline, tiny_flux_kontext_pipeline
from focusdpo.training.policy import add_dpo_lora
from focusdpo.commands.train import main

from conftest import REPO

TINY_PIPELINES = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, "flux2": tiny_flux2_pipeline,
                  "flux_kontext": tiny_flux_kontext_pipeline}


def trained_lora(family, folder, rank=4, alpha=16.0):
    """A tiny backbone whose DPO LoRA (alpha ≠ rank) has non-zero B, saved in diffusers format."""
    backbone = load_backbone(family)
    add_dpo_lora(backbone, ModelConfig(family=family, lora_rank=rank, lora_alpha=alpha))
    generator = torch.Generator().manual_seed(0)
    for name, param in backbone.denoiser.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    backbone.save_lora(folder, "dpo")
    return backbone


def lora_module_outputs(denoiser, x_of):
    """Outputs of every LoRA-carrying linear layer on a fixed input: what the LoRA changes, module by module."""
    return {name: module(x_of(module)) for name, module in denoiser.named_modules()
            if hasattr(module, "lora_A") and isinstance(getattr(module, "base_layer", None), torch.nn.Linear)}


def fixed_input(module):
    return torch.ones(1, module.base_layer.in_features) * 0.1


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_kohya_export_reproduces_the_trained_unet_with_alpha_not_rank(family, tmp_path):
    trained = trained_lora(family, tmp_path).denoiser.eval()
    exported = export_lora(tmp_path, family)
    keys = load_file(str(exported))
    assert all(k.startswith("lora_unet_") for k in keys)
    assert {v.item() for k, v in keys.items() if k.endswith(".alpha")} == {16.0}
    pipe = TINY_PIPELINES[family](0)
    pipe.load_lora_weights(str(exported))  # diffusers' kohya reader, as A1111/ComfyUI read the file
    assert_same_lora_effect(pipe.unet, trained)


def assert_same_lora_effect(loaded, trained):
    """Every LoRA layer of ``loaded`` gives ``trained``'s output on the same input (base + scaled B·A)."""
    with torch.no_grad():
        got, expected = (lora_module_outputs(m.eval(), fixed_input) for m in (loaded, trained))
    assert got.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)


def test_diffusers_converter_alone_rescales_a_lora_trained_with_alpha_not_rank(tmp_path):
    """Why export sets .alpha: diffusers' converter writes alpha = rank (a 4× weaker LoRA here)."""
    from diffusers.utils import convert_state_dict_to_kohya

    trained = trained_lora("sd", tmp_path).denoiser.eval()
    tensors, _ = read_lora(tmp_path / "pytorch_lora_weights.safetensors")
    naive = {k: v.contiguous() for k, v in convert_state_dict_to_kohya(tensors).items()}
    save_file(naive, str(tmp_path / "naive.safetensors"))
    pipe = tiny_sd_pipeline(0)
    pipe.load_lora_weights(str(tmp_path), weight_name="naive.safetensors")
    x, t, text = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 7, 32)
    with torch.no_grad():
        assert not torch.allclose(pipe.unet(x, t, text).sample, trained(x, t, text).sample, atol=1e-4)


@pytest.mark.parametrize("family", ["flux_kontext", "flux2"])
def test_flux_export_folds_alpha_so_any_loader_reproduces_the_lora(family, tmp_path):
    trained = trained_lora(family, tmp_path).denoiser.eval()
    exported = export_lora(tmp_path, family)
    tensors, config = read_lora(exported)
    assert config["lora_alpha"] == config["r"] == 4
    assert all(k.startswith("transformer.") for k in tensors)
    # A loader that ignores alpha (ComfyUI without .alpha keys: scale 1) computes B·A from the file.
    for name, module in trained.named_modules():
        if hasattr(module, "lora_A"):
            a, b = tensors[f"transformer.{name}.lora_A.weight"], tensors[f"transformer.{name}.lora_B.weight"]
            expected = module.scaling["dpo"] * module.lora_B["dpo"].weight @ module.lora_A["dpo"].weight
            torch.testing.assert_close(b @ a, expected.detach(), rtol=1e-5, atol=1e-7)
    pipe = TINY_PIPELINES[family](0)
    pipe.load_lora_weights(str(exported))
    assert_same_lora_effect(pipe.transformer, trained)


def test_export_command_reads_the_family_from_the_run_config(tmp_path):
    trained_lora("sd", tmp_path)
    (tmp_path / "config.yaml").write_text("family: sd\n")
    cli(["export", str(tmp_path), "--out", str(tmp_path / "mine.safetensors")])
    assert any(k.startswith("lora_unet_") for k in load_file(str(tmp_path / "mine.safetensors")))
    save_file({"unet.x.lora_A.weight": torch.zeros(1, 1)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="no LoraConfig metadata"):
        export_lora(tmp_path / "bare.safetensors", "sd")


def test_kohya_export_writes_the_metadata_kohya_tools_read(tmp_path):
    trained_lora("sdxl", tmp_path, rank=4, alpha=16.0)
    with safe_open(str(export_lora(tmp_path, "sdxl")), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_dim"] == "4" and float(metadata["ss_network_alpha"]) == 16.0
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"


def test_an_export_for_another_family_or_onto_its_own_source_is_refused(tmp_path, capsys):
    trained_lora("sd", tmp_path)
    with pytest.raises(LoraFileError, match="holds unet LoRA weights, not the transformer weights of family 'flux2'"):
        export_lora(tmp_path, "flux2")
    (tmp_path / "config.yaml").write_text("family: sd\n")
    with pytest.raises(SystemExit) as exit_code:  # the command: one line, exit 2
        cli(["export", str(tmp_path), "--family", "flux_kontext"])
    assert exit_code.value.code == 2 and "config.yaml says family 'sd'" in capsys.readouterr().err
    source = tmp_path / "pytorch_lora_weights.safetensors"
    before = source.read_bytes()
    with pytest.raises(OutputError, match="is the LoRA being exported"):
        export_lora(tmp_path, "sd", source)
    assert source.read_bytes() == before
    trained_lora("flux2", tmp_path / "flux")
    with pytest.raises(LoraFileError, match="holds transformer LoRA weights.*export it as flux2 or flux_kontext"):
        export_lora(tmp_path / "flux", "sd")


# ---- one tiny training run, read by several tests ----------------------------------------------------
def tiny_argv(out, *extra):
    return ["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "--output_dir", str(out), "--max_steps", "2",
            "--toy_num_pairs", "4", "--save_steps", "2", "--logging_steps", "1", "--sample_steps", "2", *extra]


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
    trainer = main(tiny_argv(out, "--save_kohya_format", "true", "--lora_alpha", "8", "--report_to", report,
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


def test_model_card_of_a_full_fine_tune_loads_the_denoiser_not_a_lora(tmp_path):
    from focusdpo.config.training import DataConfig
    from focusdpo.config.focus import FocusConfig
    from focusdpo.training.model_card import model_card_text

    configs = (FocusDPOConfig(output_dir=str(tmp_path)), ModelConfig(family="flux2", reference_mode="frozen_copy",
                                                                     lora_rank=0), DataConfig(), LossConfig(),
               FocusConfig())
    card = model_card_text(tmp_path, configs, steps=7, num_pairs=3)
    assert "every transformer weight (full fine-tune)" in card and "(vanilla Diffusion-DPO)" in card
    assert 'pipe.transformer = type(pipe.transformer).from_pretrained("path/to/this/folder/transformer")' in card
    assert "load_lora_weights" not in card and "Samples" not in card


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
    first = parse_config(tiny_argv(out, "--save_kohya_format", "true", "--lora_alpha", "8", "--report_to", "none",
                                   "--accelerator_config", '{"split_batches": false, "even_batches": true}'))
    again = parse_config(["--config", str(out / "config.yaml"), "--report_to", "none"])
    from focusdpo.config.recipe import config_fields

    a, b = config_fields(*first), config_fields(*again)
    assert a.keys() == b.keys()
    assert {k: (a[k], b[k]) for k in a if a[k] != b[k]} == {}
    retrain = tmp_path / "again"
    main(["--config", str(out / "config.yaml"), "--output_dir", str(retrain), "--report_to", "none",
          "--sample_every_run", "false"])
    assert read_losses(retrain) == pytest.approx(read_losses(out), rel=1e-6)


def test_resolved_config_round_trips_dict_list_and_enum_fields_and_drops_tokens(tmp_path):
    from focusdpo.config.recipe import config_fields
    from focusdpo.training.trainer import write_resolved_config

    configs = parse_config(["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "--lr_scheduler_type",
                            "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr": 1e-6}', "--optim_args", "a=1",
                            "--debug", "underflow_overflow", "--report_to", "tensorboard", "--include_for_metrics",
                            "inputs", "--lora_target_modules", "to_q", "to_k", "--text_encoder_out_layers", "3", "5",
                            "--flow_shift_mode", "static", "--flow_shift", "3.0", "--hub_token", "SECRET-TOKEN",
                            "--accelerator_config",
                            '{"split_batches": true}'])
    write_resolved_config(tmp_path / "config.yaml", configs)
    assert "SECRET-TOKEN" not in (tmp_path / "config.yaml").read_text()
    again = config_fields(*parse_config(["--config", str(tmp_path / "config.yaml")]))
    written = config_fields(*configs)
    assert {k: (written[k], again[k]) for k in written if written[k] != again[k]} == {}
    assert again["accelerator_config"]["split_batches"] is True and again["lr_scheduler_kwargs"] == {"min_lr": 1e-6}


# ---- names users bring from TRL and the diffusers scripts ----------------------------------------------
@pytest.mark.parametrize("name, ours", [("model_name_or_path", "pretrained_path"), ("dataset_name", "dataset"),
                                        ("lora_r", "lora_rank"), ("pretrained_model_name_or_path", "pretrained_path"),
                                        ("train_batch_size", "per_device_train_batch_size"),
                                        ("max_train_steps", "max_steps"), ("checkpointing_steps", "save_steps"),
                                        ("rank", "lora_rank"), ("beta_dpo", "beta")])
def test_foreign_option_names_name_our_field_in_yaml_and_on_the_cli(name, ours, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"{name}: 4\n")
    with pytest.raises(ConfigError, match=f"focusdpo calls it '{ours}'") as in_yaml:
        parse_config(["--config", str(recipe)])
    with pytest.raises(ConfigError, match=f"focusdpo calls it '{ours}'"):
        parse_config([f"--{name}", "4"])
    assert str(recipe) in str(in_yaml.value)
    if name == "beta_dpo":
        assert "2500 = our beta 5000" in str(in_yaml.value)


def test_small_beta_warns_and_diffusion_scale_does_not():
    with pytest.warns(UserWarning, match="TRL-scale"):
        LossConfig(beta=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LossConfig(beta=5000.0)


def test_launcher_mixed_precision_must_match_the_recipe(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="'fp16'.*'no'"):
        FocusDPOConfig(output_dir="unused")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match="'bf16'.*'fp16'"):
        FocusDPOConfig(output_dir="unused", fp16=True, use_cpu=True)


def test_version_and_grouped_train_help(capsys):
    from focusdpo import __version__

    cli(["--version"])
    assert capsys.readouterr().out.strip() == f"focusdpo {__version__}"
    with pytest.raises(SystemExit):
        cli(["train", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: focusdpo train")
    assert "--config RECIPE.yaml" in text
    sections = [text.index(f"\n{name} (") for name in ("training", "model", "data", "loss", "focus")]
    assert sections == sorted(sections)
    assert text.index("\n  --beta BETA") > sections[3] and text.index("\n  --lora_rank LORA_RANK") > sections[1]

"""Presets build to the released models' exact sizes on the meta device; recipes find their denoiser."""

import json
import subprocess
import sys

import pytest
import torch

from focusdpo.planning.presets import (
    FAMILY_PRESETS,
    FROZEN_COMPONENTS,
    PRESETS,
    build_on_meta,
    get_preset,
    parameter_count,
    preset_for,
)

# The counts the released checkpoints load with (docs/ENV notes: measured on meta, Dec 2026).
RELEASED = {"flux2-klein-4b": 3_875_544_576, "flux2-klein-9b": 9_078_581_248, "flux1-dev": 11_901_408_320,
            "flux1-kontext": 11_901_408_320, "sdxl": 2_567_463_684, "sd15": 859_520_964}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_preset_builds_to_the_released_parameter_count(name):
    denoiser = build_on_meta(get_preset(name))
    assert next(denoiser.parameters()).device.type == "meta"
    assert parameter_count(denoiser) == RELEASED[name] == PRESETS[name].params


def test_presets_use_diffusers_own_config_keys():
    klein = build_on_meta(get_preset("flux2-klein-4b")).config
    assert (klein.num_layers, klein.num_single_layers, klein.num_attention_heads, klein.attention_head_dim) == \
        (5, 20, 24, 128)
    assert (klein.joint_attention_dim, klein.in_channels, tuple(klein.axes_dims_rope), klein.rope_theta,
            klein.guidance_embeds) == (7680, 128, (32, 32, 32, 32), 2000, False)
    dev = build_on_meta(get_preset("flux1-dev")).config
    assert (dev.num_layers, dev.num_single_layers, dev.joint_attention_dim, dev.pooled_projection_dim,
            dev.in_channels, tuple(dev.axes_dims_rope), dev.guidance_embeds) == (19, 38, 4096, 768, 64,
                                                                                 (16, 56, 56), True)
    sdxl = build_on_meta(get_preset("sdxl")).config
    assert tuple(sdxl.transformer_layers_per_block) == (1, 2, 10) and sdxl.cross_attention_dim == 2048
    assert sdxl.addition_embed_type == "text_time"


@pytest.mark.parametrize("name", sorted(FROZEN_COMPONENTS))
def test_frozen_component_counts_rebuild_on_meta(name):
    import importlib

    library, class_name, config_class, config, count = FROZEN_COMPONENTS[name]
    module = importlib.import_module(library)
    with torch.device("meta"):
        built = (getattr(module, class_name)(getattr(module, config_class)(**config)) if config_class
                 else getattr(module, class_name)(**config))
    assert parameter_count(built) == count


def test_each_family_plans_with_its_preset_when_the_checkpoint_is_elsewhere():
    for family, name in FAMILY_PRESETS.items():
        assert preset_for(family, "models/not-on-this-machine").name == name
    assert preset_for("flux_kontext", "models/FLUX.1-dev").name == "flux1-dev"
    assert preset_for("flux2", "models/FLUX.2-klein-base-9B").name == "flux2-klein-9b"


def test_a_recipe_without_a_checkpoint_plans_the_tiny_generator_it_trains():
    tiny = preset_for("sd", None)
    assert tiny.name == "tiny-sd" and tiny.vae_scale_factor == 2 and tiny.params < 2_000_000


def test_a_local_checkpoint_folder_is_read_instead_of_the_preset(tmp_path):
    from focusdpo.models.tiny_flux import tiny_flux2_pipeline

    pipeline = tiny_flux2_pipeline(0)
    pipeline.save_pretrained(tmp_path / "klein")
    preset = preset_for("flux2", str(tmp_path / "klein"))
    assert preset.source.startswith("local config") and preset.model_class == "Flux2Transformer2DModel"
    assert parameter_count(build_on_meta(preset)) == parameter_count(pipeline.transformer)
    assert preset.vae_scale_factor == pipeline.vae_scale_factor
    assert preset.frozen["text_encoder"] == parameter_count(pipeline.text_encoder)
    assert preset.frozen["vae"] == parameter_count(pipeline.vae)
    assert json.loads((tmp_path / "klein" / "model_index.json").read_text())["transformer"][1] == \
        preset.model_class


def test_unknown_names_raise_with_the_choices():
    with pytest.raises(ValueError, match="flux2-klein-4b"):
        get_preset("flux3")
    with pytest.raises(ValueError, match="flux_kontext"):
        preset_for("flux3", None)


def test_importing_the_planner_loads_no_model_stack():
    code = ("import sys, focusdpo; before = set(sys.modules); import focusdpo.planning; "
            "new = set(sys.modules) - before; "
            "assert not any(m.split('.')[0] in ('torch', 'diffusers', 'peft') for m in new), sorted(new)")
    subprocess.run([sys.executable, "-c", code], check=True)

"""FocusConfig: feature backbones and layers are checked when the config is built."""

import pytest

from focusdpo.config.focus import CNN_LAYERS, FEATURE_BACKBONES, FocusConfig
from focusdpo.config.recipe import parse_config
from focusdpo.errors import ConfigError

from conftest import CNNS


def test_unknown_backbone_and_layer_and_misplaced_fields_are_config_errors():
    with pytest.raises(ConfigError, match="feature_backbone='resnet50'.*" + ", ".join(FEATURE_BACKBONES)):
        FocusConfig(feature_backbone="resnet50")
    with pytest.raises(ConfigError, match=r"feature_layer='features.19' is not a layer of mobilenet_v2.*features.18"):
        FocusConfig(feature_backbone="mobilenet_v2", feature_layer="features.19")
    with pytest.raises(ConfigError, match="blocks.6.0"):
        FocusConfig(feature_backbone="efficientnet_lite0", feature_layer="blocks.6.1")
    with pytest.raises(ConfigError, match="use feature_weights and feature_layer"):
        FocusConfig(feature_backbone="mobilenet_v2", dino_depth=4)
    with pytest.raises(ConfigError, match="DINOv2 uses dino_depth"):
        FocusConfig(feature_layer="features.13")
    with pytest.raises(ConfigError, match="dino_image_size=56 must be a multiple of 32, the stride of "
                                          "efficientnet_lite0 at feature_layer blocks.5.1"):
        FocusConfig(feature_backbone="efficientnet_lite0", feature_layer="blocks.5.1", dino_image_size=56)
    assert set(CNN_LAYERS) == set(CNNS) and len(CNN_LAYERS["efficientnet_lite0"]) == 16


def test_recipe_fields_reach_the_config_and_are_checked_before_parsing_finishes(tmp_path):
    *_, focus = parse_config(["--feature_backbone", "efficientnet_lite0", "--feature_layer", "blocks.5.1"])
    assert (focus.feature_backbone, focus.feature_layer) == ("efficientnet_lite0", "blocks.5.1")
    with pytest.raises(ConfigError, match="mobilenet_v2"):
        parse_config(["--feature_backbone", "mobilenet"])

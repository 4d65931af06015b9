"""Shared test setup: offline hub, one thread per process, paths to the shared third-party data, and the helpers and
fixtures several test files use (tiny training argv, images, pair folders, a tiny DINOv2, run outputs)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
UNO_MULTI = SHARED_DATA / "uno" / "dreambench_multiip_covered_by_subset.json"

torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The efficacy study's smoke run is a whole-command run; its file is edited elsewhere, so it is marked here."""
    for item in items:
        if item.path.name == "test_efficacy_smoke.py" and item.name.startswith("test_smoke_runs_every_stage"):
            item.add_marker(pytest.mark.e2e)


# ---- shared data -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def dreambench() -> Path:
    """The DreamBench subset in ../shared/data (real photos; never copied into the repo)."""
    path = SHARED_DATA / "dreambench"
    if not path.is_dir():
        pytest.skip(f"shared test data not found at {path}")
    return path


@pytest.fixture(scope="session")
def uno(dreambench) -> str:
    """UNO's multi-subject DreamBench prompts, restricted to the subjects of the shared subset."""
    if not UNO_MULTI.is_file():
        pytest.skip(f"shared test data not found at {UNO_MULTI}")
    return str(UNO_MULTI)


# ---- the tiny recipe -------------------------------------------------------------------------------------------------
TINY_RECIPE = str(REPO / "recipes" / "tiny_cpu.yaml")
# recipes/tiny_cpu.yaml made small: 8 toy pairs, 4 steps, a checkpoint every 2 steps, a log line per step, samples in
# 2 sampling steps. Options given after these override them (the last value of an option wins).
TINY_ARGS = ["--config", TINY_RECIPE, "--max_steps", "4", "--toy_num_pairs", "8", "--save_steps", "2",
             "--logging_steps", "1", "--sample_steps", "2"]
# 4 pairs, 2 steps, no focus weights, no samples: runs a test needs to exist, not to learn
QUICK = ("--max_steps", "2", "--toy_num_pairs", "4", "--sample_every_run", "false", "--lambda_structure", "0",
         "--lambda_detail", "0")
# 4 pairs, 3 steps, a log line per step, no checkpoint, no focus weights, 32 text tokens: runs on encoder caches
# against runs on the live encoders (without --output_dir: the cache commands read these options too)
CACHE_ARGS = ["--config", TINY_RECIPE, "--toy_num_pairs", "4", "--max_steps", "3", "--logging_steps", "1",
              "--save_steps", "100", "--lambda_structure", "0", "--lambda_detail", "0", "--max_sequence_length", "32"]
FAST_ARGS = [*CACHE_ARGS, "--sample_every_run", "false"]  # and no before/after samples


def tiny_argv(out, *extra) -> list[str]:
    """The argv of a tiny training run into ``out`` (:data:`TINY_ARGS`); ``extra`` adds or overrides options."""
    return [*TINY_ARGS, "--output_dir", str(out), *extra]


def read_metrics(out) -> list[dict]:
    """Every record of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def step_losses(out) -> list[float]:
    """The loss of each logged step of a run, in order."""
    return [m["loss"] for m in read_metrics(out) if "loss" in m]


def losses_by_step(out) -> dict[int, float]:
    """``{step: loss}`` of a run."""
    return {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}


def embed_latents(tmp_path, args) -> str:
    """``focusdpo embed --latents --no_text`` of the recipe ``args`` into tmp_path/cached; its path."""
    from focusdpo.commands import main as cli

    folder = tmp_path / "cached"
    cli(["embed", "--out", str(folder), "--device", "cpu", "--latents", "--no_text", *args])
    return str(folder)


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: a refusal must come before it."""
    import focusdpo.training.trainer

    def load_backbone(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was refused")
    monkeypatch.setattr(focusdpo.training.trainer, "load_backbone", load_backbone)


def write(tmp_path, text) -> str:
    """A recipe file holding ``text``."""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


# ---- images and pair folders -----------------------------------------------------------------------------------------
def png(colour="red", size=(16, 16), mode="RGB") -> bytes:
    """The bytes of a one-colour PNG."""
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def photo(path, size=None, crop=1.0) -> torch.Tensor:
    """``(3, H, W)`` in [0, 1]; ``crop`` keeps that central fraction, then the image is resized to ``size`` (square)."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    margin = (1 - crop) / 2
    image = image.crop((round(w * margin), round(h * margin), round(w * (1 - margin)), round(h * (1 - margin))))
    if size:
        image = image.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def jsonl_folder(folder, lines, files=None) -> str:
    """A jsonl pair folder: ``lines`` (dicts or raw strings) in pairs.jsonl beside the images ``files`` (name: bytes),
    which add to or replace a red w.png, a blue l.png and a green r.png."""
    files = {"w.png": png("red"), "l.png": png("blue"), "r.png": png("green"), **(files or {})}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "pairs.jsonl").write_text("\n".join(line if isinstance(line, str) else json.dumps(line)
                                                  for line in lines) + "\n")
    return str(folder)


def folder_bytes(path: Path) -> dict[str, int]:
    """The size of every file under ``path``."""
    return {str(f.relative_to(path)): f.stat().st_size for f in path.rglob("*") if f.is_file()}


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """The datasets cache and the temp dir inside tmp_path, so that every byte a load writes is counted."""
    import datasets

    for name in ("hf-cache", "tmp"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return tmp_path


def lora_file(path, prefix: str = "unet"):
    """A one-module diffusers-format LoRA file whose keys start with ``prefix`` (its denoiser: unet or transformer)."""
    from safetensors.torch import save_file

    save_file({f"{prefix}.blocks.0.to_q.lora_A.weight": torch.zeros(2, 8),
               f"{prefix}.blocks.0.to_q.lora_B.weight": torch.zeros(8, 2)}, str(path))
    return path


def cut(path, keep: float = 0.5):
    """``path`` cut to ``keep`` of its bytes, as an interrupted copy or download leaves it."""
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    return path


# ---- feature extractors ----------------------------------------------------------------------------------------------
def tiny_dino_model(name="vit_small_patch14_dinov2", **kwargs):
    """A tiny random-weight DINOv2 (2 blocks of 96 dims, 2 heads), seeded: the same weights for the same arguments."""
    from focusdpo.features.dino import load_dino

    torch.manual_seed(0)
    return load_dino(name, depth=2, embed_dim=96, num_heads=2, **kwargs)


@pytest.fixture(scope="module")
def tiny_dino(request):
    """:func:`tiny_dino_model` with the test module's ``TINY_DINO`` arguments (none by default), once per module."""
    return tiny_dino_model(**getattr(request.module, "TINY_DINO", {}))


CNNS = ("mobilenet_v2", "efficientnet_lite0")


def wheels_installed() -> bool:
    from focusdpo.features.cnn import WHEELS

    return all(importlib.util.find_spec(module) for _, module, _ in WHEELS.values())


def install_command() -> str:
    from focusdpo.features.cnn import INSTALL_COMMAND

    return INSTALL_COMMAND


needs_wheels = pytest.mark.skipif(not wheels_installed(), reason=f"ImageNet weight wheels absent: {install_command()}")


# ---- MOSAIC ----------------------------------------------------------------------------------------------------------
def sca_of(attn, t):
    """The SCA loss of captured attention against MOSAIC targets ``t``."""
    from focusdpo.losses import sca_loss

    return sca_loss(attn, t.point_rows, t.point_targets, t.point_refs, t.point_valid, t.num_references)


def md_of(attn, t):
    """The MD loss (JSD) of captured attention against MOSAIC targets ``t``."""
    from focusdpo.losses import md_loss

    return md_loss(attn, t.row_refs, t.row_valid, t.num_references, "jsd")


# ---- pair generation -------------------------------------------------------------------------------------------------
def brightness(images, item):
    """A user scorer (``scorer="conftest:brightness"``): mean brightness in [0, 1]."""
    return [float(np.asarray(img).mean() / 255) for img in images]


# ---- launches --------------------------------------------------------------------------------------------------------
def accelerate_launch(script_args: list[str], processes: int = 1, port: int = 29500) -> subprocess.CompletedProcess:
    """``accelerate launch`` on CPU (gloo for 2+ processes); fails the test with the end of stderr."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    multi = ["--multi_gpu"] if processes > 1 else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), *script_args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result

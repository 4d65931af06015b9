"""``focusdpo evaluate``: base vs post-trained LoRA(s) on a benchmark, same prompts and seeds, one report.

``accelerate launch -m focusdpo evaluate --config recipes/eval_X.yaml [--field value ...]``

Flow: read the benchmark (:mod:`focusdpo.data.prompt_sets`; entries with missing images are listed and
counted) -> build the scorers (fails early on missing weights) -> generate each process's share of the
entries for every variant (images already on disk are reused, so a killed run resumes) -> score them ->
the main process merges the shards and writes the report (:mod:`focusdpo.evaluation.report`).

Images are reused only when made with the same settings and inputs: ``output_dir/run_settings.json`` holds the
sampling settings and content digests of the benchmark, references, model and LoRAs (:mod:`focusdpo.provenance`),
and a rerun with other ones is refused before any model loads. The main process holds ``output_dir``'s writer
lock for the run.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from focusdpo.atomic import atomic_write_text, output_lock, save_png
from focusdpo.config.evaluation import EvalConfig
from focusdpo.config.focus import FocusConfig
from focusdpo.config.training import ModelConfig
from focusdpo.data.prompt_sets import load_prompt_set
from focusdpo.errors import EvalInputError, OutputError, PromptSetError
from focusdpo.evaluation.metrics import (pooled_embedding, subject_averaged_similarity, subject_scores,
                                         text_image_similarity)
from focusdpo.evaluation.report import save_prompt_grid, write_report
from focusdpo.images import open_upright, resize_square, to_tensor
from focusdpo.models import load_backbone
from focusdpo.models.base import LORA_WEIGHTS_NAME, check_lora_file
from focusdpo.models.sampling import sample_images
from focusdpo.processes import process_state
from focusdpo.provenance import check_record, input_digests, write_record

BASE = "base"

# Model options that only shape training (timestep sampling), not a sampled image: a change keeps the images.
TRAINING_ONLY = ("flow_density", "logit_mean", "logit_std", "mode_scale", "max_references")


@dataclass
class Scorers:
    """The feature extractors the chosen metrics need, loaded once; ``names`` go into the report."""

    metrics: tuple[str, ...]
    subject: object | None = None  # patch backbone: images01 -> (B, C, h, w)
    dino: object | None = None  # images01 -> (B, 384)
    clip: object | None = None  # ClipScorer
    names: dict | None = None


def build_scorers(cfg: EvalConfig, focus_cfg: FocusConfig, device=None) -> Scorers:
    scorers = Scorers(tuple(cfg.metrics), names={})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # a randomly initialised extractor (toy runs) is the same on every run
        load_extractors(scorers, cfg, focus_cfg, device)
    return scorers


def load_extractors(scorers: Scorers, cfg: EvalConfig, focus_cfg: FocusConfig, device) -> None:
    from focusdpo.features.eval import ClipScorer, load_dino_v1, load_subject_extractor

    if {"subject", "backbone_i"} & set(cfg.metrics):
        scorers.subject = load_subject_extractor(focus_cfg, device)
        scorers.names["subject"] = scorers.names["backbone_i"] = scorers.subject.name
    if "dino" in cfg.metrics:
        scorers.dino = load_dino_v1(cfg.dino_v1_weights, device)
        scorers.names["dino"] = scorers.dino.name
    if {"clip_i", "clip_t"} & set(cfg.metrics):
        scorers.clip = ClipScorer(cfg.clip_model, device)
        scorers.names["clip_i"] = scorers.names["clip_t"] = scorers.clip.name


def subject_groups(item) -> list[list[int]]:
    """Reference indices per subject: views of one DreamBench subject share its name."""
    keys = list(item.subjects) if item.subjects else [str(i) for i in range(len(item.references))]
    order = list(dict.fromkeys(keys))
    return [[i for i, key in enumerate(keys) if key == name] for name in order]


def read_image(path, size: int | None = None) -> torch.Tensor:
    """An image file as ``(3, H, W)`` float in [0, 1], optionally resized to ``size`` x ``size`` (bicubic)."""
    image = open_upright(path).convert("RGB")
    return to_tensor(image if size is None else image.resize((size, size), Image.BICUBIC))


def reference_features(scorers: Scorers, cfg: EvalConfig, item) -> dict:
    """Everything about an entry's references the scores need, computed once for all variants and images."""
    return reference_embeddings(scorers, cfg, [read_image(p) for p in item.references], subject_groups(item),
                                item.prompt)


def reference_embeddings(scorers: Scorers, cfg: EvalConfig, views: list[torch.Tensor], groups: list[list[int]],
                         prompt: str) -> dict:
    """Reference views (``(3, H, W)`` in [0, 1], any sizes) grouped per subject -> embeddings per metric."""
    refs = torch.stack([resize_square(v, cfg.score_size) for v in views])
    out = {"refs": refs, "groups": groups}
    if scorers.subject is not None:
        with torch.no_grad():
            out["patches"] = scorers.subject(refs)  # (V, C, hr, wr), reused by every image of the entry
        pooled = pooled_embedding(out["patches"])
        out["backbone_i"] = [pooled[g] for g in groups]
    if scorers.dino is not None:  # the DINO protocol resizes and crops each view itself
        pooled = torch.cat([scorers.dino(v[None]) for v in views])
        out["dino"] = [pooled[g] for g in groups]
    if scorers.clip is not None:
        pooled = torch.cat([scorers.clip.images(v[None]) for v in views])
        out["clip_i"] = [pooled[g] for g in groups]
        out["clip_t"] = scorers.clip.texts([prompt])
    return out


def score_image(scorers: Scorers, cfg: EvalConfig, image: torch.Tensor, refs: dict):
    """All chosen metrics of one ``(3, H, W)`` image; returns (scores dict, subject regions or None)."""
    scores, regions = {}, None
    metrics = set(scorers.metrics)
    patches = None
    if {"subject", "backbone_i"} & metrics:
        with torch.no_grad():
            patches = scorers.subject(resize_square(image, cfg.score_size)[None])  # (1, C, h, w)
    if "subject" in metrics:
        result = subject_scores(patches, refs["patches"], top_n=cfg.subject_top_n,
                                min_similarity=cfg.subject_min_similarity, peak_ratio=cfg.subject_peak_ratio,
                                collapse_iou=cfg.collapse_iou, subject_views=refs["groups"])
        scores.update({name: value.item() for name, value in result.summary().items()})
        scores["subject_fidelity"] = result.fidelity[0].tolist()
        scores["subject_found"] = result.found[0].tolist()
        regions = result.regions[0]
    if "backbone_i" in metrics:
        scores["backbone_i"] = subject_averaged_similarity(pooled_embedding(patches), refs["backbone_i"])[0].item()
    if "dino" in metrics:
        scores["dino"] = subject_averaged_similarity(scorers.dino(image[None]), refs["dino"])[0].item()
    if {"clip_i", "clip_t"} & metrics:
        embedding = scorers.clip.images(image[None])
        if "clip_i" in metrics:
            scores["clip_i"] = subject_averaged_similarity(embedding, refs["clip_i"])[0].item()
        if "clip_t" in metrics:
            scores["clip_t"] = text_image_similarity(embedding, refs["clip_t"]).item()
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in scores.items()}, regions


def image_seed(seed: int, item_id: str, number: int) -> int:
    """The seed of image ``number`` of an entry: the same for every variant, independent of sharding."""
    return zlib.crc32(f"{seed}|{item_id}|{number}".encode())


def image_name(item_id: str, number: int) -> str:
    return f"{item_id}_{number}.png"


def variant_names(cfg: EvalConfig) -> list[str]:
    """``base`` first, then one name per LoRA (its folder or file stem, made unique)."""
    if cfg.images_dir and cfg.variants:
        return list(cfg.variants)
    names = [BASE]
    for path in cfg.loras:
        stem = Path(path).stem if Path(path).suffix == ".safetensors" else Path(path).name
        name, n = stem, 2
        while name in names:
            name, n = f"{stem}-{n}", n + 1
        names.append(name)
    return names


def load_variants(cfg: EvalConfig, model_cfg: ModelConfig, device):
    """The backbone with every LoRA attached as an adapter (a LoRA that does not fit raises, naming it)."""

    backbone = load_backbone(model_cfg.family, model_cfg.pretrained_path, model_cfg.tiny_seed,
                             **model_cfg.adapter_options(6))
    personal = []
    if model_cfg.personalization_lora:
        backbone.add_lora_adapter(model_cfg.personalization_lora, "personal", model_cfg.personalization_lora_loader)
        personal = ["personal"]
    for name, path in zip(variant_names(cfg)[1:], cfg.loras):
        try:
            backbone.add_lora_adapter(path, name, model_cfg.personalization_lora_loader)
        except (ValueError, RuntimeError) as e:  # unknown module names / shape mismatches (another model)
            detail = " ".join(line.strip() for line in str(e).splitlines()[:2])
            raise EvalInputError(f"loras: {path} does not fit this {model_cfg.family} model "
                                 f"({model_cfg.pretrained_path or 'tiny'}): {detail[:400]}") from None
    backbone.to(device)
    backbone.denoiser.eval()
    return backbone, personal


def check_variant_loras(cfg: EvalConfig, model_cfg: ModelConfig) -> None:
    """Every LoRA to load exists, reads and fits the base model (its family; with ``pretrained_path``, its
    denoiser's modules and sizes), before any model loads."""
    loader = model_cfg.personalization_lora_loader
    if model_cfg.personalization_lora:
        check_lora_file(model_cfg.personalization_lora, model_cfg.family, "personalization_lora", loader,
                        model_cfg.pretrained_path)
    for path in cfg.loras:
        check_lora_file(path, model_cfg.family, "loras", loader, model_cfg.pretrained_path)


def select_variant(backbone, name: str, personal: list[str]) -> None:
    """Enable exactly the adapters of ``name``: the personalization LoRA (if any) plus the variant's LoRA."""
    denoiser = backbone.denoiser
    active = personal + ([] if name == BASE else [name])
    if not getattr(denoiser, "peft_config", None):
        return
    if active:
        denoiser.enable_adapters()
        denoiser.set_adapters(active)
    else:
        denoiser.disable_adapters()


def generate_missing(backbone, personal, cfg: EvalConfig, items, out: Path, rank: int) -> int:
    """Generate the images of ``items`` not on disk yet, for every variant; returns how many were made.

    One image per (variant, entry, number) from :func:`image_seed`: identical seeds for every variant, and an
    image depends only on its seed and entry, so a rerun (with the same settings and inputs: :func:`image_record`)
    regenerates exactly what was missing.
    """

    todo = [(v, item, n) for v in variant_names(cfg) for item in items for n in range(cfg.images_per_prompt)
            if not (out / v / image_name(item.item_id, n)).is_file()]
    with tqdm(total=len(todo), desc=f"generate (process {rank})", disable=not todo, position=rank) as bar:
        for variant in variant_names(cfg):
            jobs = [(item, n) for v, item, n in todo if v == variant]
            if jobs:
                select_variant(backbone, variant, personal)
            for start in range(0, len(jobs), cfg.batch_size):
                chunk = jobs[start:start + cfg.batch_size]
                references = [[open_upright(item.references[g[0]]).convert("RGB") for g in subject_groups(item)]
                              for item, _ in chunk]  # one view per subject conditions the generator
                seeds = [image_seed(cfg.seed, item.item_id, n) for item, n in chunk]
                made = sample_images(backbone, [item.prompt for item, _ in chunk], references, seeds,
                                     cfg.resolution, cfg.sample_steps, batch_size=cfg.batch_size)
                for (item, n), image in zip(chunk, made):
                    save_png(image, out / variant / image_name(item.item_id, n))
                bar.update(len(chunk))
    return len(todo)


def score_items(scorers: Scorers, cfg: EvalConfig, items, variants: list[str], images: Path, grid_dir: Path | None,
                grid_ids: set[str], rank: int = 0):
    """Per-sample records of ``items`` and the list of (item_id, variant, reason) skipped for missing images."""

    records, skipped = [], []
    for item in tqdm(items, desc=f"score (process {rank})", position=rank):
        refs = reference_features(scorers, cfg, item)
        for number in range(cfg.images_per_prompt):
            record = {"item_id": item.item_id, "prompt": item.prompt, "image": number,
                      "seed": image_seed(cfg.seed, item.item_id, number), "subjects": len(refs["groups"]),
                      "variants": {}}
            shown = {}
            for variant in variants:
                path = images / variant / image_name(item.item_id, number)
                if not path.is_file():
                    skipped.append({"item_id": item.item_id, "image": number, "variant": variant,
                                    "reason": f"image not found: {path}"})
                    continue
                image = read_image(path)
                record["variants"][variant], regions = score_image(scorers, cfg, image, refs)
                shown[variant] = (image, regions)
            if record["variants"]:
                records.append(record)
            if grid_dir is not None and item.item_id in grid_ids and number == 0 and shown:
                save_prompt_grid(grid_dir / f"{item.item_id}.png", item.prompt, refs["refs"], shown, refs["groups"])
    return records, skipped


def lora_weights(path: str | Path | None) -> str | Path | None:
    """The file a LoRA folder is read from: a training run's folder also holds checkpoints, plots and exports,
    which change without changing the LoRA."""
    inside = Path(path) / LORA_WEIGHTS_NAME if path else None
    return inside if inside is not None and inside.is_file() else path


def image_record(cfg: EvalConfig, model_cfg: ModelConfig, items) -> dict:
    """What the generated images depend on: the sampling settings and content digests of the benchmark file, each
    entry's references, the model and each variant's LoRA. ``max_prompts``, ``images_per_prompt`` and added or
    dropped variants are not in it: an image depends only on its own entry, number and variant."""
    options = {k: v for k, v in model_cfg.adapter_options(6).items() if k not in TRAINING_ONLY}
    named = {"benchmark": cfg.benchmark, "pretrained_path": model_cfg.pretrained_path,
             "personalization_lora": lora_weights(model_cfg.personalization_lora)}
    named.update({f"lora {name}": lora_weights(path) for name, path in zip(variant_names(cfg)[1:], cfg.loras)})
    named.update({f"reference {path}": path for item in items for path in item.references})
    generator = {"family": model_cfg.family, "tiny_seed": None if model_cfg.pretrained_path else model_cfg.tiny_seed,
                 "personalization_lora_loader": model_cfg.personalization_lora_loader, **options}
    return {"generator": generator, "sampling": {"seed": cfg.seed, "resolution": cfg.resolution,
                                                 "sample_steps": cfg.sample_steps},
            "inputs": input_digests(named)}


def check_images_record(out: Path, record: dict) -> None:
    check_record(out, record, OutputError, "images", "--output_dir")


def benchmark_items(cfg: EvalConfig):
    """The benchmark and its first ``max_prompts`` entries, refused when none can be scored."""
    try:
        prompt_set = load_prompt_set(cfg.benchmark, cfg.benchmark_layout, cfg.data_root)
    except PromptSetError as e:
        raise EvalInputError(str(e)) from None
    items = prompt_set.items[: cfg.max_prompts or None]
    if not items:
        raise EvalInputError(f"benchmark {cfg.benchmark}: no entry has all its images ({len(prompt_set.skipped)} "
                             f"skipped, first: {prompt_set.skipped[:1]}); check data_root")
    if not all(item.references for item in items):
        raise EvalInputError(f"benchmark {cfg.benchmark}: entries without references cannot be scored for "
                             "subject fidelity; give a benchmark with reference images")
    return prompt_set, items


def run(cfg: EvalConfig, model_cfg: ModelConfig, focus_cfg: FocusConfig) -> Path:
    """Evaluate and write the report; returns the report folder. Every process calls it (accelerate); the main
    process holds ``output_dir``'s writer lock for the run, so a second run into it is refused at once."""
    state = process_state()
    with output_lock(cfg.output_dir, take=state.is_main_process):
        return evaluate_locked(state, cfg, model_cfg, focus_cfg)


def evaluate_locked(state, cfg: EvalConfig, model_cfg: ModelConfig, focus_cfg: FocusConfig) -> Path:
    """:func:`run` once ``output_dir`` is locked. Generated images are reused only when made with the same
    settings and inputs (:func:`image_record`, checked before any model loads); the report is rebuilt each time."""
    prompt_set, items = benchmark_items(cfg)
    out = Path(cfg.output_dir)
    if not cfg.images_dir:  # images to generate: the LoRAs will load
        check_variant_loras(cfg, model_cfg)
    record = None if cfg.images_dir else image_record(cfg, model_cfg, items)
    if record is not None:
        check_images_record(out, record)
    scorers = build_scorers(cfg, focus_cfg, state.device)
    images = Path(cfg.images_dir) if cfg.images_dir else out / "images"
    mine = items[state.process_index::state.num_processes]
    variants = variant_names(cfg)
    if record is not None:
        backbone, personal = load_variants(cfg, model_cfg, state.device)
        if state.is_main_process:  # once every LoRA fits: a refused start leaves no record to block its fix
            write_record(out, record)
        generate_missing(backbone, personal, cfg, mine, images, state.process_index)
        del backbone
    grid_ids = {item.item_id for item in items[: cfg.grid_prompts]}
    records, skipped = score_items(scorers, cfg, mine, variants, images, out / "grids", grid_ids,
                                   state.process_index)
    shard = out / ".shards" / f"scores-{state.process_index}.json"
    atomic_write_text(shard, json.dumps({"records": records, "skipped": skipped}))
    state.wait_for_everyone()
    if state.is_main_process:
        shards = [json.loads((out / ".shards" / f"scores-{r}.json").read_text()) for r in range(state.num_processes)]
        write_report(out, cfg, model_cfg, scorers.names, variants, prompt_set,
                     [r for s in shards for r in s["records"]], [k for s in shards for k in s["skipped"]], items)
    state.wait_for_everyone()
    return out

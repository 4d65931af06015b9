"""Preference-pair generation from any supported generator: sample → score → select, or instance disruption.

For every prompt entry (``focusdpo.data.prompt_sets``) the generator samples ``num_candidates`` images with recorded
seeds (``focusdpo.models.sampling``), scores each one per subject (``focusdpo.pairs.scoring``, the evaluator's metrics),
and then

- ``select``: winner = best score, loser = the ``loser_rule`` candidate; kept when the margin reaches
  ``margin_threshold``;
- ``disrupt``: winner = best score, loser = the winner with one subject's region repainted as another instance of
  its class (``focusdpo.disrupt``), equal to the winner outside that region, which is stored as ``prior_mask``;
  kept when the region's fidelity to that subject fell by more than ``min_fidelity_drop``.

Every candidate's scores, the margin, the seeds and the scorer settings are stored with the pair. Runs shard over
``accelerate launch`` processes (disjoint entries), write incrementally and resume (``focusdpo.pair_writer``).
Output: ``out/dataset`` in the schema of :mod:`focusdpo.data` plus the columns of ``pair_writer.META_FEATURES``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from focusdpo import __version__
from focusdpo.atomic import output_lock
from focusdpo.config.pairs import PairGenConfig
from focusdpo.data.prompt_sets import PromptItem, load_prompt_set
from focusdpo.errors import ConfigError, PairGenError
from focusdpo.evaluation.run import lora_weights
from focusdpo.images import open_upright
from focusdpo.models import load_backbone
from focusdpo.models.base import check_lora_file
from focusdpo.models.families import FAMILIES
from focusdpo.models.sampling import apply_loras, sample_images
from focusdpo.pairs.disrupt import check_inpainter, inpaint_instance, load_inpainter, mask_image, region_mask
from focusdpo.pairs.scoring import CandidateScorer, load_user_scorer, subject_views
from focusdpo.pairs.writer import ShardWriter, finished_items, merge_shards, write_summary
from focusdpo.processes import process_state
from focusdpo.provenance import check_record, input_digests, write_record


def item_seeds(cfg: PairGenConfig, index: int) -> list[int]:
    """Seeds of entry ``index``'s candidates: independent of sharding, batching and resumption."""
    return [cfg.seed + index * cfg.num_candidates + j for j in range(cfg.num_candidates)]


def ranking(scores: list[float]) -> list[int]:
    """Candidate indices from best to worst score (ties: lower index first)."""
    return sorted(range(len(scores)), key=lambda j: (-scores[j], j))


def pick_loser(order: list[int], rule: str) -> int:
    return {"worst": order[-1], "second": order[1], "median": order[len(order) // 2]}[rule]


def file_image(path: str) -> dict:
    """An image column value holding the file's own bytes (no re-encoding)."""
    return {"bytes": Path(path).read_bytes(), "path": None}


def open_references(item: PromptItem) -> list[Image.Image]:
    refs = []
    for path in item.references:
        try:
            image = open_upright(path)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            raise ValueError(f"reference {path} cannot be read: {e}") from None
        refs.append(image.convert("RGB"))
    return refs


def preflight(cfg: PairGenConfig, family: str, items: list[tuple[int, PromptItem]]) -> None:
    """Refuse inputs that cannot work, naming the entries, before any model loads."""
    if not items:
        raise PairGenError(f"{cfg.prompts} holds no usable prompt entries (see the skipped list)")
    if cfg.scorer:
        load_user_scorer(cfg.scorer)  # an unknown module or function fails here, before any model loads
    if FAMILIES[family].takes_references:
        bare = [item.item_id for _, item in items if not item.references]
        if bare:
            raise PairGenError(f"family {family!r} generates from reference images, but {len(bare)} entries have "
                               f"none (first: {bare[:3]}); add references or drop those entries")
    if cfg.strategy == "disrupt":
        if cfg.region_source == "masks":
            unmasked = [item.item_id for _, item in items if not item.reference_masks]
            if unmasked:
                raise PairGenError(f"region_source: masks, but entries {unmasked[:3]} have no reference_masks")
        classless = [item.item_id for _, item in items if not item.classes]
        if classless:
            raise PairGenError(f"strategy: disrupt inpaints another instance of a subject's class, but entries "
                               f"{classless[:3]} have no classes; add 'classes' (jsonl), or give data_root with "
                               "DreamBench's prompts_and_classes.txt (UNO layout)")


def check_generator_loras(model_cfg, pair_cfg: PairGenConfig, family: str) -> None:
    """The personalization and DPO LoRAs exist, read and are for ``family``, before any model loads."""
    if model_cfg.personalization_lora:
        check_lora_file(model_cfg.personalization_lora, family, "personalization_lora",
                        model_cfg.personalization_lora_loader, model_cfg.pretrained_path)
    if pair_cfg.dpo_lora:
        check_lora_file(pair_cfg.dpo_lora, family, "dpo_lora", pretrained_path=model_cfg.pretrained_path)


class PairGenerator:
    """Holds the models of one process and turns prompt entries into pairs."""

    def __init__(self, cfg: PairGenConfig, backbone, scorer, inpainter=None, guidance_scale: float | None = None):
        self.cfg, self.backbone, self.scorer, self.inpainter = cfg, backbone, scorer, inpainter
        self.guidance_scale = guidance_scale  # SD/SDXL classifier-free guidance (None: the pipeline's default)

    def process(self, index: int, item: PromptItem) -> tuple[dict, list[dict]]:
        """One entry → ``(record, rows)``: the record says kept / dropped and why; rows hold the kept pair."""
        cfg = self.cfg
        refs = open_references(item)
        seeds = item_seeds(cfg, index)
        if cfg.strategy == "disrupt" and item.target:  # a real image is the winner: nothing to sample
            seeds = seeds[:1]  # the inpainting seed
            images = [open_upright(item.target).convert("RGB").resize((cfg.resolution,) * 2, Image.BICUBIC)]
        else:
            images = sample_images(self.backbone, [item.prompt] * len(seeds), [refs] * len(seeds), seeds,
                                   cfg.resolution, cfg.steps, cfg.batch_size, self.guidance_scale)
        combined, parts, subjects, per_subject = self.scorer.score(images, item, refs)
        scores = [float(s) for s in combined]
        order = ranking(scores)
        winner = order[0]
        record = {"item_id": item.item_id, "item_index": index, "candidate_scores": scores}
        detail = {"parts": {k: [float(x) for x in v] for k, v in parts.items()}, "scorer": self.scorer.settings()}
        if cfg.strategy == "select":
            loser = pick_loser(order, cfg.loser_rule)
            rejected, rejected_seed, prior = images[loser], seeds[loser], None
            margin = scores[winner] - scores[loser]
            subject_scores = per_reference(per_subject[[winner, loser]], item)
            if margin < cfg.margin_threshold:
                return {**record, "status": "dropped_margin", "margin": margin,
                        "reason": f"margin {margin:.4f} < margin_threshold {cfg.margin_threshold}"}, []
        else:
            outcome = self.disrupt(item, images[winner], seeds[winner], refs, subjects, winner)
            if outcome["status"] != "kept":
                return {**record, **outcome}, []
            rejected, rejected_seed, prior = outcome.pop("image"), seeds[winner], outcome.pop("mask")
            margin = scores[winner] - outcome["loser_score"]
            subject_scores = disrupted_subject_scores(item, outcome["disrupted_subject"])
            detail.update({k: v for k, v in outcome.items() if k != "status"})
        row = {"pair_id": item.item_id, "prompt": item.prompt, "chosen": images[winner], "rejected": rejected,
               "references": [file_image(p) for p in item.references],
               "reference_masks": [file_image(p) for p in item.reference_masks], "prior_mask": prior,
               "item_index": index, "classes": list(item.classes), "chosen_seed": seeds[winner],
               "rejected_seed": rejected_seed, "candidate_seeds": seeds, "candidate_scores": scores,
               "score_parts": json.dumps(detail, sort_keys=True), "margin": margin, "strategy": cfg.strategy,
               "subject_scores": subject_scores}
        return {**record, "status": "kept", "margin": margin, "reason": ""}, [row]

    def disrupt(self, item, winner_image, seed, refs, subjects, winner) -> dict:
        """Repaint one subject of the winner; ``status`` kept with ``image``/``mask``, or dropped_dip with why."""

        cfg = self.cfg
        views = subject_views(item) or [[j] for j in range(len(item.references))]  # reference indices per subject
        fidelity = subjects.fidelity[winner].tolist()
        if cfg.disrupt_subject == "random":
            k = random.Random(seed).randrange(len(fidelity))
        else:
            pick = min if cfg.disrupt_subject == "lowest" else max
            k = pick(range(len(fidelity)), key=lambda j: (fidelity[j], j))
        if cfg.region_source == "masks":
            mask = open_upright(item.reference_masks[views[k][0]]).convert("L")
            mask = mask.resize((cfg.resolution,) * 2, Image.NEAREST)
            region = torch.from_numpy(np.asarray(mask) > 127)
        else:
            region = region_mask(subjects.regions[winner, k].cpu(), cfg.resolution, cfg.region_dilation)
        cls = item.classes[views[k][0]]
        if not bool(region.any()):
            return {"status": "dropped_dip", "reason": f"subject {k} ({cls}) has no region to disrupt"}
        prompt = cfg.inpaint_prompt.format(cls=cls)
        loser = inpaint_instance(self.inpainter, winner_image, region, prompt, seed, cfg.inpaint_steps,
                                 cfg.inpaint_strength)
        before = self.scorer.region_fidelity(winner_image, refs, views[k], region)
        after = self.scorer.region_fidelity(loser, refs, views[k], region)
        if not before - after > cfg.min_fidelity_drop:
            return {"status": "dropped_dip", "reason": f"region fidelity of subject {k} did not fall by more than "
                    f"{cfg.min_fidelity_drop}: {before:.4f} → {after:.4f}"}
        loser_score = float(self.scorer.score([loser], item, refs)[0][0])
        return {"status": "kept", "image": loser, "mask": mask_image(region), "loser_score": loser_score,
                "disrupted_subject": k, "region_fidelity": [before, after], "inpaint_prompt": prompt}


def subject_groups_of(item) -> list[list[int]]:

    return subject_views(item) or [[j] for j in range(len(item.references))]


def per_reference(per_subject: torch.Tensor, item) -> list[list[float]]:
    """``(2, S)`` per-subject scores of [chosen, rejected] -> ``[[K], [K]]`` per reference (a subject shown by
    several references gives each of them its score)."""
    subject_of = {j: s for s, views in enumerate(subject_groups_of(item)) for j in views}
    return [[float(row[subject_of[j]]) for j in range(len(item.references))] for row in per_subject]


def disrupted_subject_scores(item, disrupted: int) -> list[list[float]]:
    """A disruption's labels: the repainted subject prefers the winner (1 vs 0), every other subject ties."""
    views = set(subject_groups_of(item)[disrupted])
    return [[1.0] * len(item.references), [0.0 if j in views else 1.0 for j in range(len(item.references))]]


def resolve_device_dtype(cfg: PairGenConfig, state) -> tuple[torch.device, torch.dtype]:
    device = state.device if cfg.device == "auto" else torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda, but torch sees no CUDA device here: set device: auto or cpu")
    if cfg.dtype != "auto":
        return device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]
    if device.type != "cuda":
        return device, torch.float32
    return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_generator(model_cfg, pair_cfg: PairGenConfig, device, dtype):
    """The backbone with its LoRAs, on ``device`` in ``dtype`` (denoiser included: nothing trains here)."""

    backbone = load_backbone(model_cfg.family, model_cfg.pretrained_path, model_cfg.tiny_seed,
                             **model_cfg.adapter_options(max_references=6))
    apply_loras(backbone, model_cfg.personalization_lora, pair_cfg.dpo_lora, model_cfg.personalization_lora_loader)
    backbone.to(device, dtype)
    if dtype != torch.float32:
        backbone.cast_denoiser(dtype)  # around a quantized base's weights (quantize_base)
    backbone.denoiser.to(device)
    backbone.denoiser.eval()
    return backbone


def run_inputs(pair_cfg, model_cfg, items: list) -> dict[str, str | None]:
    """Content digests of what the pairs are made from: the prompt file, every reference image and mask, the
    generator's folder and LoRAs, the inpainter."""
    named = {"prompts": pair_cfg.prompts, "pretrained_path": model_cfg.pretrained_path,
             "personalization_lora": lora_weights(model_cfg.personalization_lora),
             "dpo_lora": lora_weights(pair_cfg.dpo_lora),
             "inpaint_path": pair_cfg.inpaint_path if pair_cfg.strategy == "disrupt" else None}
    for item in items:
        named.update({f"reference {p}": p for p in [*item.references, *item.reference_masks]})
    return input_digests(named)


def provenance(pair_cfg, model_cfg, scorer, inpainter, layout: str, dtype) -> dict:
    return {"focusdpo_version": __version__, "prompts": pair_cfg.prompts, "prompt_layout": layout,
            "generator": {"family": model_cfg.family, "pretrained_path": model_cfg.pretrained_path,
                          "tiny_seed": model_cfg.tiny_seed if not model_cfg.pretrained_path else None,
                          "personalization_lora": model_cfg.personalization_lora, "dpo_lora": pair_cfg.dpo_lora,
                          "dtype": str(dtype)},
            "sampling": {k: getattr(pair_cfg, k) for k in ("num_candidates", "seed", "resolution", "steps")}
            | {"guidance_scale": model_cfg.guidance_scale, "seed_rule": "seed + index·num_candidates + j"},
            "selection": {k: getattr(pair_cfg, k) for k in ("strategy", "loser_rule", "margin_threshold",
                                                            "min_fidelity_drop", "disrupt_subject", "region_source")},
            "scorer": scorer.settings(),
            "inpainter": None if inpainter is None else {
                "class": type(inpainter).__name__, "path": pair_cfg.inpaint_path, "prompt": pair_cfg.inpaint_prompt,
                "steps": pair_cfg.inpaint_steps, "strength": pair_cfg.inpaint_strength}}


def generate_pairs(pair_cfg: PairGenConfig, model_cfg, focus_cfg, backbone=None, inpainter=None,
                   extractor=None) -> dict | None:
    """Run the generator in this process (one of ``accelerate launch``'s, or alone); returns the summary on the
    main process. ``backbone`` / ``inpainter`` / ``extractor`` replace the configured ones (tests, notebooks).
    The main process holds ``out``'s writer lock for the run: a second run into it is refused at once."""

    state = process_state(cpu=pair_cfg.device == "cpu")
    with output_lock(pair_cfg.out, take=state.is_main_process):
        return generate_locked(state, pair_cfg, model_cfg, focus_cfg, backbone, inpainter, extractor)


def check_pair_record(out, record: dict) -> None:
    check_record(out, record, PairGenError, "pairs", "out folder")


def generate_locked(state, pair_cfg: PairGenConfig, model_cfg, focus_cfg, backbone, inpainter,
                    extractor) -> dict | None:
    """:func:`generate_pairs` once ``out`` is locked. ``max_items`` selects the entries: a rerun with more extends
    the run, one with fewer merges only theirs (inputs of the others' are not compared: their work is not used)."""
    datasets.disable_progress_bars()  # one bar: the generator's own
    prompt_set = load_prompt_set(pair_cfg.prompts, pair_cfg.prompt_layout, pair_cfg.data_root,
                                 pair_cfg.missing_references, pair_cfg.unique_token)
    items = list(enumerate(prompt_set.items))
    items = items[: pair_cfg.max_items] if pair_cfg.max_items else items
    preflight(pair_cfg, backbone.family if backbone is not None else model_cfg.family, items)
    check_generator_loras(model_cfg, pair_cfg, backbone.family if backbone is not None else model_cfg.family)
    inputs = run_inputs(pair_cfg, model_cfg, [item for _, item in items])
    check_pair_record(pair_cfg.out, {"inputs": inputs})  # before any model loads
    device, dtype = resolve_device_dtype(pair_cfg, state)
    if inpainter is not None:
        check_inpainter(inpainter)
    elif pair_cfg.strategy == "disrupt":
        inpainter = load_inpainter(pair_cfg.inpaint_path, device, dtype if device.type == "cuda" else None)
    scorer = CandidateScorer(pair_cfg, focus_cfg, device, extractor)
    backbone = backbone or load_generator(model_cfg, pair_cfg, device, dtype)
    generator = PairGenerator(pair_cfg, backbone, scorer, inpainter,
                              model_cfg.guidance_scale if not backbone.is_flow else None)

    info = {**provenance(pair_cfg, model_cfg, scorer, inpainter, prompt_set.layout, dtype), "inputs": inputs}
    check_pair_record(pair_cfg.out, info)
    if state.is_main_process:
        write_record(pair_cfg.out, info)
    done = finished_items(pair_cfg.out)
    state.wait_for_everyone()  # every process sees the same finished set before anyone writes
    todo = [(i, item) for i, item in items if item.item_id not in done][state.process_index::state.num_processes]
    write_shards(generator, todo, ShardWriter(pair_cfg.out, state.process_index, pair_cfg.items_per_shard),
                 state.process_index)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    merged = merge_shards(pair_cfg.out, info, {index for index, _ in items})
    chosen = {item.item_id for _, item in items}
    records = {key: record for key, record in finished_items(pair_cfg.out).items() if key in chosen}
    summary = write_summary(pair_cfg.out, records, prompt_set.skipped)
    summary["dataset"] = str(Path(pair_cfg.out) / "dataset") if merged is not None else None
    return summary


def write_shards(generator: PairGenerator, todo: list, writer: ShardWriter, rank: int) -> None:
    """Turn this process's entries into pairs, written shard by shard; one failing entry is recorded, not fatal."""
    bar = tqdm(todo, desc=f"pairs[{rank}]", position=rank, unit="prompt")
    kept = 0  # this process's kept pairs this session (the writer's records restart at every shard)
    for index, item in bar:
        try:
            record, rows = generator.process(index, item)
        except Exception as e:  # one bad entry must not stop the run: it is listed in the summary
            record, rows = {"item_id": item.item_id, "item_index": index, "status": "failed",
                            "reason": f"{type(e).__name__}: {e}"}, []
        writer.add(record, rows)
        kept += record["status"] == "kept"
        bar.set_postfix(kept=kept)
    writer.flush()

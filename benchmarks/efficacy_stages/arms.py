"""The arms: one trainer run each, at equal steps and data, from generated recipes.

The pairs go through the project's own commands first: ``focusdpo embed --latents`` (cached prompt embeddings
and VAE latents: the step then runs the transformer only) and ``focusdpo focus`` (cached static focus maps, one
dataset per static focus setting: the prior-mask ablation changes ``pair_alignment`` and so the cache key).
"""

from __future__ import annotations

from pathlib import Path

from . import recipes  # light: the arm tables load without torch (the heavy imports are in the functions)

# Static focus settings (cached in the maps): MobileNetV2 features from the offline wheel, 64 px input.
FOCUS_STATIC = {"feature_backbone": "mobilenet_v2", "dino_image_size": 64}
MAP_SETS = {"aligned": {"pair_alignment": "auto"}, "unaligned": {"pair_alignment": "unaligned"},
            # maps without the correspondence gate: the no-confidence ablation and the per-step reference-error gate
            "ungated": {"pair_alignment": "auto", "confidence_source": "none"}}


SAVE_EVERY = 100  # steps between an arm's checkpoints; the two newest are kept (recipes.train resumes from them)
ARM_KEYS = ("arm_steps", "arm_batch", "arm_lr", "beta", "lora_rank")  # the sizes an arm's stage depends on


def focus(lambda_structure: float, lambda_detail: float, **extra) -> dict:
    return {"lambda_structure": lambda_structure, "lambda_detail": lambda_detail, **extra}


def arm_table(lam_s: float, lam_d: float, sdpo_mu: float, sweep: bool = True) -> dict[str, dict]:
    """arm name → recipe fields (and the focus-map set it trains on); ``sweep`` adds the λ sweep (issue §3)."""
    table = {
        "sft": {"objective": "sft", "maps": "aligned"},
        "dpo": {**focus(0.0, 0.0), "maps": "aligned"},
        "focusdpo": {**focus(lam_s, lam_d), "maps": "aligned"},
        "no_complexity": {**focus(lam_s, 0.0), "maps": "aligned"},
        # g(u) ≡ 0.5 for every u: the same mean weight per term as the schedule (u is uniform around 0.5)
        "no_schedule": {**focus(lam_s, lam_d, schedule_width=1.0e6), "maps": "aligned"},
        "no_prior": {**focus(lam_s, lam_d), "maps": "unaligned"},
        "no_confidence": {**focus(lam_s, lam_d, confidence_source="none"), "maps": "ungated"},
        # the alternative reading of "penalise low prediction confidence": the reference model's own error
        "reference_error": {**focus(lam_s, lam_d, confidence_source="reference_error"), "maps": "ungated"},
        "focusdpo_sdpo": {**focus(lam_s, lam_d, sdpo_mu=sdpo_mu), "maps": "aligned"},
    }
    if sweep:
        table.update({"lambda_s3": {**focus(3.0, lam_d), "maps": "aligned"},
                      "lambda_s10": {**focus(10.0, lam_d), "maps": "aligned"},
                      "lambda_d3": {**focus(lam_s, 3.0), "maps": "aligned"}})
    # MOSAIC's SCA + MD on the winners' attention (the released code's 0.1 each; MD ramped in over the first
    # fifth of the steps); correspondence points made on the fly with the focus features
    table["focusdpo_mosaic"] = {**focus(lam_s, lam_d, lambda_sca=0.1, lambda_md=0.1, md_ramp_steps=100),
                                "maps": "aligned"}
    return table


# Run first, every seed (seed-major), then every other arm (seed-major too): an interrupted study has the main
# comparison (vanilla DPO vs FocusDPO at the default and the strongest λ_s, SFT) on every seed first.
FIRST_ARMS = ("dpo", "focusdpo", "lambda_s10", "sft")
TODO_ARMS: dict[str, str] = {}  # arms the issue lists that this study does not run


def base_fields(pipeline: Path, dataset: Path) -> dict:
    return {"pretrained_path": str(pipeline), "dataset": str(dataset), **FOCUS_STATIC}


def build_pairs(out: Path, sizes: dict, pipeline: Path, seed: int) -> None:
    """``out/raw`` (world pairs), ``out/embedded`` (encoder caches), ``out/<map set>`` (cached focus maps)."""
    from focusdpo.commands.caches import embed_main
    from focusdpo.commands.caches import focus_main as precompute_main
    from focusdpo.data.load import save_dataset

    from . import world

    save_dataset(world.make_pairs(sizes["pairs"], seed + 200, "pair"), str(out / "raw"))
    recipe = recipes.write_recipe(out / "embed.yaml", {**base_fields(pipeline, out / "raw"), "output_dir": str(out)})
    embed_main(["--out", str(out / "embedded"), "--latents", "--device", "cpu", "--config", str(recipe)])
    for name, settings in MAP_SETS.items():
        recipe = recipes.write_recipe(out / f"focus_{name}.yaml", {
            **base_fields(pipeline, out / "embedded"), **settings, "output_dir": str(out)})
        precompute_main(["--out", str(out / name), "--device", "cpu", "--config", str(recipe)])


def arm_recipe(folder: Path, arm: dict, sizes: dict, pipeline: Path, pairs: Path, seed: int) -> Path:
    fields = {**base_fields(pipeline, pairs / arm["maps"]), **MAP_SETS[arm["maps"]]}
    fields.update({key: value for key, value in arm.items() if key != "maps"})  # the arm's own fields win
    fields.update({"output_dir": str(folder / "run"), "max_steps": sizes["arm_steps"],
                   "per_device_train_batch_size": sizes["arm_batch"], "learning_rate": sizes["arm_lr"],
                   "beta": sizes["beta"], "lora_rank": sizes["lora_rank"], "lora_alpha": sizes["lora_rank"],
                   "save_steps": save_steps(sizes["arm_steps"]), "save_total_limit": 2,
                   "logging_steps": min(5, sizes["arm_steps"]),
                   "drop_text_encoders": True, "seed": seed})
    return recipes.write_recipe(folder / "recipe.yaml", fields)


def save_steps(steps: int) -> int:
    """Checkpoint every SAVE_EVERY steps (at least twice a run, and at the end): an interrupted arm resumes from its
    last checkpoint before the end."""
    return max(1, min(SAVE_EVERY, steps // 2))


def train_arm(folder: Path, arm: dict, sizes: dict, pipeline: Path, pairs: Path, seed: int) -> None:
    recipes.train(arm_recipe(folder, arm, sizes, pipeline, pairs, seed), folder / "run")

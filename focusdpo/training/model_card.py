"""The model card (``README.md`` beside the LoRA) written at the end of training.

The hub's card layout: YAML metadata built with ``huggingface_hub.ModelCardData`` (``base_model``,
``library_name``, ``tags``), then what a user needs to judge and load the LoRA: base model, family, β,
λ, data, steps, how to load it, and the before/after sample grid when the run wrote one.
"""

from __future__ import annotations

from pathlib import Path

from focusdpo.atomic import atomic_write_text
from focusdpo.export import EXPORT_NAMES
from focusdpo.models.families import FAMILIES

SAMPLES_NAME = "samples_before_after.png"

EXPORT_USERS = {"kohya": "A1111/ComfyUI/kohya", "comfyui": "ComfyUI"}


def card_facts(configs, steps: int, num_pairs: int) -> list[tuple[str, str]]:
    """(label, value) rows of the card's table."""
    train, model, data, loss, focus = configs
    tiny = f"tiny random {model.family} generator (tiny_seed {model.tiny_seed})"
    base = Path(model.pretrained_path).name if model.pretrained_path else tiny
    rows = [("base model", base), ("family", model.family), ("reference", model.reference_mode)]
    if model.personalization_lora:
        rows.append(("personalization LoRA (frozen reference)", Path(model.personalization_lora).name))
    if model.lora_rank > 0:
        trained = f"LoRA rank {model.lora_rank}, alpha {model.lora_alpha:g}"
    else:
        trained = f"every {FAMILIES[model.family].denoiser} weight (full fine-tune)"
    rows += [("trained", trained),
             ("β (Diffusion-DPO scale)", f"{loss.beta:g}, loss {loss.loss_type}"),
             ("λ_structure, λ_detail", f"{focus.lambda_structure:g}, {focus.lambda_detail:g}"
                                       + ("" if focus.enabled else " (vanilla Diffusion-DPO)")),
             ("data", f"{data.dataset} ({num_pairs} pairs, {data.resolution} px)"),
             ("steps", f"{steps} (batch {train.per_device_train_batch_size} pairs per device, "
                       f"learning rate {train.learning_rate:g})")]
    return rows


def model_card_text(out: Path, configs, steps: int, num_pairs: int) -> str:
    from huggingface_hub import ModelCardData

    model = configs[1]
    base = Path(model.pretrained_path).name if model.pretrained_path else None
    metadata = ModelCardData(base_model=base, library_name="diffusers",
                             tags=["lora", "diffusion-dpo", "focusdpo", model.family]).to_yaml()
    table = "\n".join(f"| {label} | {value} |" for label, value in card_facts(configs, steps, num_pairs))
    kind = " LoRA" if model.lora_rank > 0 else ""
    lines = [f"---\n{metadata}\n---\n", f"# {out.name}: focus-weighted Diffusion-DPO{kind}\n",
             "Trained with focusdpo. Every resolved setting is in `config.yaml`, the training curves in "
             "`metrics.jsonl` (`focusdpo plot` draws them).\n", "| | |\n| --- | --- |", table, "",
             "## Load\n", "```python", load_line(model), "```\n"]
    for kind, name in EXPORT_NAMES.items():
        if (out / name).is_file():
            lines.append(f"For {EXPORT_USERS[kind]}: `{name}` (scaled as trained: alpha from the LoraConfig).\n")
    if (out / SAMPLES_NAME).is_file():
        lines += ["## Samples\n", "Top row: the reference model; bottom row: the trained model (same seeds).\n",
                  f"![samples]({SAMPLES_NAME})\n"]
    return "\n".join(lines)


def load_line(model) -> str:
    """How diffusers loads the result: the LoRA, or the fine-tuned denoiser folder of a full fine-tune."""
    if model.lora_rank > 0:
        return 'pipe.load_lora_weights("path/to/this/folder")  # diffusers'
    name = FAMILIES[model.family].denoiser
    return f'pipe.{name} = type(pipe.{name}).from_pretrained("path/to/this/folder/{name}")'


def write_model_card(out: str | Path, configs, steps: int, num_pairs: int) -> Path:
    """Write ``out/README.md`` atomically; returns its path."""
    out = Path(out)
    return atomic_write_text(out / "README.md", model_card_text(out, configs, steps, num_pairs))

"""``plan_recipe``: a recipe's step traced at real size, as a dict; ``format_plan``: that dict as a table.

Every figure is an estimate from a step traced on fake tensors (:mod:`focusdpo.planning.trace`): nothing here was
measured on a GPU. ``benchmarks/plan_vs_profiler.py`` holds the estimate against the CPU allocator's real peak, and
``benchmarks/gpu_check.py`` against ``torch.cuda.max_memory_allocated`` when a GPU is lent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from focusdpo.models.families import QUANTIZATIONS
from focusdpo.planning.memory import CARDS, GIB, card_fits, frozen_component_bytes, memory_split
from focusdpo.planning.presets import Preset, get_preset, preset_for
from focusdpo.planning.settings import FLOW_FAMILIES, StepSettings, read_settings
from focusdpo.planning.trace import trace_step

LABEL = "estimates from one step traced on fake tensors (no weights, no GPU); not measurements"


def plan_recipe(path: str | Path, batch: int | None = None, preset: str | None = None) -> dict:
    """Plan the recipe at ``path`` with ``batch`` pairs per device (default: its ``per_device_train_batch_size``)
    on its own denoiser (``preset`` names another, e.g. ``flux2-klein-9b``)."""
    settings = read_settings(path, per_device_train_batch_size=batch)
    chosen = get_preset(preset) if preset else preset_for(settings.family, settings.pretrained_path, Path(path).parent)
    return plan_settings(settings, chosen)


def plan_settings(settings: StepSettings, preset: Preset) -> dict:
    """The plan of ``settings`` on ``preset``: both checkpointing settings traced, memory split, card fits."""
    pairs = settings.per_device_train_batch_size
    traces = {on: trace_step(settings, preset, pairs, on).to_dict() for on in (True, False)}
    memory = {key(on): memory_split(traces[on], preset, settings, pairs) for on in (True, False)}
    chosen = traces[settings.activation_checkpointing]
    cards = card_fits(chosen, preset, settings, pairs)
    plan = {"recipe": settings.recipe, "label": LABEL, "settings": asdict(settings), "pairs": pairs,
            "model": model_summary(preset, chosen), "traces": {key(on): traces[on] for on in (True, False)},
            "memory": memory, "cards": cards, "fits_any_card": any(c["max_batch"] >= 1 for c in cards),
            "notes": notes(preset, settings) + quantization_notes(settings, chosen)}
    plan["suggestions"] = suggestions(traces, preset, settings) if not any(c["fits"] for c in cards) else []
    return plan


def key(checkpointing: bool) -> str:
    return "checkpointing" if checkpointing else "no checkpointing"


def model_summary(preset: Preset, trace: dict) -> dict:
    return {"preset": preset.name, "class": preset.model_class, "source": preset.source,
            "params": trace["base_params"] + (trace["trainable_params"] if trace["lora_layers"] else 0),
            "base_params": trace["base_params"], "trainable_params": trace["trainable_params"],
            "lora_layers": trace["lora_layers"], "lora_targets": trace["lora_targets"],
            "frozen_components": dict(preset.frozen)}


def notes(preset: Preset, settings: StepSettings) -> list[str]:
    """What the figures leave out or assume, in the recipe's terms."""
    out = []
    if settings.references:
        out.append(f"traced with K = max_references = {settings.references} references in every sample (the most "
                   "a batch can hold); batches with fewer references need less")
    kept = [n for n in frozen_component_bytes(preset, settings) if "vae" not in n]
    if kept:
        out.append(f"text encoders ({', '.join(kept)}) counted: the trainer keeps them on the device unless the "
                   "recipe sets drop_text_encoders: true (flow families, with cached prompt embeddings)")
    elif not text_encoders(preset):
        out.append(f"the text encoders' size is not recorded for {preset.name}: not counted")
    else:
        out.append("text encoders not counted: the recipe drops or offloads them")
    if settings.reference_mode == "frozen_adapter":
        out.append("the frozen personalization LoRA (personalization_lora) is not counted: its rank is in a file "
                   "that is not here; add its parameters × 2 bytes to the weights")
    if settings.mosaic:
        out.append("MOSAIC capture is computed from focusdpo.attention's memory formula with all K·l reference "
                   "rows captured (an upper bound for md_rows: matched)")
    out.append("one device holding the whole denoiser (DDP); under FSDP (recipes/accelerate/fsdp.yaml) the frozen "
               "weights shard across the GPUs")
    out.append("cards: usable = nvidia-smi total − 1.5 GiB (CUDA context, workspaces); allocator margin = 10 % of "
               "activations")
    return out


def quantization_notes(settings: StepSettings, trace: dict) -> list[str]:
    """How a quantized base is counted (``quantize_base``)."""
    quantization = QUANTIZATIONS.get(settings.quantize_base)
    if quantization is None:
        return []
    linear = f"{trace['quantized_params']:,} Linear weights of the denoiser"
    if quantization.saves_dequantized:
        return [f"{linear} counted in int8 with a float32 scale per row (torchao); the copy in the compute dtype that "
                "its linear keeps for backward is traced with the activations (with checkpointing, one block's)"]
    size = "4 bits + block scales (NF4, double quantization)" if settings.quantize_base == "nf4" else \
        "int8 + a float32 scale per row (LLM.int8)"
    return [f"{linear} counted at {size}, bitsandbytes; the copy it dequantizes inside each matmul lives for one "
            "layer at a time and is not counted"]


def text_encoders(preset: Preset) -> list[str]:
    return [name for name in preset.frozen if "vae" not in name]


# ---- what would make a recipe fit ----------------------------------------------------------------------------
def token_scale(trace: dict, references: int | None = None, side_scale: float = 1.0) -> float:
    """Activation scale for fewer references or a smaller resolution: activations grow linearly with the tokens
    per sample (every projection is per token; fused attention keeps O(S) per head)."""
    tokens = trace["tokens"]
    per_ref = tokens["references"] / trace["references"] if trace["references"] else 0
    k = trace["references"] if references is None else references
    image = (tokens["target"] + k * per_ref) * side_scale ** 2
    return (image + tokens["text"]) / (tokens["target"] + tokens["references"] + tokens["text"])


def scaled(trace: dict, activations: float = 1.0, trainable: float = 1.0) -> dict:
    return {**trace, "peak_activation_bytes": trace["peak_activation_bytes"] * activations,
            "trainable_params": int(trace["trainable_params"] * trainable),
            "trainable_factored": int(trace["trainable_factored"] * trainable)}


@dataclass(frozen=True)
class Change:
    """A recipe change that lowers memory: new field values, and its effect on the traced step (checkpointing
    switches to the other trace; the factors scale activations and trainable parameters)."""

    label: str
    values: dict
    checkpointing: bool | None = None
    activations: float = 1.0
    trainable: float = 1.0


def candidate_changes(trace: dict, settings: StepSettings, preset: Preset) -> list[Change]:
    """Each knob the recipe has left that lowers memory."""
    out = []
    if not settings.activation_checkpointing:
        out.append(Change("activation_checkpointing: true", {"activation_checkpointing": True}, checkpointing=True))
    if not any(word in settings.optim for word in ("8bit", "4bit", "adafactor", "sgd")):
        out.append(Change("optim: adamw_8bit", {"optim": "adamw_8bit"}))
    if settings.quantize_base == "none" and settings.lora_rank > 0:
        out.append(Change("quantize_base: nf4", {"quantize_base": "nf4"}))
    if settings.family in FLOW_FAMILIES and settings.keeps_text_encoders and text_encoders(preset):
        out.append(Change("drop_text_encoders: true", {"drop_text_encoders": True}))
    if settings.lora_rank > 4:
        rank = settings.lora_rank // 2
        out.append(Change(f"lora_rank: {rank}", {"lora_rank": rank}, trainable=rank / settings.lora_rank))
    if settings.references > 1:
        fewer = max(1, settings.references // 2)
        out.append(Change(f"max_references: {fewer}", {"max_references": fewer}, activations=token_scale(trace, fewer)))
    if settings.resolution >= 512:
        smaller = settings.resolution * 3 // 4 // 16 * 16
        out.append(Change(f"resolution: {smaller}", {"resolution": smaller},
                          activations=token_scale(trace, None, smaller / settings.resolution)))
    return out


def apply_changes(changes: list[Change], traces: dict, settings: StepSettings) -> tuple[StepSettings, dict]:
    """Settings and trace after ``changes`` together."""
    checkpointing, activations, trainable = settings.activation_checkpointing, 1.0, 1.0
    for change in changes:
        settings = replace(settings, **change.values)
        checkpointing = change.checkpointing if change.checkpointing is not None else checkpointing
        activations, trainable = activations * change.activations, trainable * change.trainable
    return settings, scaled(traces[checkpointing], activations, trainable)


def smallest_card(trace: dict, preset: Preset, settings: StepSettings) -> tuple[float, str | None]:
    total = memory_split(trace, preset, settings, 1)["total"]
    return round(total / GIB, 1), next((card.name for card in CARDS if total <= card.usable), None)


def suggestions(traces: dict, preset: Preset, settings: StepSettings) -> list[dict]:
    """Each change alone at batch 1, then all of them together: the estimate and the smallest card it fits."""
    changes = candidate_changes(traces[settings.activation_checkpointing], settings, preset)
    out = []
    for group in [[c] for c in changes] + ([changes] if len(changes) > 1 else []):
        changed_settings, changed_trace = apply_changes(group, traces, settings)
        total, card = smallest_card(changed_trace, preset, changed_settings)
        out.append({"change": group[0].label if len(group) == 1 else "all of the above", "total_gib": total,
                    "fits": card})
    return out


# ---- the table ------------------------------------------------------------------------------------------------
def gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def tflops(n: float) -> str:
    return f"{n / 1e12:,.1f}"


def format_plan(plan: dict) -> str:
    """The plan as the text ``focusdpo plan`` prints."""
    return "\n".join(header_lines(plan) + flop_lines(plan) + memory_lines(plan) + card_lines(plan)
                     + suggestion_lines(plan) + [f"note: {n}" for n in plan["notes"]])


def header_lines(plan: dict) -> list[str]:
    s, m = plan["settings"], plan["model"]
    lora = f"LoRA r{s['lora_rank']} on {m['lora_layers']} layers" if m["lora_layers"] else "full fine-tune"
    return [f"focusdpo plan: {plan['recipe']}  ({plan['label']})",
            f"model      {m['preset']} ({m['class']}; {m['source']})",
            f"params     {m['params']:,} total, {m['trainable_params']:,} trainable ({lora})", step_line(plan)]


def step_line(plan: dict) -> str:
    """What one device computes per step: rows × tokens per row, resolution, precision, optimizer."""
    s = plan["settings"]
    trace = plan["traces"][key(s["activation_checkpointing"])]
    t, k = trace["tokens"], trace["references"]
    refs = f" + {k}×{t['references'] // k} reference" if k else ""
    pairs = f"{plan['pairs']} pair{'s' if plan['pairs'] > 1 else ''}/device"
    rows = f"{trace['rows']} denoiser row{'s' if trace['rows'] > 1 else ''}"
    quantized = f" (Linear weights {s['quantize_base']})" if s.get("quantize_base", "none") != "none" else ""
    return (f"step       {pairs} = {rows} × ({t['target']} target{refs} + {t['text']} text "
            f"tokens) at {s['resolution']} px, {trace['weight_dtype']} weights{quantized}, optim {s['optim']}, "
            f"objective {s['objective']}")


def flop_lines(plan: dict) -> list[str]:
    lines = []
    for name, trace in plan["traces"].items():
        f = trace["flops"]
        lines.append(f"TFLOPs     {tflops(f['total'])} per step with {name} (policy fwd "
                     f"{tflops(f['policy_forward'])}, reference fwd {tflops(f['reference_forward'])}, backward "
                     f"{tflops(f['backward'])}); traced in {trace['seconds']:.1f} s")
    return lines


def memory_lines(plan: dict) -> list[str]:
    """Rows by holder, one column per checkpointing setting (the recipe's marked)."""
    chosen = key(plan["settings"]["activation_checkpointing"])
    columns = list(plan["memory"])
    titles = [f"{name}{' (recipe)' if name == chosen else ''}" for name in columns]
    width = max(len(t) for t in titles) + 3
    lines = [f"{'memory (GiB)':<34}" + "".join(f"{t:>{width}}" for t in titles)]
    for row in plan["memory"][chosen]:
        lines.append(f"  {row:<32}" + "".join(f"{gib(plan['memory'][c][row]):>{width}}" for c in columns))
    saved = "".join(f"{gib(plan['traces'][c]['saved_bytes']):>{width}}" for c in columns)
    lines.append(f"  {'(activations saved for bwd)':<32}{saved}")
    return lines


def card_lines(plan: dict) -> list[str]:
    pairs = plan["pairs"]
    cells = [f"{c['card']}: {'fits' if c['fits'] else 'no'}, up to {c['max_batch']}" for c in plan["cards"]]
    lines = [f"cards      batch {pairs} with the recipe's checkpointing → " + " · ".join(cells)]
    if not plan["fits_any_card"]:
        lines.append("           does NOT fit any listed card even at batch 1 (see the changes below)")
    elif not any(c["fits"] for c in plan["cards"]):
        lines.append(f"           batch {pairs} fits no listed card; lower per_device_train_batch_size "
                     "(and raise gradient_accumulation_steps) or apply a change below")
    return lines


def suggestion_lines(plan: dict) -> list[str]:
    if not plan["suggestions"]:
        return []
    lines = ["changes at batch 1 (estimate, smallest card that fits):"]
    for s in plan["suggestions"]:
        lines.append(f"  {s['change']:<34}{s['total_gib']:>8.1f} GiB  → {s['fits'] or 'still no listed card'}")
    return lines

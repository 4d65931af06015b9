"""Prompt sets with reference subjects: one loader per layout, all giving :class:`PromptItem` lists.

Layouts (``layout="auto"`` picks one from the file):

- ``uno``: UNO's DreamBench JSON, a list of ``{prompt, image_paths}`` or ``{"entries": [...]}``. Paths such as
  ``./dreambooth/dataset/can/01.jpg`` lose the ``dreambooth/dataset/`` prefix (UNO's own folder layout) and
  are read relative to ``data_root``; the folder name is the subject, its class comes from DreamBench's
  ``prompts_and_classes.txt`` when ``data_root`` holds one.
- ``xverse``: XVerseBench JSON: ``prompt`` and ``modulation[0].src_inputs[*]{image_path, caption}``; the caption
  (minus its article) is the subject's class.
- ``jsonl``: the project's own list, one object per line: ``prompt``, ``references`` (paths), optional
  ``reference_masks``, optional ``classes``, optional ``id``, optional ``target`` (a real image of the
  subjects: ``strategy: disrupt`` then disrupts it instead of a generated winner).
- ``dreambench``: DreamBench's ``prompts_and_classes.txt``: every subject folder found under ``data_root`` ×
  the 25 object or live-subject prompts, ``{unique_token} {class}`` filled in; references = the subject's images.

Relative paths resolve against ``data_root`` (default: the prompt file's folder). Entries whose images are
missing are skipped, listed in :attr:`PromptSet.skipped` with the reason and logged (or raise with
``missing="error"``): never dropped silently.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from focusdpo.config.pairs import LAYOUTS, MISSING_POLICIES
from focusdpo.data.checks import check_json_object, check_known_keys, check_text, check_text_list
from focusdpo.errors import PromptSetError

logger = logging.getLogger(__name__)


UNO_PREFIX = "dreambooth/dataset/"

DREAMBENCH_CLASSES_FILE = "prompts_and_classes.txt"

LIVE_CLASSES = ("cat", "dog")  # DreamBench's live subjects get the live-subject prompt list

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

JSONL_KEYS = ("prompt", "references", "reference_masks", "classes", "id", "target")


@dataclass(frozen=True)
class PromptItem:
    """One prompt with its reference subjects (absolute paths; K = ``len(references)`` may be 0)."""

    item_id: str  # stable across runs: ``<file stem>-<entry index>`` (resume and sharding key on it)
    prompt: str
    references: tuple[str, ...] = ()
    reference_masks: tuple[str, ...] = ()  # empty, or one mask per reference
    classes: tuple[str, ...] = ()  # empty, or one class name per reference ("dog", "can")
    subjects: tuple[str, ...] = ()  # empty, or one subject name per reference ("dog6", "can")
    target: str = ""  # optional real image of the subjects: the winner that instance disruption starts from


@dataclass
class PromptSet:
    """Items of one prompt file, plus the entries that were skipped and why."""

    items: list[PromptItem]
    layout: str
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item_id, reason)

    def __len__(self) -> int:
        return len(self.items)


def load_prompt_set(path: str | Path, layout: str = "auto", data_root: str | Path | None = None,
                    missing: str = "skip", unique_token: str = "") -> PromptSet:
    """Read ``path`` in ``layout`` into a :class:`PromptSet`; see the module docstring for the layouts.

    ``missing``: ``skip`` (list and count entries with absent images) or ``error`` (raise on the first).
    ``unique_token``: the DreamBooth identifier put before the class in ``dreambench`` prompts.
    """
    path = Path(path)
    if layout not in LAYOUTS:
        raise PromptSetError(f"prompt layout {layout!r} is not known; choose one of: {', '.join(LAYOUTS)}")
    if missing not in MISSING_POLICIES:
        raise PromptSetError(f"missing={missing!r} is not valid; choose one of: {', '.join(MISSING_POLICIES)}")
    if not path.is_file():
        raise PromptSetError(f"prompt file {str(path)!r} does not exist")
    try:
        path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptSetError(f"prompt file {path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as "
                             "UTF-8") from None
    root = Path(data_root) if data_root else path.parent
    layout = detect_layout(path) if layout == "auto" else layout
    if layout == "dreambench":
        raws = dreambench_entries(path, root, unique_token)
    else:
        raws = {"uno": uno_entries, "xverse": xverse_entries, "jsonl": jsonl_entries}[layout](path, root)
    prompt_set = PromptSet([], layout, str(path))
    for index, raw in enumerate(raws):
        item_id = raw.pop("item_id", None) or f"{path.stem}-{index:05d}"
        target = [raw["target"]] if raw.get("target") else []
        files = (*raw.get("references", ()), *raw.get("reference_masks", ()), *target)
        absent = [p for p in files if not Path(p).is_file()]
        if absent:
            reason = f"image(s) not found: {absent}"
            if missing == "error":
                raise PromptSetError(f"{path} entry {index} ({item_id}): {reason}; fix data_root or the paths, "
                                     "or set missing: skip")
            prompt_set.skipped.append((item_id, reason))
            continue
        prompt_set.items.append(PromptItem(item_id=item_id, **{k: tuple(v) if isinstance(v, list) else v
                                                               for k, v in raw.items()}))
    if prompt_set.skipped:
        logger.warning("%s: skipped %d of %d entries with missing images (first: %s)", path,
                       len(prompt_set.skipped), len(raws), prompt_set.skipped[0])
    return prompt_set


def detect_layout(path: Path) -> str:
    if path.suffix == ".txt":
        return "dreambench"
    if path.suffix == ".jsonl":
        return "jsonl"
    entries = json_entries(path)
    first = entries[0] if entries else {}
    if isinstance(first, dict) and "image_paths" in first:
        return "uno"
    if isinstance(first, dict) and "modulation" in first:
        return "xverse"
    raise PromptSetError(f"cannot tell the layout of {path}: expected UNO entries with 'image_paths', XVerseBench "
                         "entries with 'modulation', a .jsonl file or DreamBench's prompts_and_classes.txt; set "
                         f"the layout to one of: {', '.join(LAYOUTS[1:])}")


def json_entries(path: Path) -> list:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PromptSetError(f"{path} is not valid JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("entries"), list):
        return data["entries"]
    if not isinstance(data, list):
        raise PromptSetError(f"{path} must hold a list of entries or {{\"entries\": [...]}}")
    return data


def resolve(root: Path, relative: str, strip: str = "") -> str:
    """``relative`` (``./`` and ``strip`` removed) under ``root``; absolute paths stay as they are."""
    rel = relative.removeprefix("./")
    return str(root / (rel.removeprefix(strip) if strip else rel))


def require(entry, key: str, path: Path, index: int):
    if not isinstance(entry, dict) or key not in entry:
        raise PromptSetError(f"{path} entry {index} lacks {key!r}: {str(entry)[:120]}")
    return entry[key]


def uno_entries(path: Path, root: Path) -> list[dict]:
    classes = dreambench_classes(root / DREAMBENCH_CLASSES_FILE)
    out = []
    for index, entry in enumerate(json_entries(path)):
        paths = require(entry, "image_paths", path, index)
        subjects = [Path(p).parent.name for p in paths]
        out.append({"prompt": require(entry, "prompt", path, index),
                    "references": [resolve(root, p, UNO_PREFIX) for p in paths], "subjects": subjects,
                    "classes": [classes[s] for s in subjects] if all(s in classes for s in subjects) else []})
    return out


def xverse_entries(path: Path, root: Path) -> list[dict]:
    out = []
    for index, entry in enumerate(json_entries(path)):
        modulation = require(entry, "modulation", path, index)
        if not modulation or "src_inputs" not in modulation[0]:
            raise PromptSetError(f"{path} entry {index}: modulation[0].src_inputs is missing")
        inputs = modulation[0]["src_inputs"]
        captions = [str(i.get("caption", "")) for i in inputs]
        out.append({"prompt": require(entry, "prompt", path, index),
                    "references": [resolve(root, require(i, "image_path", path, index)) for i in inputs],
                    "classes": [re.sub(r"^(a|an|the)\s+", "", c.strip(), flags=re.I) for c in captions],
                    "item_id": f"{path.stem}-{int(entry.get('index', index)):05d}"})
    return out


def jsonl_entries(path: Path, root: Path) -> list[dict]:
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptSetError(f"{path} line {number} is not JSON: {e}") from None
        check_prompt_entry(entry, f"{path} line {number}")
        refs = [resolve(root, p) for p in entry.get("references", [])]
        masks = [resolve(root, p) for p in entry.get("reference_masks", [])]
        classes = list(entry.get("classes", []))
        for name, values in (("reference_masks", masks), ("classes", classes)):
            if values and len(values) != len(refs):
                raise PromptSetError(f"{path} line {number}: {len(values)} {name} for {len(refs)} references")
        out.append({"prompt": require(entry, "prompt", path, number), "references": refs,
                    "reference_masks": masks, "classes": classes,
                    **({"item_id": str(entry["id"])} if "id" in entry else {}),
                    **({"target": resolve(root, entry["target"])} if entry.get("target") else {})})
    return out


def check_prompt_entry(entry, where: str) -> None:
    """One jsonl entry is an object of known keys and types, checked before its paths are resolved (a lone string
    of references would be walked character by character into paths that do not exist)."""
    check_json_object(entry, where, '{"prompt": ..., "references": [...]}', PromptSetError)
    check_known_keys(entry, JSONL_KEYS, where, PromptSetError, "An entry's", {"pair_id": "id"})
    if "prompt" not in entry:
        raise PromptSetError(f"{where} lacks 'prompt': every entry needs its prompt")
    check_text(entry, "prompt", where, PromptSetError)
    for key in ("references", "reference_masks"):
        check_text_list(entry, key, where, PromptSetError)
    check_text_list(entry, "classes", where, PromptSetError, "strings")
    if entry.get("target") is not None and not isinstance(entry["target"], str):
        raise PromptSetError(f"{where}: target must be an image path, got {entry['target']!r}")


def dreambench_classes(path: Path) -> dict[str, str]:
    """``subject_name -> class`` from DreamBench's ``prompts_and_classes.txt`` ({} when the file is absent)."""
    if not path.is_file():
        return {}
    pairs = re.findall(r"^([\w-]+),([^,\n]+)$", path.read_text(), flags=re.M)
    return {name: cls.strip() for name, cls in pairs if name != "subject_name"}


def dreambench_prompts(path: Path) -> dict[str, list[str]]:
    """The ``object`` and ``live`` prompt templates (``{0}`` = unique token, ``{1}`` = class)."""
    text = path.read_text()
    if "Live Subject Prompts" not in text:
        raise PromptSetError(f"{path} is not DreamBench's prompts_and_classes.txt (no 'Live Subject Prompts')")
    objects, live = text.split("Live Subject Prompts", 1)
    pattern = r"'([^']*\{0\}[^']*)'\.format"
    return {"object": re.findall(pattern, objects), "live": re.findall(pattern, live)}


def dreambench_entries(path: Path, root: Path, unique_token: str) -> list[dict]:
    classes, templates = dreambench_classes(path), dreambench_prompts(path)
    out = []
    for subject, cls in classes.items():
        folder = root / subject
        if not folder.is_dir():
            continue  # the subset holds only some subjects; absent ones are not entries
        images = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        kind = "live" if cls in LIVE_CLASSES else "object"
        for number, template in enumerate(templates[kind]):
            prompt = " ".join(template.format(unique_token, cls).split())
            out.append({"prompt": prompt, "references": images, "classes": [cls] * len(images),
                        "subjects": [subject] * len(images), "item_id": f"dreambench-{subject}-{number:02d}"})
    if not out:
        raise PromptSetError(f"no DreamBench subject folder of {path} exists under data_root={str(root)!r}")
    return out

"""The package's layers, checked on its source: imports point only down, no cycle, ``import focusdpo`` stays light.

Layer of each unit (a subpackage or a top-level module), lowest first. A unit may import units of its own layer or
below; ``models.families`` is plain data on layer 0, so that the config can validate families without torch.
"""

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "focusdpo"
LAYERS = [
    {"errors", "config", "models.families"},
    {"data", "features", "losses", "atomic", "images", "provenance", "visualize", "processes"},
    {"models", "focus"},
    {"caches", "mosaic", "evaluation", "export"},
    {"training", "pairs", "planning"},
    {"commands", "__main__", "train"},
]
# torch and the standard library only (besides the errors, the torch-free config and each other)
PURE = ("losses", "focus.maps", "features.correspondence", "evaluation.metrics")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def unit(module: str) -> str:
    return "models.families" if module.startswith("models.families") else module.split(".")[0]


def layer(name: str) -> int:
    return next(i for i, units in enumerate(LAYERS) if name in units)


def internal_imports():
    """(importer module, imported module) for every import of focusdpo inside focusdpo, function-level included."""
    for path in PACKAGE.rglob("*.py"):
        importer = module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{path}: use absolute imports (from focusdpo.x import ...)")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("focusdpo."):
                yield importer, node.module.removeprefix("focusdpo.")
            elif isinstance(node, ast.Import):
                yield from ((importer, a.name.removeprefix("focusdpo.")) for a in node.names
                            if a.name.startswith("focusdpo."))


def test_every_unit_has_a_layer():
    units = {unit(module_name(p)) for p in PACKAGE.rglob("*.py")} - {""}
    assert units <= set().union(*LAYERS), units - set().union(*LAYERS)


def test_imports_point_only_down():
    upward = [(a, b) for a, b in internal_imports() if unit(a) and layer(unit(b)) > layer(unit(a))]
    assert not upward


def test_nothing_imports_the_command_line():
    assert not [(a, b) for a, b in internal_imports() if unit(b) == "commands" and unit(a) not in LAYERS[-1]]


def test_the_units_import_each_other_without_cycles():
    graph = defaultdict(set)
    for a, b in internal_imports():
        if unit(a) and unit(a) != unit(b):
            graph[unit(a)].add(unit(b))

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start])

    assert not [u for u in list(graph) if reaches(u, u)]


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_only_torch_and_the_standard_library(module):
    tree = ast.parse((PACKAGE / (module.replace(".", "/") + ".py")).read_text())
    roots = {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    roots |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert roots <= {"torch", "math", "__future__", "typing", "dataclasses", "focusdpo"} | set(sys.stdlib_module_names)
    internal = {n.module.removeprefix("focusdpo.") for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("focusdpo.")}
    assert {m for m in internal if m not in PURE and unit(m) not in ("errors", "config")} == set()


def test_only_training_knows_the_trainer_and_only_models_call_private_pipeline_helpers():
    for path in PACKAGE.rglob("*.py"):
        text, name = path.read_text(), unit(module_name(path))
        if "from transformers import" in text and "Trainer" in text.split("from transformers import")[1].split("\n")[0]:
            assert name == "training", path
        if ".pipeline._" in text or "pipe._" in text:
            assert name in ("models", "models.families"), path


def test_import_focusdpo_loads_no_model_stack():
    code = "import sys, focusdpo; print(sorted(m for m in ('torch', 'transformers', 'timm', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

"""Architecture rules as tests (docs/architecture.md): layers without cycles, single-device models, deepspeed in one
place, argv in the CLI only, data_tools apart from training code, no import side effects."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mm_ptft"
LAYERS_WITH_MODULES = ("models", "losses", "tasks", "export")  # where nn.Module subclasses may be defined


def _modules(path: Path) -> list[str]:
    """Every module an import in ``path`` names (function-level imports included), relative imports resolved."""
    package = list(path.relative_to(ROOT).parts[:-1])  # a module's package, and an __init__'s own
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.append(module)
            names += [f"{module}.{a.name}" for a in node.names]  # `from pkg import sub` imports pkg.sub
    return names


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "mm_ptft" and len(parts) > 1 else None


def import_graph() -> dict[str, set[str]]:
    """First-level subpackage / module of mm_ptft → the others it imports (lazily or not)."""
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        node = rel.parts[0].removesuffix(".py")
        for module in _modules(path):
            target = _layer(module)
            if target and target != node and ((PKG / target).is_dir() or (PKG / f"{target}.py").is_file()):
                graph.setdefault(node, set()).add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w) :] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert {"tasks", "eval", "train", "models"} <= set(graph)  # the graph sees the package
    cycle = _cycle(graph)
    assert cycle is None, f"import cycle between mm_ptft subpackages: {' → '.join(cycle)}"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_lower_layers_import_only_the_base():
    """models, losses and data stand on config and registry alone; distributed on config; the base on nothing."""
    graph = import_graph()
    allowed = {"models": {"config", "registry"}, "losses": {"config", "registry"}, "data": {"config", "registry"}}
    allowed |= {"distributed": {"config"}, "config": set(), "registry": set()}
    for lower, ok in allowed.items():
        bad = graph.get(lower, set()) - ok
        assert not bad, f"mm_ptft.{lower} imports {sorted(bad)}: a lower layer depends on an upper one"


def test_data_tools_and_mm_ptft_stay_apart():
    """data_tools may use mm_ptft's data layer (shard and COCO reading) and, to score samples with a trained model
    (``data_tools score``), its models and task loading — never training code (train, distributed, eval, export);
    mm_ptft runs data_tools only from its CLI (``mm-ptft data``)."""
    allowed = ("mm_ptft.data", "mm_ptft.config", "mm_ptft.models", "mm_ptft.tasks")
    for path in (ROOT / "data_tools").rglob("*.py"):
        for module in _modules(path):
            if module.startswith("mm_ptft"):
                assert module.startswith(allowed), f"{path.name} imports {module}"
    for path in PKG.rglob("*.py"):
        if any(m == "data_tools" or m.startswith("data_tools.") for m in _modules(path)):
            assert path.relative_to(PKG).parts[0] == "cli", f"{path.relative_to(PKG)} imports data_tools"


def test_argparse_only_in_the_cli():
    for path in PKG.rglob("*.py"):
        if path.relative_to(PKG).parts[0] == "cli":
            continue
        assert "argparse" not in _modules(path), f"{path.relative_to(PKG)} imports argparse: argv belongs to the CLI"


def _defines_module(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            bases = [ast.unparse(b).split(".")[-1] for b in node.bases]
            if any(b.endswith(("Module", "Task", "Sequential", "ModuleList", "ModuleDict")) for b in bases):
                names.append(node.name)
    return names


def test_nn_modules_live_in_their_layers():
    for path in PKG.rglob("*.py"):
        layer = path.relative_to(PKG).parts[0]
        defined = _defines_module(path)
        assert not defined or layer in LAYERS_WITH_MODULES, f"{path.relative_to(PKG)} defines nn.Module {defined}"


def test_models_and_tasks_are_single_device():
    for folder in ("models", "tasks"):
        for path in (PKG / folder).rglob("*.py"):
            bad = {m for m in _modules(path) if m.startswith(("deepspeed", "torch.distributed"))}
            assert not bad, f"{path.relative_to(PKG)} imports {bad}: model code stays single-device"


def test_only_distributed_imports_deepspeed():
    for path in PKG.rglob("*.py"):
        if "distributed" in path.relative_to(PKG).parts:
            continue
        bad = {m for m in _modules(path) if m.split(".")[0] == "deepspeed"}
        assert not bad, f"{path.relative_to(PKG)} imports {bad}: only mm_ptft/distributed/ may import deepspeed"


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["task=classification", "finetune.head_init=random", "finetune.num_classes=3"],
        ["task=text-classification", "finetune.num_classes=3"],
        [
            "task=classification",
            "finetune.head_init=random",
            "finetune.num_classes=3",
            "model.image.name=resnet18",
            "model.image.kwargs={}",
        ],
        [
            "task=detection",
            "detection.num_classes=3",
            "deepspeed.precision=fp32",
            "model.image.name=resnet18",
            "model.image.kwargs={}",
        ],
    ],  # fmt: skip
    ids=["contrastive", "classification", "text-classification", "classification-cnn", "detection"],
)
def test_every_module_a_task_builds_is_single_device_model_code(overrides):
    """What the single-device rule covers (mm_ptft/models) is every nn.Module class a task's model is made of; the
    rest comes from the libraries it builds on."""
    from mm_ptft.tasks import create_task

    task = create_task(tiny_cfg(*overrides))
    allowed = ("mm_ptft.models.", "timm.", "transformers.", "torchvision.", "torch.nn.")
    for name, module in task.model.named_modules():
        owner = type(module).__module__
        assert owner.startswith(allowed), f"{name or 'model'} is a {owner}.{type(module).__name__}"
    assert isinstance(task.model, torch.nn.Module)


def test_import_has_no_side_effects():
    code = (
        # third-party imports may set variables of their own (torchvision sets TORCHINDUCTOR_CACHE_DIR): import them
        # first, so the comparison is about what mm_ptft's own modules do
        "import sys, os, torch, timm, transformers, webdataset; before = dict(os.environ)\n"
        "import mm_ptft, mm_ptft.config, mm_ptft.models, mm_ptft.losses, mm_ptft.data, mm_ptft.cli, mm_ptft.tasks\n"
        "import mm_ptft.eval, mm_ptft.export\n"
        "heavy = [m for m in ('deepspeed', 'matplotlib', 'onnx', 'pycocotools') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert dict(os.environ) == before, 'importing mm_ptft changed the environment'\n"
        "import torch.distributed as dist; assert not dist.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

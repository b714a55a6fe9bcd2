"""Architecture rules as tests (../shared/ARCHITECTURE.md)."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mm_ptft"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_models_are_single_device():
    for path in (PKG / "models").rglob("*.py"):
        bad = {m for m in _imports(path) if m.startswith(("deepspeed", "torch.distributed"))}
        assert not bad, f"{path.relative_to(PKG)} imports {bad}: model code stays single-device"


def test_only_distributed_imports_deepspeed():
    for path in PKG.rglob("*.py"):
        if "distributed" in path.relative_to(PKG).parts:
            continue
        bad = {m for m in _imports(path) if m.split(".")[0] == "deepspeed"}
        assert not bad, f"{path.relative_to(PKG)} imports {bad}: only mm_ptft/distributed/ may import deepspeed"


def test_import_has_no_side_effects():
    code = (
        # third-party imports may set variables of their own (torchvision sets TORCHINDUCTOR_CACHE_DIR): import them
        # first, so the comparison is about what mm_ptft's own modules do
        "import sys, os, torch, timm, transformers, webdataset; before = dict(os.environ)\n"
        "import mm_ptft, mm_ptft.config, mm_ptft.models, mm_ptft.losses, mm_ptft.data, mm_ptft.cli\n"
        "heavy = [m for m in ('deepspeed', 'matplotlib', 'onnx', 'pycocotools') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert dict(os.environ) == before, 'importing mm_ptft changed the environment'\n"
        "import torch.distributed as dist; assert not dist.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

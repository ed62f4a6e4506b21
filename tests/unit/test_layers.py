"""The import graph of the runtime packages: each module imports only from its own layer or the
layers below it, so the wire contract stands alone, the building blocks know nothing of the
processes built from them, and the CLI sits on top."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Lowest first. A module may import from its own package, any package of a lower layer and, in
# the building-block layer only, from the other packages of its layer.
LAYERS: list[list[str]] = [
    ["topics", "streams"],  # `streams` alone: its empty __init__
    ["streams.settings", "streams.lifecycle"],
    ["streams.kafka", "streams.storage", "streams.serving", "streams.registry", "streams.gate", "streams.telemetry"],
    ["streams.client"],
    ["streams.worker", "streams.bridge"],
    ["streams.ops", "agents"],
    ["streams.cli"],
]
PEERS_ALLOWED = {2}
RUNTIME = ("streams", "agents", "topics")
DEV_ONLY = ("models", "infra", "bench", "tests")


def package_of(module: str) -> tuple[int, str]:
    for rank, packages in enumerate(LAYERS):
        for package in packages:
            if module == package or (module.startswith(package + ".") and package != "streams"):
                return rank, package
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every absolute module the file imports, at any depth (lazy imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from package import module`
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def runtime_files(root: Path) -> list[Path]:
    return sorted(p for top in RUNTIME for p in (root / top).rglob("*.py"))


def own(module: str) -> bool:
    return module.split(".")[0] in RUNTIME


def existing(module: str, root: Path) -> bool:
    """`from package import name` names a module only where that module exists."""
    path = root / Path(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for path in runtime_files(root):
        source = module_name(path, root)
        rank, package = package_of(source)
        for target in sorted(imports(path)):
            top = target.split(".")[0]
            if top in DEV_ONLY and existing(target, root):
                found.append(f"{source} imports dev tooling {target}")
                continue
            if not own(target) or not existing(target, root):
                continue
            target_rank, target_package = package_of(target)
            if target_package == package or target_rank < rank:
                continue
            if target_rank == rank and rank in PEERS_ALLOWED:
                continue
            found.append(f"{source} (layer {rank}) imports {target} (layer {target_rank})")
    return found


def test_no_module_imports_from_a_layer_above_its_own():
    assert violations() == []


def test_every_runtime_module_has_a_layer():
    for path in runtime_files(ROOT):
        package_of(module_name(path, ROOT))


def test_the_checker_reports_upward_imports_and_dev_tooling(tmp_path):
    for file, text in {
        "streams/worker/pipeline.py": "class Pipeline: ...\n",
        "streams/serving/leak.py": "def f():\n    from streams.worker import pipeline\n",
        "streams/bridge/app.py": "from streams.worker.pipeline import Pipeline\n",
        "topics/events.py": "import models.build\n",
        "streams/gate/auth.py": "from streams.storage import cache\n",  # a peer, allowed
        "streams/storage/cache.py": "",
        "models/build.py": "",
    }.items():
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).write_text(text)
    assert violations(tmp_path) == [
        "streams.bridge.app (layer 4) imports streams.worker.pipeline (layer 4)",
        "streams.serving.leak (layer 2) imports streams.worker.pipeline (layer 4)",
        "topics.events imports dev tooling models.build",
    ]

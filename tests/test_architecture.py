"""The package's shape, checked: imports run one way through the layers, there are no import cycles, no
imports of our own modules hide inside functions, and the old module paths still import (deprecated).

The import graph is read from the source with ``ast`` (nothing is imported to build it). An import of
``a.b.c`` also counts as an import of the package ``a.b``, whose ``__init__`` runs first; imports under
``if TYPE_CHECKING:`` are annotations only and do not count.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_peft"

#: Bottom to top: a module may import from its own folder or a folder below it (README "Architecture").
LAYERS = ["core", "quantization", "methods", "operations", "formats", "integration", "recipes"]


def module_files() -> dict[str, Path]:
    files = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return files


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """(module -> modules it imports, [(module, imported, line) for imports inside functions])."""
    files = module_files()

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {name: set() for name in files}
    inside_functions = []
    for name, file in files.items():
        tree = ast.parse(file.read_text(), str(file))
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(node)}
        in_function = {id(n) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module for a in node.names]
            else:
                continue
            for target in targets:
                resolved = resolve(target) if target.split(".")[0] == "lightning_peft" else None
                if resolved is None or resolved == name:
                    continue
                edges[name].add(resolved)
                parts = resolved.split(".")
                for k in range(2, len(parts)):  # the packages whose __init__ runs first (the root one already runs)
                    parent = ".".join(parts[:k])
                    if parent in files and not name.startswith(parent + ".") and parent != name:
                        edges[name].add(parent)
                if id(node) in in_function:
                    inside_functions.append((name, resolved, node.lineno))
    return edges, inside_functions


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return found


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] not in LAYERS:
        return len(LAYERS)  # the public package and its legacy-path finder: the top
    return LAYERS.index(parts[1])


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_there_are_no_import_cycles():
    edges, _ = import_graph()
    assert len(edges) > 60  # the walk saw the package
    assert cycles(edges) == []


def test_imports_run_down_the_layers():
    edges, _ = import_graph()
    upward = [f"{src} -> {dst}" for src, targets in edges.items() for dst in targets if layer(dst) > layer(src)]
    assert upward == [], f"imports that run up the layers {LAYERS} (bottom first): {upward}"


def test_no_import_of_our_own_modules_hides_inside_a_function():
    # Lazy imports of optional native libraries (bitsandbytes, deepspeed) are allowed: they are not ours.
    _, inside = import_graph()
    assert inside == [], inside


def test_every_folder_is_a_layer():
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert folders == sorted(LAYERS)


LEGACY = {
    "lightning_peft.tasks": ("CausalLMTask", "lightning_peft.recipes.tasks"),
    "lightning_peft.data": ("TextFileDataModule", "lightning_peft.recipes.data"),
    "lightning_peft.callback": ("PEFTCallback", "lightning_peft.integration.callback"),
    "lightning_peft.export.peft_format": ("save_adapter", "lightning_peft.formats.peft_format"),
    "lightning_peft.export.merged": ("save_merged", "lightning_peft.formats.merged"),
    "lightning_peft.merge": ("merge_adapters", "lightning_peft.operations.merging"),
    "lightning_peft.optim": ("ParamGroups", "lightning_peft.operations.param_groups"),
    "lightning_peft.resumable_sampler": ("ResumableDataLoader", "lightning_peft.integration.resumable_sampler"),
}


@pytest.mark.parametrize("old", sorted(LEGACY))
def test_old_module_paths_import_the_same_objects_with_a_deprecation_warning(old):
    name, new = LEGACY[old]
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to {new}"):
        legacy = importlib.import_module(old)
    assert getattr(legacy, name) is getattr(importlib.import_module(new), name)


def test_the_old_yaml_class_paths_and_python_m_still_work(tmp_path):
    from jsonargparse import ArgumentParser

    from lightning_peft.recipes.tasks import CausalLMTask

    parser = ArgumentParser()
    parser.add_argument("--model", type=CausalLMTask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        config = parser.parse_object({"model": {"class_path": "lightning_peft.tasks.CausalLMTask", "init_args": {"model_name_or_path": "x"}}})
    assert isinstance(parser.instantiate_classes(config).model, CausalLMTask)
    done = subprocess.run([sys.executable, "-m", "lightning_peft.cli", "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0 and "fit" in done.stdout, done.stderr[-2000:]


def old_class_paths(text: str) -> str:
    """A config as it was written before the move: every new module path replaced by the old one."""
    from lightning_peft._legacy_paths import MOVED

    for old, new in sorted(MOVED.items(), key=lambda item: -len(item[1])):
        text = text.replace(new + ".", old + ".")
    return text


CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_written_with_the_old_paths_builds_the_same_run(config, tmp_path):
    """Configs users wrote before the move (``lightning_peft.tasks.CausalLMTask``) still build, to the same classes
    and arguments as the shipped config (tests/test_cli.py runs the shipped ones end to end)."""
    from lightning_peft.recipes.cli import PEFTLightningCLI

    text = config.read_text()
    legacy = old_class_paths(text)
    assert legacy != text and "lightning_peft.recipes." not in legacy  # the rewrite did something
    old_file = tmp_path / config.name
    old_file.write_text(legacy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shipped = PEFTLightningCLI(args=["--config", str(config)], run=False)
        before_move = PEFTLightningCLI(args=["--config", str(old_file)], run=False)
    assert type(before_move.model) is type(shipped.model) and type(before_move.datamodule) is type(shipped.datamodule)
    # hparams record the class path as written (the old one loads again through the same finder); the rest is equal
    def arguments(hparams):
        return {k: v for k, v in dict(hparams).items() if k != "_class_path"}

    assert arguments(before_move.model.hparams) == arguments(shipped.model.hparams)
    assert arguments(before_move.datamodule.hparams) == arguments(shipped.datamodule.hparams)
    from lightning_peft import PEFTCallback

    def methods(cli):
        return [cb.method for cb in cli.trainer.callbacks if isinstance(cb, PEFTCallback)]

    assert methods(before_move) == methods(shipped)

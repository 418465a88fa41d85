"""Module paths from before the package was split into layers (0.1.0 and earlier), kept importable.

``import lightning_peft.tasks``, a YAML ``class_path: lightning_peft.data.TextFileDataModule``, ``python -m
lightning_peft.cli`` and ``from lightning_peft.export.peft_format import save_adapter`` keep working: a finder on
``sys.meta_path`` answers each old name with the module
that now holds that code (the same module object, so classes and functions are identical) and warns once with a
``DeprecationWarning`` naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

#: old module (or package prefix) -> the module (or package) that holds it now
MOVED = {
    "lightning_peft.callback": "lightning_peft.integration.callback",
    "lightning_peft.mixin": "lightning_peft.integration.mixin",
    "lightning_peft.checkpointing": "lightning_peft.integration.checkpoints",
    "lightning_peft.distributed": "lightning_peft.integration.distributed",
    "lightning_peft.strategy_checks": "lightning_peft.integration.strategies",
    "lightning_peft.fsdp_wrapping": "lightning_peft.integration.fsdp_wrapping",
    "lightning_peft.data_init": "lightning_peft.integration.data_driven_init",
    "lightning_peft.rng_state": "lightning_peft.integration.rng_state",
    "lightning_peft.resumable_sampler": "lightning_peft.integration.resumable_sampler",
    "lightning_peft.tasks": "lightning_peft.recipes.tasks",
    "lightning_peft.data": "lightning_peft.recipes.data",
    "lightning_peft.assets": "lightning_peft.recipes.assets",
    "lightning_peft.cli": "lightning_peft.recipes.cli",
    "lightning_peft.cli_errors": "lightning_peft.recipes.cli_errors",
    "lightning_peft.progress_bar": "lightning_peft.recipes.progress_bar",
    "lightning_peft.merge": "lightning_peft.operations.merging",
    "lightning_peft.optim": "lightning_peft.operations.param_groups",
    "lightning_peft.export": "lightning_peft.formats",
    "lightning_peft.methods.registry": "lightning_peft.methods.base",
}


def new_name(old: str) -> str | None:
    """The module that now holds ``old`` (``lightning_peft.export.merged`` -> ``lightning_peft.formats.merged``)."""
    for prefix, target in MOVED.items():
        if old == prefix or old.startswith(prefix + "."):
            return target + old[len(prefix) :]
    return None


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(f"{spec.name} moved to {self.target}; import it from there", DeprecationWarning, stacklevel=2)
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        pass  # the real module ran when it was imported under its own name

    def get_code(self, fullname: str):  # noqa: ANN201 - what runpy asks for: `python -m lightning_peft.cli`
        spec = importlib.util.find_spec(self.target)
        return spec.loader.get_code(self.target)  # type: ignore[union-attr]


class LegacyPathFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001, ANN201 - the finder protocol
        moved = new_name(fullname)
        if moved is None:
            return None
        real = importlib.util.find_spec(moved)
        # The real file as origin: `python -m` sets sys.argv[0] from it.
        return importlib.machinery.ModuleSpec(fullname, _Alias(moved), origin=real.origin if real else None, is_package=moved == "lightning_peft.formats")


def install() -> None:
    if not any(isinstance(finder, LegacyPathFinder) for finder in sys.meta_path):
        # First: under an aliased package (lightning_peft.export is lightning_peft.formats) the path finder would
        # otherwise load lightning_peft.export.merged a second time, as a separate module, from formats/merged.py.
        # Only names that no longer exist are answered, so no real module is shadowed.
        sys.meta_path.insert(0, LegacyPathFinder())

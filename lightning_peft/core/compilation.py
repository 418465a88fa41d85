"""Regional compilation: ``torch.compile`` each transformer block in place, not the whole model.

A decoder's blocks are copies of one module class, so compiling them one by one costs one compilation (torch
reuses the graph for every block of the same code, their weights being inputs: ``inline_inbuilt_nn_modules``)
where compiling the whole model traces all of them, and the parts around the blocks (embedding, output head,
the loss, the virtual-token hooks, Python-side batch handling) stay eager, so they never break or re-trigger a
graph. ``nn.Module.compile`` compiles the module's call in place: parameter names, state dicts, adapter-only
checkpoints and hooks are untouched (``torch.compile(module)`` would wrap it in an ``OptimizedModule`` and prefix
every key with ``_orig_mod.``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_peft.core.blocks import transformer_blocks


def compile_blocks(model: nn.Module, **options: Any) -> list[str]:
    """Compile every transformer block of ``model`` in place (``block.compile(**options)``); their names."""
    names = transformer_blocks(model)
    if not names:
        raise ValueError(f"compile=True found no transformer blocks (a ModuleList of one layer class) in {type(model).__name__} to compile")
    for name in names:
        model.get_submodule(name).compile(**options)
    return names

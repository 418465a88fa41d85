"""Merging adapters into the base weights, and switching them off.

Merging folds ``delta_weight`` into each base weight, so inference costs what the base model costs.
With ``unload=True`` (the default) the wrappers are removed as well and the model's state dict has
exactly the base model's keys: ready for ``save_pretrained``. With ``unload=False`` the wrappers stay,
merged, and :func:`unmerge_adapters` restores the separate adapters (e.g. to keep training).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lightning_peft.core.adapter_layer import BASE_LAYER, adapter_layers
from lightning_peft.core.injection import remove_adapters


def merge_adapters(model: nn.Module, unload: bool = True) -> nn.Module:
    """Merge every adapter into its base weight; with ``unload`` also drop the wrappers. Returns ``model``."""
    layers = list(adapter_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapters to merge")
    cannot = [name for name, layer in layers if not layer.can_merge]
    if cannot:
        raise ValueError(f"adapters at {cannot[:3]} cannot be merged into their base weights")
    for _, layer in layers:
        layer.merge()
    return remove_adapters(model) if unload else model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapters` with ``unload=False``."""
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: ``with disable_adapters(model): base_logits = model(x).logits``.

    Merged adapters are unmerged for the duration and merged back afterwards, so the result is the
    base model in either state (what "LoRA Learns Less and Forgets Less" compares against).
    """
    layers = [layer for _, layer in adapter_layers(model)]
    was_merged = [layer.merged for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, merged in zip(layers, was_merged):
            layer.disabled = False
            if merged:
                layer.merge()


@torch.no_grad()
def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter's delta added, without modifying ``model``.

    Keys are exactly the base model's (``.base_layer`` dropped, adapter tensors left out). Only the
    adapted weights are new tensors; the rest are the model's own, so this costs one copy of the
    targeted matrices, not of the model. ``dtype`` casts floating tensors (e.g. to bf16 for export).
    """
    layers = dict(adapter_layers(model))
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        owner = next((layer_name for layer_name in layers if name.startswith(layer_name + ".")), None)
        if owner is not None:
            rest = name[len(owner) + 1 :]
            if not rest.startswith(BASE_LAYER + "."):
                continue  # an adapter tensor: folded into the weight below
            layer = layers[owner]
            if rest == f"{BASE_LAYER}.weight" and not layer.merged and not layer.disabled:
                tensor = (tensor.float() + layer.delta_weight().to(tensor.device)).to(tensor.dtype)
            name = f"{owner}.{rest[len(BASE_LAYER) + 1:]}"
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor
    return state

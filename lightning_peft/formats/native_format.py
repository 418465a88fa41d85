"""lightning_peft's own adapter file format, for methods HF peft does not have (bottleneck adapters,
Compacter, BitFit).

The directory looks like a peft adapter so the same tools (``save_adapter``, ``load_adapter``, the
callback's ``export_dir``) handle both; the contents are ours:

``adapter_config.json``::

    {
      "format": "lightning_peft",          # marks this format; peft refuses the file (no peft_type)
      "format_version": 1,
      "method": {"class_path": "lightning_peft.methods.adapter.Adapter", "init_args": {...}},
      "base_model_name_or_path": "...",    # informational
      "task_type": "SEQ_CLS",              # informational
      "adapted_modules": ["bert.encoder.layer.0.attention.output.dense", ...],
      "modules_to_save": ["classifier"]    # or null
    }

``adapter_model.safetensors``: every adapter tensor under its name in the adapted transformers model
(``bert.encoder.layer.0.output.dense.adapter_down.weight``, ``...query.bias_delta``), each shared
tensor once under the first name it has (Compacter's rule matrices:
``<first adapted module>.adapter_down.rules.matrices``), and the ``modules_to_save`` parameters under
their own names. The metadata holds ``{"format": "pt"}``, the method config and the base fingerprint.

Loading rebuilds the method from ``"method"`` (only :class:`~lightning_peft.PEFTMethod` subclasses),
injects it into the fresh base and requires exactly the expected tensors with the expected shapes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft.core.adapter_layer import adapter_modules
from lightning_peft.core.injection import apply_peft, injected_method, modules_to_save_parameters
from lightning_peft.formats.adapter_dir import AdapterFileError, check_tensors_fit, write_adapter_dir
from lightning_peft.methods.base import PEFTMethod, method_from_dict

FORMAT = "lightning_peft"
FORMAT_VERSION = 1


def is_native_config(config: dict[str, Any]) -> bool:
    return config.get("format") == FORMAT


def native_adapter_tensors(model: nn.Module, method: PEFTMethod) -> dict[str, torch.Tensor]:
    """The adapter state of ``model`` by name: adapter parameters (shared ones once) and persistent
    buffers, then the trained ``modules_to_save`` parameters."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for adapter_name, adapter in adapter_modules(model):
        for name, tensor in [*adapter.adapter_named_parameters(), *adapter.adapter_named_buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                tensors[f"{adapter_name}.{name}"] = tensor
    tensors.update(modules_to_save_parameters(model, method))
    return tensors


def save_native_adapter(model: nn.Module, path: str | os.PathLike, task_type: str | None, metadata: dict[str, str]) -> Path:
    """Write ``model``'s adapters (``injected_method(model)`` has no peft format) to ``path``, atomically."""
    method = injected_method(model).exported()  # a composition's training-only members (LayerDrop) left out
    tensors = native_adapter_tensors(model, method)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method.to_dict(),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "task_type": task_type,
        "adapted_modules": [name for name, _ in adapter_modules(model)],
        "modules_to_save": method.modules_to_save or None,
    }
    return write_adapter_dir(path, tensors, config, metadata)


def load_native_adapter(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Inject the file's method into ``model`` (unless it has it already) and copy the tensors in."""
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterFileError(f"adapter in {source} has format_version {version!r}; this version of lightning_peft reads {FORMAT_VERSION}")
    method = injected_method(model) or method_from_dict(config["method"])
    apply_peft(model, method)
    expected = native_adapter_tensors(model, method)
    check_tensors_fit(expected, tensors, source, model)
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(target.dtype))
    return model


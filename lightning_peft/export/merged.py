"""Merged weights in transformers ``save_pretrained`` format.

The merged model is made from the base weights plus each adapter's delta (:func:`merged_state_dict`);
the training model is not touched, so exporting with every checkpoint never drifts the run (an in-place
merge/unmerge in bf16 would). The result loads with ``AutoModel*.from_pretrained(path)`` and needs no
lightning_peft at all: this is how vLLM or any transformers user serves it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft.core.model_lookup import resolve_model
from lightning_peft.export.atomic import atomic_directory
from lightning_peft.merge import merged_state_dict


def save_merged(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None, tokenizer: Any = None) -> Path:
    """Write ``model`` with its adapters merged to ``path`` (atomic); optionally with its tokenizer."""
    model = resolve_model(model)
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} is not a transformers model; use merged_state_dict() and torch/safetensors instead")
    state = merged_state_dict(model, dtype=dtype)
    with atomic_directory(path) as staging:
        model.save_pretrained(staging, state_dict=state)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(staging)
    return Path(path)

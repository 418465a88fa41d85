"""Merged weights in transformers ``save_pretrained`` format.

The merged model is made from the base weights plus each adapter's delta (:func:`merged_state_dict`);
the training model is not touched, so exporting with every checkpoint never drifts the run (an in-place
merge/unmerge in bf16 would). The result loads with ``AutoModel*.from_pretrained(path)`` and needs no
lightning_peft at all: this is how vLLM or any transformers user serves it.

A k-bit (QLoRA) base holds no full-precision weights, so its merged export is made from the original
checkpoint, re-read tensor by tensor (:mod:`lightning_peft.formats.from_source`), and written in 16 bits.
When that checkpoint is unknown the export is an error, unless ``dequantize=True`` asks for the
dequantized weights instead (an approximation, with a warning).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_peft.core.adapter_layer import base_parameter_name
from lightning_peft.core.model_lookup import resolve_model
from lightning_peft.formats.atomic import atomic_directory
from lightning_peft.formats.from_source import QuantizedExportError, resolve_export_source, save_merged_from_source, write_config
from lightning_peft.operations.merging import merged_bias_plan, merged_state_dict
from lightning_peft.quantization.layers import is_quantized_linear


def save_merged(
    model: nn.Module,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    tokenizer: Any = None,
    source: str | os.PathLike | None = None,
    dequantize: bool = False,
) -> Path:
    """Write ``model`` with its adapters merged to ``path`` (atomic); optionally with its tokenizer.

    For a k-bit base: ``source`` is the safetensors directory of the original weights (default: where
    the model was loaded from, when known); ``dtype`` defaults to 16 bits; ``dequantize=True`` merges
    into the dequantized k-bit weights when no source exists (not the original model: warns).
    """
    model = resolve_model(model)
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} is not a transformers model; use merged_state_dict() and torch/safetensors instead")
    if not any(is_quantized_linear(m) for m in model.modules()):
        state = merged_state_dict(model, dtype=dtype)
        with atomic_directory(path) as staging, _bias_switch_set(model):
            model.save_pretrained(staging, state_dict=state)
            _save_tokenizer(tokenizer, staging)
        return Path(path)

    original = None if dequantize and source is None else resolve_export_source(model, source)
    if original is None and not dequantize:
        raise QuantizedExportError(
            f"{type(model).__name__} has a k-bit base and the checkpoint of its original weights is unknown "
            f"(config._name_or_path={getattr(model.config, '_name_or_path', None)!r} is no local directory). Pass "
            f"source=<directory with the original safetensors>, or dequantize=True to write the dequantized k-bit "
            f"weights plus the adapters (an approximation of the original model)"
        )
    with atomic_directory(path) as staging:
        if original is not None:
            save_merged_from_source(model, original, staging, dtype)
        else:
            rank_zero_warn(
                "save_merged(dequantize=True): writing the dequantized k-bit weights plus the adapters, not the original "
                "weights (NF4 differs from them by ~9% per matrix)"
            )
            _save_state_dict(model, merged_state_dict(model, dtype=dtype or torch.bfloat16, dequantize=True), staging)
            write_config(model, staging, dtype or torch.bfloat16)
        _save_tokenizer(tokenizer, staging)
    return Path(path)


@contextlib.contextmanager
def _bias_switch_set(model: nn.Module) -> Iterator[None]:
    """The config written with the merged weights turns on the bias switch their new biases need (e.g. Llama's
    ``attention_bias``, for an intervention folded into ``o_proj``); the training model's config is restored."""
    attribute = merged_bias_plan(model).attribute
    if attribute is None:
        yield
        return
    previous = getattr(model.config, attribute)
    setattr(model.config, attribute, True)
    try:
        yield
    finally:
        setattr(model.config, attribute, previous)


def _save_tokenizer(tokenizer: Any, directory: Path) -> None:
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory)


def _save_state_dict(model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    """``model.safetensors`` with tied weights stored once (under the first name, as transformers does)."""
    from safetensors.torch import save_file

    every = {base_parameter_name(n) for n, _ in model.named_parameters(remove_duplicate=False)}
    tied = every - {base_parameter_name(n) for n, _ in model.named_parameters()}
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items() if name not in tied}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})

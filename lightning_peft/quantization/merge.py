"""Merging adapters *into* k-bit weights: only on request, and never silently.

A 4-bit matrix cannot absorb ``s * B @ A``: the merge dequantizes the whole matrix, adds the update
and quantizes the sum again, which re-rounds every weight (NF4: about 9% relative error, most of it
on weights the adapter did not change). For a deployable model, export merged 16-bit weights made
from the original checkpoint instead (:func:`lightning_peft.formats.merged.save_merged`). This module
exists for the cases where a k-bit merged model is what is wanted, and it reports what it cost.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_peft.core.adapter_layer import AdapterLayer
from lightning_peft.quantization.config import Quantization
from lightning_peft.quantization.layers import dequantized_weight, quantized_linear


class QuantizedMergeError(ValueError):
    """A merge into k-bit weights was asked for without opting in to requantization."""


def config_of(layer: nn.Module) -> Quantization:
    """The :class:`Quantization` that reproduces ``layer``'s format (a bitsandbytes linear layer)."""
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear8bitLt):
        return Quantization(bits=8, int8_threshold=float(layer.state.threshold))
    weight = layer.weight
    compute = layer.compute_dtype or torch.float32
    return Quantization(
        bits=4,
        quant_type=weight.quant_type,
        double_quant=bool(weight.compress_statistics),
        block_size=int(weight.blocksize),
        compute_dtype=str(compute).removeprefix("torch."),  # type: ignore[arg-type]
        quant_storage=str(weight.quant_storage).removeprefix("torch."),  # type: ignore[arg-type]
    )


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact||_F / ||exact||_F`` in float64."""
    exact = exact.double()
    return float(torch.linalg.norm(approx.double() - exact) / torch.linalg.norm(exact).clamp_min(1e-30))


@torch.no_grad()
def requantize_merge(layer: AdapterLayer) -> float:
    """Merge ``layer``'s adapter into its k-bit base by dequantize + add + requantize.

    Returns the relative error of the stored merged weight against the exact ``W_deq + delta`` (the
    weight the unmerged adapted layer multiplies by).
    """
    base = layer.base_layer
    exact = layer.merged_weight(dequantized_weight(base))
    if not torch.isfinite(exact).all():
        raise ValueError(f"merging {type(layer).__name__} would put non-finite values into the base weight")
    state = getattr(base.weight, "quant_state", None)
    source_dtype = state.dtype if state is not None else torch.float16  # dequantize to what was quantized
    merged = quantized_linear(exact.to(source_dtype), base.bias, config_of(base), base.weight.device)
    merged.train(base.training)
    layer.base_layer = merged
    layer.merged = True
    return relative_error(dequantized_weight(merged), exact)

"""How many bytes the weights of a (partly) quantized model take.

A 4-bit parameter's ``numel() * element_size()`` counts only the packed codes; the block scales, the
double-quantization scales and the code books live in its ``quant_state``. QLoRA's 4.127 bits per
weight (NF4, block 64, double quantization) is codes + scales + scales of scales; we count all of
them, code books included, so the figure can be checked rather than assumed.
"""

from __future__ import annotations

import torch
from torch import nn


def _tensor_bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def quant_state_bytes(state: object) -> int:
    """Bytes of a bitsandbytes ``QuantState``: block scales, code book, and the nested state if any."""
    if state is None:
        return 0
    total = _tensor_bytes(getattr(state, "absmax", None)) + _tensor_bytes(getattr(state, "code", None))
    offset = getattr(state, "offset", None)
    total += _tensor_bytes(offset) if isinstance(offset, torch.Tensor) else 0
    if getattr(state, "nested", False):
        total += quant_state_bytes(getattr(state, "state2", None))
    return total


def parameter_bytes(param: torch.Tensor, module: nn.Module | None = None) -> int:
    """Bytes ``param`` occupies, including the quantization statistics a k-bit weight carries."""
    total = _tensor_bytes(param)
    total += quant_state_bytes(getattr(param, "quant_state", None))  # Params4bit
    scales = getattr(param, "SCB", None)  # Int8Params, before the first forward
    if scales is None and module is not None and getattr(module, "state", None) is not None:
        scales = getattr(module.state, "SCB", None) if getattr(module, "weight", None) is param else None
    return total + _tensor_bytes(scales)


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += parameter_bytes(tensor, module)
    return total


def bits_per_parameter(layer: nn.Module) -> float:
    """Storage bits per weight of one linear layer (weight only, no bias)."""
    weight = layer.weight
    count = weight.quant_state.shape.numel() if getattr(weight, "quant_state", None) is not None else weight.numel()
    return 8.0 * parameter_bytes(weight, layer) / count

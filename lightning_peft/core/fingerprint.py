"""A cheap fingerprint of the frozen base weights.

Adapter files and checkpoints are small because they leave the base out; the price is that nothing
stops a user from loading them onto the wrong base, where they "work" and produce garbage. The
fingerprint records each frozen tensor's shape and the float64 sum of up to 64 evenly strided elements,
which tells different checkpoints of the same architecture apart at a cost of microseconds per tensor.
Sums are compared with a relative tolerance so the same weights in another dtype still match.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lightning_peft.core.adapter_layer import adapter_layers, adapter_modules, base_parameter_name
from lightning_peft.core.sharding import is_sharded, state_dict_name

#: Where the fingerprint taken at injection is kept: once FSDP has sharded the model, a rank holds only
#: slices of the base (see core/sharding.py), and gathering every frozen tensor to fingerprint it at each
#: checkpoint would cost what adapter-only checkpoints save.
FINGERPRINT_ATTRIBUTE = "_lightning_peft_base_fingerprint"
_SAMPLES = 64
_RTOL = 2e-2  # bf16 rounding of 64 summed elements stays well inside this


class BaseModelMismatchError(ValueError):
    """The adapters were trained on a different base model than the one they are being loaded into."""


def _logical_shape(tensor: torch.Tensor) -> list[int]:
    """The shape the weight has unquantized: a bitsandbytes 4-bit weight is stored packed, (n/2, 1)."""
    quant_state = getattr(tensor, "quant_state", None)
    return list(quant_state.shape) if quant_state is not None else list(tensor.shape)


def _sample_sum(tensor: torch.Tensor) -> float | None:
    if getattr(tensor, "quant_state", None) is not None:
        return None  # 4-bit codes (possibly stored in a float dtype): compare shapes only
    if tensor.is_meta or not tensor.is_floating_point():
        return None  # quantized (integer-packed) or not yet materialised: compare shapes only
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLES)
    # Sum of absolute values: a plain sum of mixed-sign weights can cancel to near zero, where any
    # relative tolerance turns into noise.
    return float(flat[::step][:_SAMPLES].double().abs().sum())


def _base_parameters(model: nn.Module, frozen_only: bool) -> dict[str, torch.Tensor]:
    adapter_ids = {id(p) for _, adapter in adapter_modules(model) for _, p in adapter.adapter_named_parameters()}
    return {
        base_parameter_name(state_dict_name(name)): param
        for name, param in model.named_parameters()
        if id(param) not in adapter_ids and not (frozen_only and param.requires_grad)
    }


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """``{"name_or_path": ..., "tensors": {name: [shape, sample_sum]}}`` over the frozen base parameters
    (fully trained ``modules_to_save`` are left out: they are stored in full beside the adapters).

    A sharded model returns the fingerprint :func:`remember_base_fingerprint` took at injection."""
    if is_sharded(model) and getattr(model, FINGERPRINT_ATTRIBUTE, None) is not None:
        return getattr(model, FINGERPRINT_ATTRIBUTE)
    # A merged layer's base weight (and bias) holds W + delta: fingerprint the W the adapter belongs to, or an adapter
    # saved from a merged model (merge_adapters(unload=False)) would be refused by its own base.
    merged = {f"{name}.{kind}": layer for name, layer in adapter_layers(model) if layer.merged for kind in ("weight", "bias")}
    tensors = {}
    for name, p in _base_parameters(model, frozen_only=True).items():
        if name in merged and p.is_floating_point() and getattr(p, "quant_state", None) is None:  # k-bit: shape only
            with torch.no_grad():
                p = merged[name].unmerged_parameter(name.rsplit(".", 1)[1], p.float())
        tensors[name] = [_logical_shape(p), _sample_sum(p)]
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    return {"name_or_path": name_or_path, "tensors": tensors}


def remember_base_fingerprint(model: nn.Module) -> None:
    """Keep ``model``'s fingerprint for when it is sharded (called at injection, before any sharding)."""
    object.__setattr__(model, FINGERPRINT_ATTRIBUTE, base_fingerprint(model))


def forget_base_fingerprint(model: nn.Module) -> None:
    """Drop the remembered fingerprint (the adapters it was taken for were removed)."""
    if FINGERPRINT_ATTRIBUTE in vars(model):
        object.__delattr__(model, FINGERPRINT_ATTRIBUTE)


def check_fingerprint(saved: dict[str, Any], model: nn.Module, what: str = "adapter") -> None:
    """Raise :class:`BaseModelMismatchError` naming the first differences between ``saved`` and ``model``."""
    # Every base parameter of ``model`` counts here, frozen or not: a fresh model has nothing frozen yet.
    remembered = getattr(model, FINGERPRINT_ATTRIBUTE, None) if is_sharded(model) else None
    if remembered is not None:
        current = remembered["tensors"]
    else:
        current = {name: [_logical_shape(p), _sample_sum(p)] for name, p in _base_parameters(model, frozen_only=False).items()}
    expected = saved.get("tensors", {})
    problems: list[str] = []
    missing = sorted(set(expected) - set(current))
    if missing:
        problems.append(f"base tensors missing from this model: {missing[:3]}")
    for name in sorted(set(expected) & set(current)):
        (shape_a, sum_a), (shape_b, sum_b) = expected[name], current[name]
        if list(shape_a) != list(shape_b):
            problems.append(f"{name} has shape {list(shape_b)}, the {what} expects {list(shape_a)}")
        elif sum_a is not None and sum_b is not None and not math.isclose(sum_a, sum_b, rel_tol=_RTOL, abs_tol=1e-3):
            problems.append(f"{name} holds different values (sample sum {sum_b:.6g} vs {sum_a:.6g})")
        if len(problems) >= 3:
            break
    if problems:
        source = saved.get("name_or_path")
        raise BaseModelMismatchError(
            f"this {what} was made for a different base model"
            + (f" ({source!r})" if source else "")
            + f" than the one given ({getattr(getattr(model, 'config', None), '_name_or_path', None)!r}): "
            + "; ".join(problems)
        )

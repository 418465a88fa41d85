"""bitsandbytes' k-bit linear layer types, without importing bitsandbytes.

A model can hold a ``Linear4bit`` or ``Linear8bitLt`` only if bitsandbytes has been imported (by us when
quantization is asked for, or by transformers' ``from_pretrained(quantization_config=...)``), so the
type checks read it from ``sys.modules`` instead of importing it: a plain LoRA run never loads it, and
never prints its start-up messages (bitsandbytes 0.50 logs "Failed to load CPU gemm_4bit_forward from
kernels-community" on import).
"""

from __future__ import annotations

import sys

from torch import nn


def _loaded_bitsandbytes_class(name: str) -> type | None:
    return getattr(getattr(sys.modules.get("bitsandbytes"), "nn", None), name, None)


def kbit_linear_types() -> tuple[type, ...]:
    """``(Linear4bit, Linear8bitLt)`` when bitsandbytes is loaded, else ``()``."""
    return tuple(t for t in map(_loaded_bitsandbytes_class, ("Linear4bit", "Linear8bitLt")) if t is not None)


def four_bit_linear_type() -> type | None:
    return _loaded_bitsandbytes_class("Linear4bit")


def is_kbit_linear(module: nn.Module) -> bool:
    types = kbit_linear_types()
    return bool(types) and isinstance(module, types)

"""The one door to bitsandbytes: imported lazily, on the first k-bit request, so plain LoRA works where the
library is missing or its native part is broken; a failure becomes one error that says how to get it."""

from __future__ import annotations

from types import ModuleType


class QuantizationBackendError(RuntimeError):
    """bitsandbytes, or its backend for the current device, cannot run the requested quantization."""


def import_bitsandbytes() -> ModuleType:
    """``bitsandbytes``, or a :class:`QuantizationBackendError` that says how to get it."""
    try:
        import bitsandbytes
    except Exception as err:  # noqa: BLE001 - ImportError, or a broken native library failing at import
        raise QuantizationBackendError(
            f"k-bit quantization needs bitsandbytes, which could not be imported ({type(err).__name__}: {err}). "
            f"Install it with `pip install 'bitsandbytes>=0.45'`, or drop `quantization` to train LoRA on the "
            f"full-precision base."
        ) from err
    return bitsandbytes

"""Is there a bitsandbytes backend that can run this quantization on this device?

bitsandbytes is imported lazily: plain LoRA must work where it is missing or broken. When a k-bit base
is asked for, we check once per (device type, format) by quantizing a tiny matrix and running a
forward and backward through it with the requested compute dtype. That answers "is the library
installed", "does it have kernels for this device" and "can this device compute in this dtype" with
one honest test, instead of a table of versions and devices that goes stale; a failure becomes one
error that names the device, the format and what bitsandbytes said.
"""

from __future__ import annotations

import functools

import torch

from lightning_peft.quantization.bnb import QuantizationBackendError, import_bitsandbytes
from lightning_peft.quantization.config import Quantization
from lightning_peft.quantization.layers import quantized_linear


def check_backend(config: Quantization, device: torch.device | str = "cpu") -> None:
    """Raise :class:`QuantizationBackendError` unless ``config`` runs on ``device``."""
    device = torch.device(device)
    if device.type == "meta":
        return
    if device.type == "cuda" and config.bits == 4 and config.compute_dtype == "bfloat16":
        # Before Ampere, CUDA has no bf16 matmul; torch would emulate some ops and bitsandbytes fails.
        if not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name(device)
            raise QuantizationBackendError(
                f"compute_dtype='bfloat16' is not supported by this GPU ({name}); use compute_dtype='float16'"
            )
    _probe(device.type, config.bits, config.quant_type, config.compute_dtype, config.quant_storage, config.block_size)


@functools.lru_cache(maxsize=None)
def _probe(device_type: str, bits: int, quant_type: str, compute_dtype: str, quant_storage: str, block_size: int) -> None:
    bnb = import_bitsandbytes()

    config = Quantization(
        bits=bits, quant_type=quant_type, compute_dtype=compute_dtype, quant_storage=quant_storage, block_size=block_size  # type: ignore[arg-type]
    )
    device = torch.device(device_type)
    try:
        generator = torch.Generator().manual_seed(0)
        # 64 x 128: one row of every block size up to 64*128 fits, and it is cheap everywhere.
        weight = torch.randn(64, 128, generator=generator)
        layer = quantized_linear(weight, None, config, device)
        x = torch.randn(2, 128, device=device, requires_grad=True)
        with torch.enable_grad():  # callers may be inside no_grad (loading is)
            layer(x).float().sum().backward()
    except Exception as err:  # noqa: BLE001 - whatever the backend raises, the user needs the same message
        raise QuantizationBackendError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run {config.describe()} on device "
            f"{device_type!r} ({type(err).__name__}: {err}). Check that bitsandbytes was built with a backend for "
            f"this device (`python -m bitsandbytes` prints a diagnosis), or choose another device, compute_dtype "
            f"or bits."
        ) from err

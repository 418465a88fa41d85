"""bitsandbytes' k-bit linear layers: building one from a full-precision weight, and reading its weight back.

``Linear4bit`` (NF4/FP4, QLoRA arXiv:2305.14314) or ``Linear8bitLt`` (LLM.int8). bitsandbytes comes through
:func:`~lightning_peft.quantization.bnb.import_bitsandbytes`, only when a layer is built or read.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_peft.core.kbit_cpu_kernel import dequantize_4bit_exact, restore_original_codes, select_cpu_kernel
from lightning_peft.core.kbit_layers import is_kbit_linear
from lightning_peft.quantization.bnb import import_bitsandbytes
from lightning_peft.quantization.config import Quantization

# One definition of "a k-bit layer", which never imports bitsandbytes (see core/kbit_layers.py); the
# quantization package's public name for it.
is_quantized_linear = is_kbit_linear


def quantized_linear(weight: torch.Tensor, bias: nn.Parameter | torch.Tensor | None, config: Quantization, device: torch.device | str) -> nn.Module:
    """A bitsandbytes linear layer holding ``weight`` (out, in) quantized on ``device``.

    The layer is built on the meta device and given the quantized weight, so the full-precision
    matrix is never allocated a second time. bitsandbytes quantizes when the parameter is moved to a
    device (``Params4bit.to``/``Int8Params.to``).
    """
    bnb = import_bitsandbytes()
    device = torch.device(device)
    out_features, in_features = weight.shape
    if config.bits == 4:
        layer = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=False,
            compute_dtype=config.torch_compute_dtype,
            compress_statistics=config.double_quant,
            quant_type=config.quant_type,
            quant_storage=config.torch_quant_storage,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight.detach(),
            requires_grad=False,
            blocksize=config.block_size,
            compress_statistics=config.double_quant,
            quant_type=config.quant_type,
            quant_storage=config.torch_quant_storage,
            module=layer,
        ).to(device)
        select_cpu_kernel(layer, config.cpu_kernel)
    else:
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=False, has_fp16_weights=False, threshold=config.int8_threshold, device="meta"
        )
        # Int8Params quantizes only when moved *from the CPU*: start there whatever the source device.
        layer.weight = bnb.nn.Int8Params(weight.detach().to("cpu"), requires_grad=False, has_fp16_weights=False).to(device)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(device), requires_grad=bias.requires_grad)
    return layer


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight a bitsandbytes linear layer multiplies by, in float32."""
    import bitsandbytes as bnb  # lazy: an optional native library (the layer exists, so it imports)
    import bitsandbytes.functional as F

    if isinstance(module, bnb.nn.Linear4bit):
        restore_original_codes(module)  # bitsandbytes' packed CPU layout is not what dequantize_4bit reads
        return dequantize_4bit_exact(module.weight.data, module.weight.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        # After the first forward the row scales live in the layer's matmul state, not on the weight.
        scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        return F.int8_vectorwise_dequant(module.weight.data, scales).float()
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes k-bit linear layer")

"""Getting a k-bit model ready to train adapters, and refusing setups known to fail.

The QLoRA recipe (arXiv:2305.14314, and what peft's ``prepare_model_for_kbit_training`` does):

- **Norms in float32.** Their weights are few and rescale every hidden state; in 16 bits the
  normalisation's rounding error compounds through the layers. A float32 norm makes float32 hidden
  states, which bitsandbytes layers accept (they cast to their compute dtype) but a 16-bit layer left
  unquantized -- the output head -- does not: those get their input cast to their own dtype.
- **Gradient checkpointing** to fit long sequences, and the *input* of the first checkpointed block
  must require grad. With the embeddings frozen nothing before the first block does, and reentrant
  checkpointing (``torch.utils.checkpoint(use_reentrant=True)``) then skips the backward of every
  block: the adapters silently get no gradient. We default to non-reentrant checkpointing (which does
  not have that failure) and also make the embedding output require grad, so reentrant works too.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_peft.core.transformers_compat import checkpointing_enabled, disable_checkpointing, enable_checkpointing
from lightning_peft.quantization.config import Quantization
from lightning_peft.quantization.layers import is_quantized_linear
from lightning_peft.quantization.replace import quantize_model

_NORM_SUFFIXES = ("RMSNorm", "LayerNorm")


def _is_norm(module: nn.Module) -> bool:
    # Llama-family norms are model-specific classes (LlamaRMSNorm, Qwen2RMSNorm, ...), hence the names.
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or type(module).__name__.endswith(_NORM_SUFFIXES)


def upcast_norms(model: nn.Module) -> list[str]:
    """Cast the parameters of every normalisation layer to float32 in place; returns the layers' names."""
    names = []
    for name, module in model.named_modules():
        if not _is_norm(module):
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()  # same Parameter object: references to it stay valid
        names.append(name)
    return names


def _cast_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    dtype = module.weight.dtype
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != dtype else a for a in args)


def cast_inputs_of_16bit_linears(model: nn.Module) -> list[str]:
    """Make every full-precision ``nn.Linear`` with a 16-bit weight cast its input to that dtype (idempotent)."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or is_quantized_linear(module) or module.weight.dtype not in (torch.float16, torch.bfloat16):
            continue
        if not getattr(module, "_lightning_peft_casts_input", False):
            module.register_forward_pre_hook(_cast_input)
            module._lightning_peft_casts_input = True
        names.append(name)
    return names


def uses_reentrant_checkpointing(model: nn.Module) -> bool:
    """Whether transformers' gradient checkpointing is on with ``use_reentrant=True`` (torch's old default)."""
    if not checkpointing_enabled(model):
        return False
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is not None:
            return bool(getattr(func, "keywords", {}).get("use_reentrant", True))
    return False


def prepare_model_for_kbit_training(model: nn.Module, gradient_checkpointing: bool | None = None, use_reentrant: bool = False) -> nn.Module:
    """Norms to float32; optionally turn on gradient checkpointing; make checkpointing work with frozen
    embeddings. ``gradient_checkpointing=None`` leaves the model's setting as it is. Idempotent.

    Example::

        model = load_quantized("assets/smollm2-135m-instruct", Quantization(bits=4))
        prepare_model_for_kbit_training(model, gradient_checkpointing=True)
    """
    upcast_norms(model)
    cast_inputs_of_16bit_linears(model)
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing (transformers' supports_gradient_checkpointing)")
        enable_checkpointing(model, use_reentrant)
    elif gradient_checkpointing is False and checkpointing_enabled(model):
        disable_checkpointing(model)
    if checkpointing_enabled(model) and getattr(model, "_require_grads_hook", None) is None:
        if not hasattr(model, "enable_input_require_grads"):
            raise ValueError(f"{type(model).__name__} has gradient checkpointing on but no input embeddings to make require grad")
        model.enable_input_require_grads()
    return model


def quantize_for_training(model: nn.Module, quantization: Quantization, device: Any = None) -> None:
    """Quantize ``model`` in place (idempotent) and prepare it for k-bit training (norms in float32):
    what ``PEFTCallback(quantization=...)`` does before injecting the adapters."""
    names = quantize_model(model, quantization, device=device)
    prepare_model_for_kbit_training(model)
    rank_zero_info(f"lightning_peft: {len(names)} linear layers quantized to {quantization.describe()}")

"""Which kernel a 4-bit layer multiplies with on a CPU: the exact one, or bitsandbytes' packed one.

bitsandbytes 0.50 has two CPU paths for ``Linear4bit``:

- **dequantize + matmul** (every CPU, every mode): the 4-bit codes are expanded to ``compute_dtype``
  and multiplied with torch. The product is exactly ``x @ dequantize(W).T``; QLoRA's arithmetic
  (Dettmers et al., 2023, arXiv:2305.14314) and what the HF peft parity tests compare against.
- **packed AVX512-BF16 kernel** (CPUs with AVX512-BF16/AMX, eval-mode forwards whose input needs no
  gradient): on the first such call the layer *repacks its codes in place* into a tiled layout and
  casts the block scales to bfloat16, then runs a fused bf16 kernel. Three problems follow:

  1. it crashes on layers whose input width is not a multiple of the block size, or whose output
     width is not a multiple of 32 (``shape '[32, 0]' is invalid``);
  2. its results differ from the exact product (bf16 scales and accumulation: about 2e-3 on the
     logits of a float32 tiny Llama), so a validation loss depends on the CPU model;
  3. the repacking is undone lossily: the scales stay rounded to bf16 after the next ``state_dict``
     or train-mode forward, so merely evaluating changes the stored base model; and a train-mode
     forward on still-packed codes runs a kernel with no autograd.

A fourth problem sits in the dequantize + matmul path itself: on CPUs with AVX512, bitsandbytes' native
4-bit dequantize is wrong when a row's width is not a multiple of the block size (a 64x48 NF4 matrix
comes back 18% off instead of 9%), in training too. Its result is right for the same codes read as rows
of exactly one block, which is what the flat storage is anyway.

``Quantization(cpu_kernel="exact")`` (the default) gives the layer :class:`ExactCpuLinear4bit`'s forward on
CPU inputs: dequantize through :func:`dequantize_4bit_exact` (block-shaped, so always right) and multiply
with torch, forward and backward; CUDA inputs keep bitsandbytes' forward. ``"fast"`` keeps bitsandbytes'
packed kernel for eval-mode inference on the layers it can handle, and fixes (3): the original codes and
scales are kept beside the packed copy and put back, bit for bit, before any train-mode forward or
``state_dict`` (the packed copy costs the codes' memory once more while it exists). Layers the packed
kernel cannot take use the exact forward. ``benchmarks/bench_qlora_cpu_kernel.py`` measures both.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Literal

import torch
from torch import nn

from lightning_peft.core.kbit_layers import four_bit_linear_type

log = logging.getLogger(__name__)

CpuKernel = Literal["exact", "fast"]
CPU_KERNELS = ("exact", "fast")

# What the layer was told, so a second call (another setup stage, apply_peft after quantize_model) keeps it.
KERNEL_ATTRIBUTE = "_lightning_peft_cpu_kernel"
# The layer's own (weight codes, quant state) while bitsandbytes holds a packed copy.
ORIGINAL_ATTRIBUTE = "_lightning_peft_unpacked"
HOOKS_ATTRIBUTE = "_lightning_peft_kernel_hooks"
# bitsandbytes' packing tiles 32 output rows (``block_n``) and reshapes the scales by input blocks.
PACK_ROWS = 32


@functools.cache
def cpu_has_packed_kernel() -> bool:
    """Whether bitsandbytes would take its packed kernel on this CPU (its own check)."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except Exception:  # noqa: BLE001 - an older bitsandbytes has no packed kernel at all
        return False
    return bool(has_avx512bf16())


def packed_kernel_fits(layer: nn.Module) -> bool:
    """Whether bitsandbytes' packing can represent this layer (else it crashes on the first eval forward)."""
    state = getattr(layer.weight, "quant_state", None)
    if state is None or len(state.shape) != 2:
        return False
    rows, columns = state.shape
    return rows % PACK_ROWS == 0 and columns % 2 == 0 and columns % state.blocksize == 0


def is_packed(layer: nn.Module) -> bool:
    return bool(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False))


def four_bit_layers(model: nn.Module) -> list[nn.Module]:
    four_bit = four_bit_linear_type()  # without importing bitsandbytes (see kbit_layers.py)
    return [] if four_bit is None else [m for m in model.modules() if isinstance(m, four_bit)]


def dequantize_4bit_exact(codes: torch.Tensor, state) -> torch.Tensor:
    """``bitsandbytes.functional.dequantize_4bit(codes, state)``, right on every CPU (see the module docstring).

    Blockwise quantization runs over the flattened matrix, so asking for ``(numel / block, block)`` and
    reshaping is the same computation with every row aligned to a block.
    """
    import bitsandbytes.functional as F

    shape = state.shape
    numel = shape.numel()
    if codes.device.type != "cpu" or shape[-1] % state.blocksize == 0:
        return F.dequantize_4bit(codes, state)
    if numel % state.blocksize == 0:
        block_rows = copy.copy(state)  # bitsandbytes reads the shape from the state; the rest is shared
        block_rows.shape = torch.Size((numel // state.blocksize, state.blocksize))
        return F.dequantize_4bit(codes, block_rows).reshape(shape)
    return _dequantize_4bit_in_torch(codes, state)


def _dequantize_4bit_in_torch(codes: torch.Tensor, state) -> torch.Tensor:
    """The definition, for the rare matrix whose size is not a multiple of the block: level[code] * absmax."""
    import bitsandbytes.functional as F

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    packed = codes.view(torch.uint8).reshape(-1)
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: state.shape.numel()].long()
    levels = F.get_4bit_type(state.quant_type, device=codes.device)[nibbles]
    scales = absmax.float().repeat_interleave(state.blocksize)[: levels.numel()]
    return (levels * scales).reshape(state.shape).to(state.dtype)


class _DequantizedMatmul(torch.autograd.Function):
    """``x @ dequantize(W).T`` with a gradient for ``x`` only (W is frozen): the weight is dequantized again
    in backward rather than kept, as bitsandbytes does, so a layer's float weight never outlives its call."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, codes: torch.Tensor, state) -> torch.Tensor:
        ctx.codes, ctx.state = codes, state
        return x @ dequantize_4bit_exact(codes, state).to(x.dtype).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad @ dequantize_4bit_exact(ctx.codes, ctx.state).to(grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


@functools.cache
def exact_linear4bit_class() -> type:
    """``ExactCpuLinear4bit``: bitsandbytes' ``Linear4bit`` whose CPU forward is the exact dequantize + matmul.

    A subclass (assigned to the layer's ``__class__``) rather than a wrapper, so every ``isinstance(m,
    Linear4bit)`` check (ours, transformers', peft's) and the layer's state dict stay as they were.
    """
    import bitsandbytes as bnb
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    class ExactCpuLinear4bit(bnb.nn.Linear4bit):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.device.type != "cpu":
                return super().forward(x)
            fix_4bit_weight_quant_state_from_module(self)  # FSDP1 replaces the weight by a plain view
            if not self.compute_type_is_set:
                self.set_compute_type(x)
                self.compute_type_is_set = True
            compute = self.compute_dtype or x.dtype
            out = _DequantizedMatmul.apply(x.to(compute), self.weight, self.weight.quant_state)
            if self.bias is not None:
                out = out + self.bias.to(compute)
            return out.to(x.dtype)

    ExactCpuLinear4bit.__module__ = __name__
    return ExactCpuLinear4bit


def select_cpu_kernel(model: nn.Module, kernel: CpuKernel, *, keep_existing: bool = False) -> int:
    """Make every 4-bit layer of ``model`` use ``kernel`` on the CPU; returns how many layers were set.

    ``keep_existing``: leave layers that already have a kernel chosen (``apply_peft`` sets "exact" only on
    layers nobody chose for, e.g. a model quantized by ``from_pretrained(quantization_config=...)``).
    """
    if kernel not in CPU_KERNELS:
        raise ValueError(f"cpu_kernel={kernel!r} is not one of {list(CPU_KERNELS)}: 'exact' (dequantize + matmul) or 'fast' (bitsandbytes' packed bf16 kernel)")
    changed = 0
    misfits = 0
    for layer in four_bit_layers(model):
        if keep_existing and hasattr(layer, KERNEL_ATTRIBUTE):
            continue
        restore_original_codes(layer)
        fast = kernel == "fast" and cpu_has_packed_kernel() and packed_kernel_fits(layer)
        misfits += kernel == "fast" and cpu_has_packed_kernel() and not fast
        exact_class = exact_linear4bit_class()
        if fast:
            if type(layer) is exact_class:
                layer.__class__ = exact_class.__base__
            layer.support_avx512bf16_for_cpu = True
            if not hasattr(layer, HOOKS_ATTRIBUTE):
                hooks = (layer.register_forward_pre_hook(_unpack_unless_packed_call), layer.register_state_dict_pre_hook(_unpack_before_saving))
                object.__setattr__(layer, HOOKS_ATTRIBUTE, hooks)
        else:
            if type(layer) is exact_class.__base__:  # a subclass someone else made keeps its own forward
                layer.__class__ = exact_class
            layer.support_avx512bf16_for_cpu = False  # and bitsandbytes never repacks it
            for hook in getattr(layer, HOOKS_ATTRIBUTE, ()):
                hook.remove()
            if hasattr(layer, HOOKS_ATTRIBUTE):
                object.__delattr__(layer, HOOKS_ATTRIBUTE)
        object.__setattr__(layer, KERNEL_ATTRIBUTE, kernel)
        changed += 1
    if misfits:
        log.info("cpu_kernel='fast': %d 4-bit layers have shapes bitsandbytes' packed kernel cannot take; they use the exact kernel", misfits)
    return changed


def restore_original_codes(layer: nn.Module) -> None:
    """Put back the layer's own codes and scales if bitsandbytes repacked them.

    Bit for bit when the packing happened under ``cpu_kernel="fast"`` (we kept the originals);
    otherwise through bitsandbytes' own inverse, whose scales stay rounded to bf16, which is said once.
    """
    original = getattr(layer, ORIGINAL_ATTRIBUTE, None)
    if original is not None:
        layer.weight.data, layer.weight.quant_state = original
        layer.quant_state = layer.weight.quant_state
        object.__setattr__(layer, ORIGINAL_ATTRIBUTE, None)
        return
    if is_packed(layer):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, layer.weight.quant_state)
        layer.quant_state = layer.weight.quant_state
        log.warning(
            "a 4-bit layer had been repacked by bitsandbytes' CPU kernel before lightning_peft saw it; its block scales "
            "stay rounded to bfloat16 (bitsandbytes' inverse cannot restore them)"
        )


def _unpack_unless_packed_call(layer: nn.Module, args: tuple) -> None:
    """Forward pre-hook (fast kernel): keep the originals before bitsandbytes repacks, restore them before
    a call it would not take the packed path for (training, or an input that needs a gradient)."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor):
        return
    packed_call = x.device.type == "cpu" and not layer.training and not x.requires_grad
    if packed_call and not is_packed(layer):
        # bitsandbytes reassigns the tensors of this state rather than writing into them: a shallow copy keeps them.
        object.__setattr__(layer, ORIGINAL_ATTRIBUTE, (layer.weight.data, copy.copy(layer.weight.quant_state)))
    elif not packed_call and is_packed(layer):
        restore_original_codes(layer)


def _unpack_before_saving(layer: nn.Module, prefix: str, keep_vars: bool) -> None:
    restore_original_codes(layer)

"""An independent 4-bit dequantization in float64: what a bitsandbytes ``Linear4bit`` stands for.

The tests compare our kernels against this, not against ``bitsandbytes.functional.dequantize_4bit``,
because that function itself is wrong on some CPUs (AVX512, rows not a multiple of the block size).
It reads the stored codes and scales directly:

    weight.flatten()[i] = LEVELS[code[i]] * absmax[i // block]

with two codes per byte (high nibble first), and, under double quantization, each absmax itself
stored as an 8-bit code into ``state2.code`` scaled by ``state2.absmax`` per 256 scales, plus ``offset``.
"""

from __future__ import annotations

import torch

# NF4, Dettmers et al. 2023 (arXiv:2305.14314), Appendix E: the 16 quantiles of N(0, 1) normalised to [-1, 1].
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip


def reference_dequantize(module) -> torch.Tensor:
    """The (out, in) float64 weight of a bitsandbytes ``Linear4bit`` (NF4), computed from its codes."""
    return reference_from_codes(module.weight.data, module.weight.quant_state)


def reference_from_codes(codes_tensor: torch.Tensor, state) -> torch.Tensor:
    """The float64 matrix that 4-bit ``codes_tensor`` with quantization ``state`` (NF4) stands for."""
    assert state.quant_type == "nf4", "the reference knows NF4's levels only"
    assert not getattr(state, "packing_format_for_cpu", False), "codes are in bitsandbytes' packed CPU layout"
    absmax = state.absmax.double().cpu()
    if state.nested:
        inner = state.state2
        codes8 = state.absmax.cpu().long()
        scales = inner.absmax.double().cpu().repeat_interleave(inner.blocksize)[: codes8.numel()]
        absmax = inner.code.double().cpu()[codes8] * scales + float(state.offset)
    packed = codes_tensor.view(torch.uint8).reshape(-1).cpu()
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: state.shape.numel()].long()
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)[codes]
    return (levels * absmax.repeat_interleave(state.blocksize)[: levels.numel()]).reshape(state.shape)

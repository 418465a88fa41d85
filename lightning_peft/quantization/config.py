"""``Quantization``: how the frozen base weights are stored, from QLoRA (Dettmers et al., 2023, arXiv:2305.14314).

QLoRA trains LoRA adapters on a base model whose linear weights are frozen in 4 bits:

- **NF4** ("4-bit NormalFloat"): 16 levels at the quantiles of N(0, 1), so normally distributed
  weights use every level equally often. **FP4** is the plain 4-bit float (1 sign, 2 exponent, 1
  mantissa bit); on a Gaussian 1024x1024 matrix NF4 is off by 9.2% relative, FP4 by 12.2%.
- Weights are quantized in blocks of ``block_size`` (64) values, each with its own float32 absmax
  scale: 32/64 = 0.5 extra bits per weight. **Double quantization** quantizes those scales to 8 bits
  in blocks of 256: 4 + 8/64 + 32/(64*256) = 4.127 bits per weight (the paper's figure).
- The matmul dequantizes a block-row at a time to ``compute_dtype`` (bf16 in the paper); gradients
  flow through the frozen 4-bit weight to the float32 adapters.

``bits=8`` uses LLM.int8() (Dettmers et al., 2022, arXiv:2208.07339) instead: row-wise int8 weights,
with input columns holding outliers above ``int8_threshold`` computed in 16 bits.

All the arithmetic is bitsandbytes' (``Linear4bit``/``Linear8bitLt``); this class only says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch

from lightning_peft.core.kbit_cpu_kernel import CPU_KERNELS, CpuKernel

Bits = Literal[4, 8]
QuantType = Literal["nf4", "fp4"]
ComputeDType = Literal["float32", "bfloat16", "float16"]
StorageDType = Literal["uint8", "float32", "bfloat16", "float16"]

# Block sizes bitsandbytes 0.50 implements for 4-bit on every backend (CUDA also takes 32).
BlockSize = Literal[64, 128, 256, 512, 1024, 2048, 4096]
BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class Quantization:
    """Which k-bit format the frozen linear layers of the base model are stored in.

    Example::

        >>> q = Quantization(bits=4, quant_type="nf4", double_quant=True, compute_dtype="bfloat16")
        >>> q.describe()
        '4-bit nf4, double quantization, block 64, compute bfloat16'
    """

    # 4: QLoRA's 4-bit (NF4/FP4, bitsandbytes Linear4bit); 8: LLM.int8() (Linear8bitLt).
    bits: Bits = 4
    # NF4 is the QLoRA paper's choice (lower error than FP4 on normally distributed weights). 4-bit only.
    quant_type: QuantType = "nf4"
    # Quantize the per-block scales too (8-bit, blocks of 256): saves 0.37 bits/weight at no measurable
    # error. 4-bit only.
    double_quant: bool = True
    # Values sharing one scale; smaller blocks follow outliers better and cost more scales. 4-bit only.
    block_size: BlockSize = 64
    # dtype the dequantized weight is multiplied in. bf16 is QLoRA's; float32 reproduces LoRA on the
    # dequantized weights exactly (slow); float16 overflows more easily. 4-bit only (8-bit computes in
    # the input's dtype).
    compute_dtype: ComputeDType = "bfloat16"
    # dtype the packed 4-bit codes are stored in. FSDP needs one float dtype per sharded unit: set it to
    # the compute dtype there. 4-bit only.
    quant_storage: StorageDType = "uint8"
    # LLM.int8() outlier threshold: input features above it are multiplied in 16 bits (6.0 in the paper;
    # 0.0 switches the outlier path off). 8-bit only.
    int8_threshold: float = 6.0
    # Linear layers left in full precision, besides the output head (which is never quantized): names
    # matched like target_modules (exact name or a ".name" suffix).
    skip_modules: Optional[list[str]] = field(default=None)
    # 4-bit matmul on a CPU: "exact" is dequantize + matmul, the same numbers on every CPU; "fast" lets
    # bitsandbytes use its packed AVX512-BF16 kernel for eval-mode inference where the CPU has one
    # (bf16 scales: close, not equal; see core/kbit_cpu_kernel.py). No effect on GPUs.
    cpu_kernel: CpuKernel = "exact"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8) or isinstance(self.bits, bool):
            raise ValueError(f"Quantization bits={self.bits!r} is not supported; choose 4 (NF4/FP4, QLoRA) or 8 (LLM.int8)")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"unknown quant_type={self.quant_type!r}; choose 'nf4' (QLoRA's NormalFloat) or 'fp4'")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size={self.block_size!r} is not one bitsandbytes implements; choose one of {list(BLOCK_SIZES)}")
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"unknown compute_dtype={self.compute_dtype!r}; choose 'float32', 'bfloat16' or 'float16'")
        if self.quant_storage not in ("uint8", "float32", "bfloat16", "float16"):
            raise ValueError(f"unknown quant_storage={self.quant_storage!r}; choose 'uint8', 'float32', 'bfloat16' or 'float16'")
        if not isinstance(self.int8_threshold, (int, float)) or self.int8_threshold < 0:
            raise ValueError(f"int8_threshold must be a number >= 0, got {self.int8_threshold!r}")
        if self.cpu_kernel not in CPU_KERNELS:
            raise ValueError(f"unknown cpu_kernel={self.cpu_kernel!r}; choose 'exact' (dequantize + matmul, the default) or 'fast' (bitsandbytes' packed bf16 kernel for CPU inference)")
        if isinstance(self.skip_modules, str):
            # A bare string would be iterated character by character.
            object.__setattr__(self, "skip_modules", [self.skip_modules])
        elif self.skip_modules is not None:
            object.__setattr__(self, "skip_modules", list(self.skip_modules))

    # -- torch views ------------------------------------------------------------------------------
    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return getattr(torch, self.compute_dtype)

    @property
    def torch_quant_storage(self) -> torch.dtype:
        return getattr(torch, self.quant_storage)

    def describe(self) -> str:
        if self.bits == 8:
            return f"8-bit LLM.int8, outlier threshold {self.int8_threshold:g}"
        return (
            f"4-bit {self.quant_type}{', double quantization' if self.double_quant else ''}, block {self.block_size}, "
            f"compute {self.compute_dtype}" + (f", storage {self.quant_storage}" if self.quant_storage != "uint8" else "")
        )

    def to_transformers(self) -> Any:
        """The equivalent ``transformers.BitsAndBytesConfig`` (e.g. to compare with its own loader).

        transformers' defaults differ (fp4, no double quantization, float32 compute), so every field is
        set explicitly. Block size has no field there: it is always 64.
        """
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(
                load_in_8bit=True, llm_int8_threshold=self.int8_threshold, llm_int8_skip_modules=self.skip_modules
            )
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=self.torch_compute_dtype,
            bnb_4bit_quant_storage=self.torch_quant_storage,
            llm_int8_skip_modules=self.skip_modules,
        )


# Checkpoints store the task's hyperparameters, this config included, and torch.load(weights_only=True)
# (Lightning's default) refuses unknown classes: a frozen dataclass of plain values is safe to allow.
torch.serialization.add_safe_globals([Quantization])

"""k-bit base models for QLoRA (Dettmers et al., 2023, arXiv:2305.14314), through bitsandbytes.

- :class:`Quantization`: the format (4-bit NF4/FP4 with double quantization, or 8-bit LLM.int8).
- :func:`quantize_model`: quantize a loaded model in place (what ``PEFTCallback(quantization=...)`` does).
- :func:`load_quantized`: stream a safetensors directory straight into k-bit, never holding the
  full-precision model in host memory.
- :func:`prepare_model_for_kbit_training`: norms in float32, gradient checkpointing that works with a
  frozen embedding layer.
- :func:`select_cpu_kernel`: exact dequantize + matmul on CPUs (the default), or bitsandbytes' packed
  AVX512-BF16 inference kernel.
"""

from lightning_peft.core.kbit_cpu_kernel import select_cpu_kernel
from lightning_peft.quantization.backend import check_backend
from lightning_peft.quantization.bnb import QuantizationBackendError
from lightning_peft.quantization.config import Quantization
from lightning_peft.quantization.layers import dequantized_weight, is_quantized_linear
from lightning_peft.quantization.loading import load_quantized
from lightning_peft.quantization.memory import bits_per_parameter, model_weight_bytes
from lightning_peft.quantization.prepare import prepare_model_for_kbit_training
from lightning_peft.quantization.replace import quantize_model

__all__ = [
    "Quantization",
    "QuantizationBackendError",
    "bits_per_parameter",
    "check_backend",
    "dequantized_weight",
    "is_quantized_linear",
    "load_quantized",
    "model_weight_bytes",
    "prepare_model_for_kbit_training",
    "quantize_model",
    "select_cpu_kernel",
]

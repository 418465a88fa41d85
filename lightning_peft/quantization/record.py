"""What a quantized model remembers about its full-precision weights.

Quantization is lossy (NF4 is off by about 9% relative), so anything that needs the original weights
back -- above all a merged 16-bit export -- must re-read them from the checkpoint they came from. The
record says which checkpoint that was and, for each quantized weight, its shape, dtype and a cheap
signature (the float64 sum of |w| over 64 strided elements, as in the base fingerprint). The
signature lets the exporter refuse a source that no longer holds the same weights, instead of
silently merging the adapters into a different model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lightning_peft.core.fingerprint import _sample_sum
from lightning_peft.quantization.config import Quantization

# On the model root, beside the injected method (see core/injection.py); not a submodule.
RECORD_ATTRIBUTE = "_lightning_peft_quantization"


@dataclass(frozen=True)
class OriginalWeight:
    """A full-precision weight as it was just before quantization."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    signature: float | None

    @classmethod
    def of(cls, weight: torch.Tensor) -> OriginalWeight:
        return cls(tuple(weight.shape), weight.dtype, _sample_sum(weight))

    def matches(self, tensor: torch.Tensor) -> bool:
        """Same shape, and the same values up to a 16-bit rounding (a bf16 file read into a float32 model)."""
        if tuple(tensor.shape) != self.shape:
            return False
        signature = _sample_sum(tensor)
        if self.signature is None or signature is None:
            return True
        return abs(signature - self.signature) <= 5e-3 * max(abs(self.signature), 1e-6)


@dataclass
class QuantizationRecord:
    config: Quantization
    # base-model weight name (``model.layers.0.self_attn.q_proj.weight``) -> the weight before quantization
    weights: dict[str, OriginalWeight] = field(default_factory=dict)
    # Directory (or Hub id) holding the original safetensors, when known.
    source: str | None = None


def quantization_record(model: nn.Module) -> QuantizationRecord | None:
    return getattr(model, RECORD_ATTRIBUTE, None)


def set_quantization_record(model: nn.Module, record: QuantizationRecord) -> None:
    object.__setattr__(model, RECORD_ATTRIBUTE, record)  # plain attribute: bypass nn.Module.__setattr__


def source_of(model: nn.Module) -> str | None:
    """Where ``model`` was loaded from (``from_pretrained`` sets ``config._name_or_path``), if anywhere."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        return None
    # A relative directory is made absolute now: the export may run from another working directory.
    return str(Path(name).absolute()) if Path(name).is_dir() else str(name)


def resolve_source(source: str | os.PathLike | None) -> Path | None:
    """A local directory with the safetensors of ``source``: the path itself, or a Hub id already in the
    local Hugging Face cache (never downloaded here: an export must not start a multi-GB download)."""
    if source is None:
        return None
    path = Path(source)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), local_files_only=True, allow_patterns=["*.safetensors", "*.json"]))
    except Exception:  # noqa: BLE001 - not a Hub id, not cached, or no huggingface_hub: the source is unknown
        return None

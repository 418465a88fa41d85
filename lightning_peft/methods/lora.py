"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv:2106.09685).

A frozen weight ``W`` (out x in) is adapted by a low-rank update ``s * B @ A``::

    y = W x + b + s * B (A dropout(x))        A: (r, in), B: (out, r), s = alpha / r

``B`` starts at zero, so the model is unchanged at step 0. ``A`` starts kaiming-uniform with
``a = sqrt(5)`` (the ``nn.Linear`` default, ``init="kaiming"``) or ``N(0, 1/r)`` (``init="gaussian"``).
rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732) uses ``s = alpha / sqrt(r)`` so the update's scale does
not collapse as ``r`` grows.

Layer kinds:

- ``nn.Linear``: as above.
- GPT-2 ``Conv1D`` stores ``W`` transposed (in x out); ``A``/``B`` keep the Linear orientation and only
  the merge transposes.
- ``nn.Embedding`` (num x dim): the roles swap so the update is a lookup: ``A`` (r, num) starts at zero,
  ``B`` (dim, r) ~ N(0, 1); ``y = E[x] + s * (A^T[x]) B^T``. No dropout (the input is token ids).

Adapter tensors are kept in float32 even on a bf16/fp16 base: a rank-r update in 16 bits loses most of
the small steps that training makes. The input is cast up for the adapter branch and the result cast
back to the base output's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.core.adapter_layer import AdapterLayer
from lightning_peft.core.targets import TargetSpec, linear_types
from lightning_peft.methods.base import PEFTMethod

LoRAInit = Literal["kaiming", "gaussian"]


class LoRA(PEFTMethod):
    """LoRA config: ``PEFTCallback(LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))``.

    Args:
        r: rank of the update (> 0).
        alpha: scale numerator; the update is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with rslora).
        dropout: dropout probability on the adapter branch's input only, in [0, 1).
        target_modules: see :mod:`lightning_peft.core.targets`.
        exclude_modules: names or regex removed from the targets.
        modules_to_save: modules trained in full (e.g. ``["classifier"]``).
        rslora: use the rank-stabilised scale ``alpha / sqrt(r)``.
        init: ``"kaiming"`` (peft's default) or ``"gaussian"`` for ``A``.

    Example::

        >>> LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"]).scaling
        2.0
    """

    name = "lora"
    supported_description = "nn.Linear, transformers Conv1D, nn.Embedding and bitsandbytes Linear4bit/Linear8bitLt"

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: TargetSpec = None,
        exclude_modules: TargetSpec = None,
        modules_to_save: Sequence[str] | None = None,
        rslora: bool = False,
        init: LoRAInit = "kaiming",
    ) -> None:
        super().__init__(target_modules, exclude_modules, modules_to_save)
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got r={r!r}")
        if not isinstance(alpha, (int, float)) or alpha <= 0 or not math.isfinite(alpha):
            raise ValueError(f"LoRA alpha must be a positive finite number, got alpha={alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got dropout={dropout!r}")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"unknown LoRA init {init!r}; choose 'kaiming' or 'gaussian'")
        self.r = r
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.rslora = rslora
        self.init = init

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, (*linear_types(), nn.Embedding))

    def wrap(self, name: str, module: nn.Module) -> LoRALayer:
        return LoRALayer(module, self)

    # -- HF peft adapter_config.json ---------------------------------------------------------------
    def peft_config(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        from transformers.pytorch_utils import Conv1D

        modules = dict(model.named_modules())
        # ``targets`` are already wrapped when this runs (save_adapter): look at the layer inside the wrapper,
        # or every Conv1D model would be written with fan_in_fan_out=false.
        layers = [getattr(modules[t], "base_layer", modules[t]) for t in targets]
        return {
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.rslora,
            "use_dora": False,
            "bias": "none",
            # peft transposes Conv1D deltas when this is set; it must reflect the targets' layout.
            "fan_in_fan_out": any(isinstance(layer, Conv1D) for layer in layers),
            "init_lora_weights": True if self.init == "kaiming" else "gaussian",
        }

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> LoRA:
        if config.get("use_dora"):
            raise ValueError("this adapter uses DoRA (use_dora=true); load it with the DoRA method")
        # peft options this LoRA does not implement. Ignoring them would load without complaint and give
        # wrong outputs (alpha_pattern changes only the scale) or fail later with a confusing shape error.
        unsupported = {key: config[key] for key in _UNSUPPORTED_PEFT_FIELDS if config.get(key)}
        if config.get("bias") not in (None, "none"):
            unsupported["bias"] = config["bias"]
        if unsupported:
            fields = ", ".join(f"{key}={value!r}" for key, value in unsupported.items())
            raise ValueError(f"this adapter uses peft options lightning_peft's LoRA does not support: {fields}")
        init = config.get("init_lora_weights", True)
        return cls(
            r=int(config["r"]),
            alpha=float(config.get("lora_alpha", 8)),
            dropout=float(config.get("lora_dropout", 0.0)),
            target_modules=config.get("target_modules"),
            exclude_modules=config.get("exclude_modules"),
            modules_to_save=config.get("modules_to_save"),
            rslora=bool(config.get("use_rslora", False)),
            init="gaussian" if init == "gaussian" else "kaiming",
        )


# adapter_config.json fields (peft 0.21) that change which layers are adapted, their rank or scale, the
# forward pass, or add tensors; any of them set (truthy) means this LoRA would not reproduce the adapter.
_UNSUPPORTED_PEFT_FIELDS = (
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "lora_bias",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
    "megatron_config",
)


def _layer_shape(base: nn.Module) -> tuple[Literal["linear", "conv1d", "embedding"], int, int]:
    """(kind, in_features, out_features) of a supported base layer; for embeddings (num, dim)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(base, nn.Embedding):
        return "embedding", base.num_embeddings, base.embedding_dim
    if isinstance(base, Conv1D):
        in_features, out_features = base.weight.shape  # Conv1D stores W as (in, out)
        return "conv1d", in_features, out_features
    return "linear", base.in_features, base.out_features  # nn.Linear and bitsandbytes linears


def _adapter_device(base: nn.Module) -> torch.device:
    param = next(base.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class LoRALayer(AdapterLayer):
    """``base_layer`` plus a float32 rank-``r`` update; see the module docstring for the math."""

    def __init__(self, base_layer: nn.Module, config: LoRA) -> None:
        super().__init__(base_layer)
        self.kind, in_features, out_features = _layer_shape(base_layer)
        self.r = config.r
        self.scaling = config.scaling
        device = _adapter_device(base_layer)
        # (r, in) and (out, r); for embeddings in=num_embeddings, out=embedding_dim.
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, config.r, dtype=torch.float32, device=device))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 and self.kind != "embedding" else nn.Identity()
        self.reset_adapter(config.init)

    @torch.no_grad()
    def reset_adapter(self, init: LoRAInit = "kaiming") -> None:
        if self.lora_A.is_meta:
            return  # materialised later (e.g. FSDP2 ``to_empty`` + ``reset_adapter``)
        if self.kind == "embedding":
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return result
        if self.kind == "embedding":
            base = self.base_layer
            # Look up columns of A as if A^T were an embedding table: (..., r).
            after_a = F.embedding(x, self.lora_A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
            update = F.linear(after_a, self.lora_B)  # (..., dim)
        else:
            h = self.dropout(x).to(self.lora_A.dtype)
            update = F.linear(F.linear(h, self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return result + (update * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A) * self.scaling  # (out, in); embedding: (dim, num)
        # Linear stores (out, in); Conv1D (in, out) and Embedding (num, dim) store the transpose.
        return delta if self.kind == "linear" else delta.T

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        if self.kind == "embedding":
            return {"lora_embedding_A": self.lora_A, "lora_embedding_B": self.lora_B}
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    @torch.no_grad()
    def load_peft_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, param in self.peft_state_dict().items():
            param.copy_(tensors[key].to(param.dtype))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, scaling={self.scaling:g}"

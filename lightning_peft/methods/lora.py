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

Initialisations that start ``B A`` away from zero (PiSSA, OLoRA, LoRA-GA; the math is in
:mod:`lightning_peft.methods.lora_init`) need ``W - s B0 A0`` as the base so the output at step 0 is
unchanged. The papers and HF peft overwrite ``W``. We never touch ``W``: the layer keeps ``A0``/``B0``
as frozen float32 buffers and computes ``W x + s B A x - s B0 A0 x``. That costs a second rank-r product
per step and buys four things: a 4-bit base is not requantized (which would silently change every
quantized weight), the base fingerprint and every other adapter keep working, the exported adapter is
exact against the original base (the rank-2r form ``[A; A0]``, ``[B, -B0]``, which is what peft converts
to), and adapter-only checkpoints resume with the buffers in them.

Adapter tensors are kept in float32 even on a bf16/fp16 base: a rank-r update stored in 16 bits loses
most of the small steps that training makes. The products, however, run in the activations' dtype with
float32 accumulation, exactly as under ``torch.autocast`` (Lightning's ``bf16-mixed``): the factors are
cast down (an r-row copy), and the update is added to the base output inside one ``addmm``
(``W x + b`` as the accumulator, ``s`` as its ``alpha``) instead of materialising ``B A x`` in float32,
scaling it and adding it in three more passes over the output. On a bf16 Llama-3.2-1B shape this cut
the H100 training step by a fifth (``benchmarks/RESULTS.md``). In float32 nothing changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.core.adapter_layer import AdapterLayer, adapter_layers, adapter_modules, is_kbit_weight
from lightning_peft.core.targets import TargetSpec, linear_types
from lightning_peft.methods.base import PEFTMethod, require_peft_targets
from lightning_peft.methods.lora_ga import estimate_weight_gradients, initialise_from_gradients
from lightning_peft.methods.lora_init import olora_factors, pissa_factors
from lightning_peft.quantization.layers import dequantized_weight

LoRAInit = Literal["kaiming", "gaussian", "pissa", "olora", "lora_ga"]
INITS: tuple[str, ...] = get_args(LoRAInit)
#: Inits that start B A away from zero and so carry the frozen initial factors A0, B0.
OFFSET_INITS = ("pissa", "olora", "lora_ga")
#: peft ``init_lora_weights`` values whose saved tensors are relative to a base peft modified in place.
_PEFT_BASE_MOVING_INITS = ("pissa", "olora", "lora_ga", "corda", "loftq")


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
        init: ``"kaiming"`` (peft's default) or ``"gaussian"`` for ``A`` with ``B = 0``; ``"pissa"``
            (principal singular vectors of ``W``), ``"olora"`` (QR of ``W``) or ``"lora_ga"`` (SVD of the
            full-weight gradient, estimated by :class:`~lightning_peft.PEFTCallback` from the Trainer's
            train dataloader when fitting starts). See :mod:`lightning_peft.methods.lora_init`.
        svd_niter: ``None`` for an exact SVD in PiSSA and LoRA-GA; ``k`` for the randomized SVD with ``k``
            subspace iterations (peft's ``"pissa_niter_k"``), much faster on large layers.
        init_batches: training batches LoRA-GA averages the gradient over.
        lora_ga_gamma: the gamma of LoRA-GA's "stable" scale ``d_out^(1/4) / sqrt(gamma)``.

    Example::

        >>> LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"]).scaling
        2.0
    """

    resume_safe_arguments = ("dropout",)

    name = "lora"
    peft_type = "LORA"
    supported_inits: tuple[str, ...] = INITS
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
        svd_niter: int | None = None,
        init_batches: int = 8,
        lora_ga_gamma: float = 16.0,
    ) -> None:
        super().__init__(target_modules, exclude_modules, modules_to_save)
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got r={r!r}")
        if not isinstance(alpha, (int, float)) or alpha <= 0 or not math.isfinite(alpha):
            raise ValueError(f"LoRA alpha must be a positive finite number, got alpha={alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got dropout={dropout!r}")
        if init not in type(self).supported_inits:
            choices = ", ".join(repr(i) for i in type(self).supported_inits)
            raise ValueError(f"unknown {type(self).__name__} init {init!r}; choose one of {choices}")
        if svd_niter is not None and (not isinstance(svd_niter, int) or isinstance(svd_niter, bool) or svd_niter < 0):
            raise ValueError(f"svd_niter must be None (exact SVD) or a non-negative integer, got svd_niter={svd_niter!r}")
        if not isinstance(init_batches, int) or isinstance(init_batches, bool) or init_batches <= 0:
            raise ValueError(f"init_batches must be a positive integer, got init_batches={init_batches!r}")
        if not isinstance(lora_ga_gamma, (int, float)) or not lora_ga_gamma > 0:
            raise ValueError(f"lora_ga_gamma must be a positive number, got lora_ga_gamma={lora_ga_gamma!r}")
        self.r = r
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.rslora = rslora
        self.init = init
        self.svd_niter = svd_niter
        self.init_batches = init_batches
        self.lora_ga_gamma = float(lora_ga_gamma)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, (*linear_types(), nn.Embedding))

    @property
    def moves_base(self) -> bool:
        """Whether the init starts ``B A`` away from zero (and so carries the initial factors)."""
        return self.init in OFFSET_INITS

    @property
    def needs_data(self) -> bool:
        """Whether the init needs training batches (LoRA-GA), run when fitting starts."""
        return self.init == "lora_ga"

    def initialise_from_data(
        self, model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[Any], Any], reduce: Callable[[Any], Any]
    ) -> None:
        """LoRA-GA: set every adapter's initial factors from the SVD of its base weight's gradient, averaged
        over ``batches`` and then over the ranks (``reduce``), so every rank starts from the same factors
        (:mod:`lightning_peft.methods.lora_ga`)."""
        if not self.needs_data:
            super().initialise_from_data(model, batches, loss_fn, reduce)
        layers = {name: layer for name, layer in adapter_layers(model) if isinstance(layer, LoRALayer) and layer.has_initial_factors}
        gradients = estimate_weight_gradients(model, layers, batches, loss_fn)
        initialise_from_gradients(layers, gradients, self.r, self.lora_ga_gamma, self.svd_niter, reduce=reduce)

    def wrap(self, name: str, module: nn.Module) -> LoRALayer:
        if self.moves_base and isinstance(module, nn.Embedding):
            raise ValueError(
                f"init={self.init!r} is defined for Linear and Conv1D layers; target {name!r} is an Embedding. "
                f"Exclude it (exclude_modules=[{name.rsplit('.', 1)[-1]!r}]) or use init='kaiming' or 'gaussian'"
            )
        return LoRALayer(module, self)

    # -- HF peft adapter_config.json ---------------------------------------------------------------
    def peft_config(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        from transformers.pytorch_utils import Conv1D

        modules = dict(adapter_modules(model))  # the names ``targets`` uses (state-dict spelling)
        # ``targets`` are already wrapped when this runs (save_adapter): look at the layer inside the wrapper,
        # or every Conv1D model would be written with fan_in_fan_out=false.
        layers = [getattr(modules[t], "base_layer", modules[t]) for t in targets]
        # An init that moved the base is written as the equivalent plain LoRA of rank 2r against the
        # ORIGINAL base (A' = [A; A0], B' = [B, -B0], see LoRALayer.peft_state_dict), with alpha adjusted
        # so alpha / r (or alpha / sqrt(r)) is unchanged: what peft's own conversion writes.
        r, alpha = self.r, self.alpha
        if self.moves_base:
            r, alpha = 2 * self.r, self.alpha * (math.sqrt(2) if self.rslora else 2)
        return {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.rslora,
            "use_dora": False,
            "bias": "none",
            # peft transposes Conv1D deltas when this is set; it must reflect the targets' layout.
            "fan_in_fan_out": any(isinstance(layer, Conv1D) for layer in layers),
            "init_lora_weights": "gaussian" if self.init == "gaussian" else True,
        }

    @classmethod
    def reads_peft_config(cls, config: dict[str, Any]) -> bool:
        return super().reads_peft_config(config) and not config.get("use_dora")  # DoRA reads use_dora files

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> LoRA:
        require_peft_targets(config)
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_PEFT_BASE_MOVING_INITS):
            raise ValueError(
                f"this adapter was saved with init_lora_weights={init!r} and not converted: its tensors are relative "
                f"to base weights peft modified in place, so against the original model they are wrong. Save it "
                f"from peft with path_initial_model_for_weight_conversion=... (a rank-2r LoRA against the original base)"
            )
        # peft options this LoRA does not implement. Ignoring them would load without complaint and give
        # wrong outputs (alpha_pattern changes only the scale) or fail later with a confusing shape error.
        unsupported = {key: config[key] for key in _UNSUPPORTED_PEFT_FIELDS if config.get(key)}
        if config.get("bias") not in (None, "none"):
            unsupported["bias"] = config["bias"]
        if unsupported:
            fields = ", ".join(f"{key}={value!r}" for key, value in unsupported.items())
            raise ValueError(f"this adapter uses peft options lightning_peft's LoRA does not support: {fields}")
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
        self.init = config.init
        self.svd_niter = config.svd_niter
        device = _adapter_device(base_layer)
        # (r, in) and (out, r); for embeddings in=num_embeddings, out=embedding_dim.
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, config.r, dtype=torch.float32, device=device))
        if config.moves_base:
            # The initial factors, subtracted in forward; zero until an init fills them.
            self.register_buffer("lora_A0", torch.zeros_like(self.lora_A))
            self.register_buffer("lora_B0", torch.zeros_like(self.lora_B))
        else:
            self.lora_A0 = self.lora_B0 = None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 and self.kind != "embedding" else nn.Identity()
        self.reset_adapter()

    @property
    def has_initial_factors(self) -> bool:
        return self.lora_A0 is not None

    @torch.no_grad()
    def reset_adapter(self, init: LoRAInit | None = None) -> None:
        init = init or self.init
        if self.lora_A.is_meta:
            return  # materialised later (e.g. FSDP2 ``to_empty`` + ``reset_adapter``)
        if self.kind == "embedding":
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
            return
        if init == "pissa":
            self.set_initial_factors(*pissa_factors(self.linear_weight(), self.r, self.scaling, self.svd_niter))
        elif init == "olora":
            self.set_initial_factors(*olora_factors(self.linear_weight(), self.r))
        else:  # kaiming, gaussian, and lora_ga until its gradient estimate arrives
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
            if self.has_initial_factors:
                self.lora_A0.zero_()
                self.lora_B0.zero_()

    @torch.no_grad()
    def set_initial_factors(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Start the adapter at ``(A, B)`` and record them as the factors to subtract, so the layer's
        output is unchanged (only for layers built with a base-moving init)."""
        if not self.has_initial_factors:
            raise ValueError(f"this layer was built with init={self.init!r}, which keeps no initial factors")
        for target, value in ((self.lora_A, A), (self.lora_B, B), (self.lora_A0, A), (self.lora_B0, B)):
            target.copy_(value.to(device=target.device, dtype=target.dtype))

    def linear_weight(self) -> torch.Tensor:
        """The base weight as float32 in the (out, in) orientation of ``B @ A`` (dequantized if k-bit)."""
        weight = self.base_layer.weight
        if is_kbit_weight(weight):
            return dequantized_weight(self.base_layer)
        weight = weight.detach().float()
        return weight if self.kind == "linear" else weight.T

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return result
        if self.kind == "embedding" or self.has_initial_factors:
            # Lookups have no fused form; with initial factors, B A x - B0 A0 x must be formed first so it
            # is exactly zero at step 0, before it meets the (rounded) base output.
            return result + (self.lora_update(x) * self.scaling).to(result.dtype)
        return self.add_scaled_update(result, self.dropout(x))

    def add_scaled_update(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``result + s B A x`` in ``result``'s dtype, the last product fused with the sum (one ``addmm``)."""
        dtype = result.dtype
        down = F.linear(x.to(dtype), self.lora_A.to(dtype))  # (..., r)
        out = torch.addmm(
            result.reshape(-1, result.shape[-1]), down.reshape(-1, self.r), self.lora_B.to(dtype).T, alpha=self.scaling
        )
        return out.view(result.shape)

    def lora_update(self, x: torch.Tensor, dropout: bool = True) -> torch.Tensor:
        """``B A x`` (minus ``B0 A0 x`` for a base-moving init), unscaled, float32."""
        if self.kind == "embedding":
            base = self.base_layer
            # Look up columns of A as if A^T were an embedding table: (..., r).
            after_a = F.embedding(x, self.lora_A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
            return F.linear(after_a, self.lora_B)  # (..., dim)
        h = (self.dropout(x) if dropout else x).to(self.lora_A.dtype)
        update = F.linear(F.linear(h, self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        if self.has_initial_factors:
            # Two separate products rather than one of rank 2r: at step 0 the difference is exactly zero.
            update = update - F.linear(F.linear(h, self.lora_A0), self.lora_B0)
        return update

    def delta_weight(self) -> torch.Tensor:
        product = self.lora_B @ self.lora_A
        if self.has_initial_factors:
            product = product - self.lora_B0 @ self.lora_A0
        delta = product * self.scaling  # (out, in); embedding: (dim, num)
        # Linear stores (out, in); Conv1D (in, out) and Embedding (num, dim) store the transpose.
        return delta if self.kind == "linear" else delta.T

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        if self.kind == "embedding":
            return {"lora_embedding_A": self.lora_A, "lora_embedding_B": self.lora_B}
        if self.has_initial_factors:
            # The rank-2r adapter that is exact against the original base: s [B, -B0] [A; A0] = s (B A - B0 A0).
            return {
                "lora_A.weight": torch.cat([self.lora_A, self.lora_A0], dim=0),
                "lora_B.weight": torch.cat([self.lora_B, -self.lora_B0], dim=1),
            }
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    @torch.no_grad()
    def load_peft_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.has_initial_factors and self.kind != "embedding":
            A, B = tensors["lora_A.weight"], tensors["lora_B.weight"]
            r = self.r
            for target, value in ((self.lora_A, A[:r]), (self.lora_A0, A[r:]), (self.lora_B, B[:, :r]), (self.lora_B0, -B[:, r:])):
                target.copy_(value.to(target.dtype))
            return
        for key, param in LoRALayer.peft_state_dict(self).items():  # LoRA's own keys, also in subclasses
            param.copy_(tensors[key].to(param.dtype))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, scaling={self.scaling:g}, init={self.init}"

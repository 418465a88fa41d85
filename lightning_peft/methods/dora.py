"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, arXiv:2402.09353).

DoRA splits each weight row into a magnitude and a direction and lets LoRA move the direction::

    W' = m * (W + s B A) / n,      n = ||W + s B A||_row  (one norm per output unit)

``m`` (shape ``(out,)``) is trained and starts at ``||W||_row``, so ``W' = W`` at step 0. Following
the paper (section 4.3), ``n`` is treated as a constant in backpropagation (detached): the gradient
then needs no second pass through the full weight. With the bias left unscaled, the layer computes::

    y = (m / n) * (W x + s B A x) + b

which needs the base layer's output ``W x`` only once. Layer kinds are those of LoRA: ``nn.Linear``,
GPT-2 ``Conv1D`` (weight stored transposed) and ``nn.Embedding`` (one magnitude per embedding
dimension, the norm taken over the vocabulary, as peft does), on 16-bit or bitsandbytes k-bit bases.

What this implementation does not pay, unlike HF peft (whose DoRA step costs 1.5-1.6x its LoRA step on an
H100, against 1.2x here; ``benchmarks/RESULTS.md``):

- no second base matmul when dropout is off: ``W x`` is the base layer's own output (peft also
  reuses it then); with dropout active in training the ``(m/n - 1)`` term must see the dropped input,
  so that one case does pay ``W dropout(x)``, exactly as peft computes it;
- no full-weight rebuild: ``n^2 = ||W||^2 + 2 s <W, B A>_row + s^2 ||B A||^2_row`` is expanded so it
  needs only ``A W^T`` (r x out) and ``A A^T`` (r x r). ``||W||^2`` is computed once (the base is
  frozen). peft forms ``B A`` by multiplying with an (in x in) identity and then ``W + s B A``;
- a cache: ``n`` depends only on ``A``, ``B`` and ``W``, so it is kept until one of them changes
  (tracked by tensor version counters). Evaluation computes it once; gradient accumulation once per
  optimizer step rather than once per micro-batch;
- launches: in training the norm is recomputed every step, and its ~8 tiny kernels per layer cost the host
  more time than the GPU spends on them. On CUDA they are captured once and replayed as one graph
  (:mod:`lightning_peft.core.cuda_graph`);
- passes over the output: the update is added inside the base output's ``addmm`` (see LoRA), so the
  rescale by ``m / n`` is the only extra pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.core.adapter_layer import is_kbit_weight
from lightning_peft.core.cuda_graph import GraphedComputation
from lightning_peft.methods.lora import LoRA, LoRALayer


class DoRA(LoRA):
    """DoRA config: ``PEFTCallback(DoRA(r=8, alpha=16, target_modules="all-linear"))``.

    Takes LoRA's arguments; ``init`` must be ``"kaiming"`` or ``"gaussian"`` (the magnitude starts at
    the norm of ``W``, which assumes ``B A = 0`` at step 0).
    """

    name = "dora"
    peft_type = "LORA"  # peft writes DoRA as LoRA with use_dora: true
    # The magnitude starts at ||W||_row, the norm of the layer at step 0 only when B A starts at zero.
    supported_inits = ("kaiming", "gaussian")

    def wrap(self, name: str, module: nn.Module) -> DoRALayer:
        return DoRALayer(module, self)

    def peft_config(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        return {**super().peft_config(model, targets), "use_dora": True}

    @classmethod
    def reads_peft_config(cls, config: dict[str, Any]) -> bool:
        return "peft_type" in vars(cls) and config.get("peft_type") == cls.peft_type and bool(config.get("use_dora"))



class DoRALayer(LoRALayer):
    """A LoRA layer whose output rows are rescaled to the trained magnitude; see the module docstring."""

    def __init__(self, base_layer: nn.Module, config: DoRA) -> None:
        super().__init__(base_layer, config)
        weight = self.linear_weight()  # (out, in) float32
        # ||W||^2 per row: W is frozen, so computed once (recomputed if the weight tensor is replaced
        # or changed in place, see _squared_row_norms).
        # Caches keyed by what they depend on, one per inference-mode state: a tensor made under
        # torch.inference_mode (Lightning's validation) must never reach autograd in training.
        self._weight_sq: dict[bool, tuple[tuple[int, int], torch.Tensor]] = {}
        self._norm_cache: dict[bool, tuple[tuple[int, ...], torch.Tensor]] = {}
        self._merged_norm: torch.Tensor | None = None
        # On CUDA the norm's ~10 small kernels replay as one graph (see lightning_peft.core.cuda_graph).
        self._norm_graph = GraphedComputation()
        self.lora_magnitude_vector = nn.Parameter(self._row_norm(weight))

    # -- the norm ---------------------------------------------------------------------------------
    def _row_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``||weight + s B A||_row`` formed directly, float32 (used at init and for merging)."""
        A, B = self.lora_A.detach().to(weight.device), self.lora_B.detach().to(weight.device)
        return torch.linalg.norm(weight + self.scaling * (B @ A), dim=1)

    def _base_key(self) -> tuple[int, int]:
        weight = self.base_layer.weight
        return (weight.data_ptr(), weight._version)

    def _squared_row_norms(self) -> torch.Tensor:
        key, mode = self._base_key(), torch.is_inference_mode_enabled()
        cached = self._weight_sq.get(mode)
        if cached is None or cached[0] != key:
            cached = self._weight_sq[mode] = (key, self.linear_weight().square().sum(dim=1))
        return cached[1]

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """``n = ||W + s B A||_row`` (detached), from the expansion in the module docstring, cached."""
        A, B = self.lora_A, self.lora_B
        key, mode = (A._version, B._version, A.data_ptr(), B.data_ptr(), *self._base_key()), torch.is_inference_mode_enabled()
        cached = self._norm_cache.get(mode)
        if cached is not None and cached[0] == key:
            return cached[1]
        squared_weight = self._squared_row_norms()  # made before any capture, so it lives outside the graph
        weight = self.base_layer.weight
        compute = lambda: self._compute_norm(squared_weight)  # noqa: E731
        # k-bit weights are dequantized by bitsandbytes inside the computation; not captured, run eagerly.
        norm = compute() if is_kbit_weight(weight) else self._norm_graph(compute, (A, B, weight, squared_weight))
        self._norm_cache[mode] = (key, norm)
        return norm

    def _compute_norm(self, squared_weight: torch.Tensor) -> torch.Tensor:
        """``sqrt(||W||^2 + rowsum(B * (2 s (A W^T)^T + s^2 B A A^T)))`` in as few kernels as the math allows."""
        A, B, s = self.lora_A, self.lora_B, self.scaling
        weight = self.base_layer.weight
        if not is_kbit_weight(weight):
            # A W^T without a float32 copy of W: W's own dtype, float32 accumulate, result cast up.
            stored = weight.detach()
            projected = (A.to(stored.dtype) @ (stored.T if self.kind == "linear" else stored)).to(A.dtype)  # (r, out)
        else:
            projected = A @ self.linear_weight().T  # k-bit: dequantize (the only full-size temporary)
        # (out, r): 2 s (A W^T)^T + s^2 B (A A^T), one addmm; then each row's dot with B, plus ||W_i||^2,
        # as one batched (1 x r)(r x 1) product.
        combined = torch.addmm(projected.T, B, A @ A.T, beta=2 * s, alpha=s * s)
        rows = B.shape[0]
        squared = torch.baddbmm(squared_weight.to(A.dtype).view(rows, 1, 1), B.view(rows, 1, -1), combined.view(rows, -1, 1))
        return squared.view(rows).clamp_min_(0).sqrt_()

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return result
        exact_scale = self.lora_magnitude_vector / self.weight_norm()  # (out,) float32; gradient to m only
        scale = exact_scale.to(result.dtype)
        bias = getattr(self.base_layer, "bias", None) if self.kind != "embedding" else None
        bias = None if bias is None else bias.to(result.dtype)
        dropout_active = self.training and isinstance(self.dropout, nn.Dropout)
        if not dropout_active:
            if self.kind == "embedding":
                combined = result + (self.lora_update(x, dropout=False) * self.scaling).to(result.dtype)
            else:
                combined = self.add_scaled_update(result, x)  # W x + b + s B A x, one fused addmm
            if bias is None:
                return combined * scale
            # scale (W x + s B A x) + b  ==  scale * combined + (1 - scale) b: one pass over the output.
            return torch.addcmul(bias * (1 - exact_scale).to(result.dtype), combined, scale)
        # Dropout in training: the rescaled base term must see the dropped input (peft's formula), which
        # costs the second base product: y = base(x) + (m/n - 1) W d(x) + (m/n) s B A d(x).
        dropped = self.dropout(x)
        stored = self.base_layer.weight
        # k-bit (4-bit or int8) weights are dequantized; others are used as stored, without a float32 copy.
        weight = self.linear_weight() if is_kbit_weight(stored) else self._to_linear(stored)
        base_dropped = F.linear(dropped.to(weight.dtype), weight)
        update = self.lora_update(dropped, dropout=False) * self.scaling
        extra = (exact_scale - 1).to(result.dtype) * base_dropped.to(result.dtype) + scale * update.to(result.dtype)
        return result + extra

    # -- merging ----------------------------------------------------------------------------------
    def _to_linear(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if self.kind == "linear" else weight.T

    def _unit_rows(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W + dW, ||W + dW||_row)`` in the linear orientation, for ``W`` in the base's layout."""
        linear = self._to_linear(weight) + self._to_linear(self.delta_weight().to(weight.device))
        return linear, torch.linalg.norm(linear, dim=1)

    def _rescaled(self, linear: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        factor = self.lora_magnitude_vector.detach().to(linear.device) / norm
        return self._to_linear(factor[:, None] * linear)

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``m / ||W + dW||_row * (W + dW)`` for the given ``W`` (float32, base layout)."""
        return self._rescaled(*self._unit_rows(weight))

    @torch.no_grad()
    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        if self._merged_norm is None:
            raise ValueError("this DoRA layer has no record of the norm it was merged with, so it cannot be unmerged exactly")
        factor = self.lora_magnitude_vector.detach().to(merged.device) / self._merged_norm.to(merged.device)
        linear = self._to_linear(merged) / factor[:, None] - self._to_linear(self.delta_weight().to(merged.device))
        return self._to_linear(linear)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        linear, norm = self._unit_rows(self._base_weight_float())
        self._set_base_weight(self._rescaled(linear, norm))
        # Kept for unmerge: the merged weight no longer tells what ||W + dW|| was.
        self._merged_norm = norm
        self.merged = True

    def unmerge(self) -> None:
        super().unmerge()
        self._merged_norm = None

    # -- peft file format -------------------------------------------------------------------------
    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().peft_state_dict(), "lora_magnitude_vector": self.lora_magnitude_vector}

    @torch.no_grad()
    def load_peft_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_peft_state_dict({k: v for k, v in tensors.items() if k != "lora_magnitude_vector"})
        self.lora_magnitude_vector.copy_(tensors["lora_magnitude_vector"].to(self.lora_magnitude_vector.dtype))

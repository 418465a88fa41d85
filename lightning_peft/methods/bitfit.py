"""BitFit: Ben Zaken, Goldberg and Ravfogel, 2021, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models" (arXiv:2106.10199).

Only the bias terms are trained (plus, usually, the new task head). The paper trains every bias of
BERT (attention query/key/value and output, feed-forward, LayerNorm) and shows that a subset, the
query biases and the feed-forward's first-layer biases, does almost as well; ``target_modules``
selects such a subset: ``BitFit(target_modules=["query", "intermediate.dense"])``.

Each selected layer is wrapped and learns a change to its bias, starting at zero::

    y = layer(x) + delta_b          delta_b: (out,) float32, zero at init

This is the paper's update (the gradient of ``delta_b`` is the gradient of ``b``) in the form every
other method here has: the trained tensors live beside the frozen base layer, not in it. So the base
stays intact and fingerprinted (the adapter refuses another base), adapter-only checkpoints, export,
``disable_adapters`` and parameter counts work unchanged, and the adapter file holds only the changes
to the selected biases (in lightning_peft's own format; HF peft has no BitFit). Merging adds
``delta_b`` to each bias: ``merge_adapters`` or ``save_merged`` give a plain transformers model with
the trained biases. One difference from training ``b`` in place: weight decay pulls the bias towards
its pretrained value rather than towards zero.

Layers whose bias is added to the last dimension of their output are supported: ``nn.Linear``,
GPT-2 ``Conv1D`` and ``nn.LayerNorm``. Llama-style models have no biases at all: BitFit has nothing to
train there and says so.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_peft.core.adapter_layer import AdapterLayer, is_kbit_weight
from lightning_peft.core.targets import exact_names_pattern, output_head_names
from lightning_peft.methods.base import PEFTMethod


def _bias_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D, nn.LayerNorm)


class BitFit(PEFTMethod):
    """BitFit config: ``PEFTCallback(BitFit(modules_to_save=["classifier"]))``.

    Args:
        target_modules: ``None`` for every bias of the model except the output head's; else the layers
            whose bias trains (names or a full-name regex), e.g. ``["query", "intermediate.dense"]``.
        exclude_modules: names or regex removed from the targets.
        modules_to_save: modules trained in full (e.g. the new ``["classifier"]``).

    Example::

        >>> BitFit(target_modules=["query", "intermediate.dense"]).target_modules
        ['query', 'intermediate.dense']
    """

    name = "bitfit"
    has_peft_format = False
    supported_description = "nn.Linear, transformers Conv1D and nn.LayerNorm layers that have a bias"

    def supports(self, module: nn.Module) -> bool:
        bias = getattr(module, "bias", None)
        weight = getattr(module, "weight", None)
        # k-bit linears are left out: merging must not requantize a weight just to change a bias.
        return isinstance(module, _bias_types()) and isinstance(bias, torch.Tensor) and not (weight is not None and is_kbit_weight(weight))

    def find_targets(self, model: nn.Module) -> list[str]:
        spec = self.target_modules
        if spec is None:
            spec = exact_names_pattern(self._all_biases(model))
        return self.select_targets(model, spec)

    def _all_biases(self, model: nn.Module) -> list[str]:
        """Every supported layer with a bias, except the output head(s) (new task heads are trained in full
        through ``modules_to_save``, and an LM head's bias is part of the vocabulary projection)."""
        heads = output_head_names(model)
        in_head = [h + "." for h in heads]
        names = [n for n, m in model.named_modules() if n and n not in heads and not any(n.startswith(h) for h in in_head)]
        modules = dict(model.named_modules())
        selected = [n for n in names if self.supports(modules[n])]
        others = [n for n in names if not self.supports(modules[n]) and isinstance(getattr(modules[n], "bias", None), nn.Parameter)]
        if others:
            # A bias on a layer kind this wrapper does not know (e.g. a convolution): say it stays frozen.
            rank_zero_warn(f"BitFit leaves the biases of {len(others)} unsupported layers frozen (e.g. {others[:3]})")
        if not selected:
            raise ValueError(
                f"BitFit found no bias to train in {type(model).__name__}: it has no {self.supported_description} "
                f"outside the output head (Llama-style models are bias-free). Use another method, e.g. IA3() or LoRA()"
            )
        return selected

    def wrap(self, name: str, module: nn.Module) -> BitFitLayer:
        return BitFitLayer(module)


class BitFitLayer(AdapterLayer):
    """``base_layer`` whose bias is shifted by a trained float32 ``bias_delta`` (zero at init)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        bias = base_layer.bias
        self.bias_delta = nn.Parameter(torch.zeros(bias.shape, dtype=torch.float32, device=bias.device))  # (out,)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)  # (..., out)
        if self.disabled or self.merged:
            return result
        return result + self.bias_delta.to(result.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight  # only the bias changes

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        return merged

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias + self.bias_delta.to(bias.device)

    def unmerged_bias(self, merged: torch.Tensor) -> torch.Tensor:
        return merged - self.bias_delta.to(merged.device)

    def extra_repr(self) -> str:
        return f"bias_size={self.bias_delta.numel()}"

"""The spectrum of a learned weight perturbation: Biderman et al., 2024, "LoRA Learns Less and Forgets Less"
(arXiv:2405.09673), section 6.

For each adapted matrix the perturbation is ``delta W = W_finetuned - W_base``: for a mergeable method, the
merged weight minus the base weight (LoRA's ``s B A``; DoRA's rescaled merge minus ``W``, which is not additive;
(IA)3's column or row scaling minus ``W``); for full fine-tuning, the fine-tuned matrix minus the base model's.
Its singular values ``s_1 >= s_2 >= ...`` say how many directions the fine-tune moved the matrix in. The paper's
summary number is the *rank needed to explain 90% of the energy*: the smallest ``k`` with
``s_1^2 + ... + s_k^2 >= 0.9 * sum_i s_i^2``. It finds full fine-tuning's perturbations 10-100x higher in rank
than typical LoRA configurations, and growing with training. Everything here is computed in float32 on the
merged weights (k-bit bases dequantized first), as the paper does.

An adapter directory is measured by loading it into a copy of its base model first::

    spectra = weight_spectrum(load_adapter(copy.deepcopy(base), "out/adapter"))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lightning_peft.core.adapter_layer import AdapterLayer, adapter_layers, adapter_modules
from lightning_peft.quantization.layers import dequantized_weight, is_quantized_linear


@dataclass(frozen=True)
class WeightSpectrum:
    """The singular values of one matrix's perturbation, and the ranks read from them.

    ``rank`` is the numerical rank (singular values above ``max(m, n) * eps * s_1``, the tolerance of
    ``torch.linalg.matrix_rank``): exactly ``r`` for a rank-``r`` LoRA update. ``rank_90`` is the paper's
    energy rank at 90% (0 for a matrix that did not move).
    """

    name: str
    shape: tuple[int, int]
    singular_values: torch.Tensor  # (min(m, n),) float32, descending
    rank: int
    rank_90: int

    def energy_rank(self, fraction: float) -> int:
        """The smallest ``k`` whose top ``k`` singular values hold ``fraction`` of ``sum s_i^2``."""
        return energy_rank(self.singular_values, fraction)


def energy_rank(singular_values: torch.Tensor, fraction: float = 0.9) -> int:
    """The smallest ``k`` with ``sum_{i<=k} s_i^2 >= fraction * sum_i s_i^2`` (``s`` descending); 0 if all are 0."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the energy fraction must be in (0, 1], got {fraction}")
    energy = singular_values.double() ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 0
    # A small relative slack so that fraction=1.0 is reached despite the rounding of the running sum.
    reached = torch.cumsum(energy, 0) >= fraction * total * (1 - 1e-12)
    return int(reached.nonzero()[0]) + 1


def spectrum_of(name: str, delta: torch.Tensor) -> WeightSpectrum:
    """The :class:`WeightSpectrum` of one perturbation matrix (any float dtype; computed in float32)."""
    delta = delta.detach().float()
    if delta.ndim != 2:
        raise ValueError(f"{name!r}: a weight perturbation must be a matrix, got shape {tuple(delta.shape)}")
    values = torch.linalg.svdvals(delta)
    tolerance = max(delta.shape) * torch.finfo(torch.float32).eps * (float(values[0]) if values.numel() else 0.0)
    rank = int((values > tolerance).sum()) if values.numel() and float(values[0]) > 0 else 0
    return WeightSpectrum(name, (int(delta.shape[0]), int(delta.shape[1])), values.cpu(), rank, energy_rank(values, 0.9))


def _unmerged_base_weight(layer: AdapterLayer) -> torch.Tensor:
    """The layer's base weight without its adapter, float32 (dequantized for a k-bit base)."""
    base = layer.base_layer
    weight = dequantized_weight(base) if is_quantized_linear(base) else base.weight.detach().float()
    return layer.unmerged_weight(weight) if layer.merged else weight




def layer_perturbation(name: str, layer: AdapterLayer) -> torch.Tensor:
    """``merged weight - base weight`` (float32) of one adapter layer.

    For an additive method this is ``delta_weight()`` itself: subtracting ``W`` from ``W + delta`` in float32 would
    add rounding noise of about ``eps * |W|`` to a matrix that may be far smaller than ``W``.
    """
    kind = type(layer)
    try:
        if kind.merged_weight is AdapterLayer.merged_weight:  # merges as W + delta_weight() (LoRA, SparseFT)
            if kind.delta_weight is AdapterLayer.delta_weight:
                return torch.zeros_like(_unmerged_base_weight(layer))  # changes only biases (BitFit, ITI)
            return layer.delta_weight().float()
        weight = _unmerged_base_weight(layer)  # a merge rule of its own: DoRA's rescaling, (IA)3's scaling
        return layer.merged_weight(weight) - weight
    except (ValueError, RuntimeError, NotImplementedError) as error:
        raise ValueError(f"cannot take the weight perturbation of {name!r} ({type(layer).__name__}): {error}") from error


@torch.no_grad()
def adapter_perturbations(model: nn.Module) -> dict[str, torch.Tensor]:
    """``merged weight - base weight`` (float32) for every adapter layer of ``model`` with a matrix weight.

    Refuses a model whose adapters cannot merge (prompt tuning, bottleneck adapters, ...): their change is not a
    weight perturbation, so there is no spectrum to take. Layers whose weight is not a matrix (BitFit on a
    LayerNorm) are left out; a method that changes only biases (BitFit, ITI) gives all-zero spectra, which is
    what it did to the weights.
    """
    modules = list(adapter_modules(model))
    if not modules:
        raise ValueError(f"{type(model).__name__} has no adapters; for full fine-tuning pass the base model: weight_spectrum(finetuned, base=base)")
    unmergeable = sorted({type(module).__name__ for _, module in modules if not module.can_merge})
    if unmergeable:
        raise ValueError(
            f"weight_spectrum needs a method whose update merges into the weights (LoRA, DoRA, (IA)3, SparseFT, ...); "
            f"{', '.join(unmergeable)} cannot merge, so its change is not a weight perturbation"
        )
    return {
        name: layer_perturbation(name, layer)
        for name, layer in adapter_layers(model)
        if getattr(layer.base_layer, "weight", None) is not None and layer.base_layer.weight.ndim == 2
    }


@torch.no_grad()
def finetuning_perturbations(model: nn.Module, base: nn.Module) -> dict[str, torch.Tensor]:
    """``W_finetuned - W_base`` (float32) for every matrix (2-D floating parameter) the two models share.

    Matrices must have the same names and shapes in both, so ``base`` is the model the fine-tune started from.
    """
    base_parameters = dict(base.named_parameters())
    deltas: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if param.ndim != 2 or not param.is_floating_point():
            continue
        if name not in base_parameters:
            raise ValueError(f"the fine-tuned model's matrix {name!r} is not in the base model; pass the model the fine-tune started from")
        reference = base_parameters[name]
        if reference.shape != param.shape:
            raise ValueError(f"{name!r} is {tuple(param.shape)} in the fine-tuned model but {tuple(reference.shape)} in the base")
        deltas[name.removesuffix(".weight")] = param.detach().float() - reference.detach().float().to(param.device)
    if not deltas:
        raise ValueError(f"{type(model).__name__} has no floating-point matrices to compare with the base")
    return deltas


def weight_spectrum(model_or_adapter: nn.Module, base: nn.Module | None = None) -> dict[str, WeightSpectrum]:
    """Per adapted matrix, the singular values of the learned perturbation and the rank for 90% of its energy.

    Args:
        model_or_adapter: a model with adapters (or a single mergeable adapter layer): the perturbation is each
            adapter's merged delta. Or, with ``base``, a fully fine-tuned model.
        base: the model full fine-tuning started from (same architecture); only for a model without adapters.

    Returns ``{matrix name: WeightSpectrum}`` in the model's module order (adapter layers are named as in the
    model, full fine-tuning's matrices by their module, e.g. ``model.layers.0.self_attn.q_proj``).

    Example::

        lora = weight_spectrum(lora_model)                       # {name: WeightSpectrum(rank=8, rank_90=..)}
        full = weight_spectrum(finetuned_model, base=base_model)
        print(sum(s.rank_90 for s in full.values()) / len(full))
    """
    if isinstance(model_or_adapter, AdapterLayer):
        if not model_or_adapter.can_merge:
            raise ValueError(f"{type(model_or_adapter).__name__} cannot merge, so its change is not a weight perturbation")
        return {"adapter": spectrum_of("adapter", layer_perturbation("adapter", model_or_adapter))}
    has_adapters = next(adapter_modules(model_or_adapter), None) is not None
    if base is not None and has_adapters:
        raise ValueError(
            "base= is for a fully fine-tuned model; this model has adapters, whose perturbation is their own merged "
            "delta: call weight_spectrum(model) without base"
        )
    if base is None and not has_adapters:
        raise ValueError(
            f"{type(model_or_adapter).__name__} has no adapters, so its perturbation is W_finetuned - W_base: "
            f"pass the model the fine-tune started from as base="
        )
    deltas = adapter_perturbations(model_or_adapter) if base is None else finetuning_perturbations(model_or_adapter, base)
    return {name: spectrum_of(name, delta) for name, delta in deltas.items()}

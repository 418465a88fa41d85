"""LoRA-GA's gradient estimate (Wang et al., 2024, arXiv:2407.05000, Algorithm 1).

LoRA-GA initialises each adapter from the SVD of the full-weight gradient ``G = dL/dW`` averaged over a
few training batches (:func:`lightning_peft.methods.lora_init.lora_ga_factors`). The base is frozen,
so ``W`` has no gradient to read; but for ``y = W x``, ``dL/dW = sum_t g_t x_t^T`` with ``g = dL/dy``
at the layer's output. We record each adapted layer's input in a forward hook and multiply it by the
output gradient as it arrives, so:

- ``W`` never needs ``requires_grad`` (peft's version does that, and so refuses quantized layers): a
  4-bit base works unchanged, its gradient being the one through the dequantized weights it computes
  with;
- nothing but one float32 (out x in) accumulator per adapted layer is added. That is a float32 copy of
  the adapted weights for the duration of the estimate (4 GB for a 1B model's linears): the price of the
  method, paid once.

For ``y`` to carry a gradient while everything is frozen, the adapters' ``B`` keeps ``requires_grad``
during the estimate; ``B`` is zero, so the output is unchanged, and its ``.grad`` is discarded.

The hook machinery (:func:`accumulate_weight_gradients`) is not LoRA's: sparse fine-tuning
(:mod:`lightning_peft.methods.sparse_ft`) scores its candidate entries with the same per-batch gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_peft.methods.lora_init import lora_ga_factors

if TYPE_CHECKING:  # annotations only: lora.py imports this module (LoRA.initialise_from_data)
    from lightning_peft.methods.lora import LoRALayer


def accumulate_weight_gradients(
    model: nn.Module,
    layers: dict[str, nn.Module],
    carriers: Iterable[nn.Parameter],
    batches: Iterable[Any],
    loss_fn: Callable[[Any], torch.Tensor],
    on_gradient: Callable[[str, torch.Tensor, torch.Tensor], None],
    method_name: str = "LoRA-GA",
) -> int:
    """Run forward and backward on each batch and hand every layer's weight gradient, in factored form, to
    ``on_gradient(name, g, x)``: ``g`` (tokens, out) and ``x`` (tokens, in), float32, with ``dL/dW = g^T x``
    for that layer and batch. Returns the number of batches.

    Every parameter of ``model`` is frozen for the duration except ``carriers``: parameters of the adapter
    layers that give each layer's output a gradient path without changing it (LoRA's zero ``B``, sparse
    fine-tuning's zero values); their gradients are discarded. ``loss_fn(batch)`` runs the forward pass and
    returns the scalar loss; this function calls backward. Each layer must be on the loss's path exactly once
    per batch (a layer called twice has no single ``x`` and ``g``).
    """
    counts = dict.fromkeys(layers, 0)

    def record(name: str) -> Callable[..., None]:
        def forward_hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            if not output.requires_grad:
                return  # a no-grad forward (e.g. reentrant checkpointing's first pass): its recompute is hooked
            x = args[0].detach()

            def accumulate(grad: torch.Tensor) -> None:
                counts[name] += 1
                on_gradient(name, grad.reshape(-1, grad.shape[-1]).float(), x.reshape(-1, x.shape[-1]).float())

            output.register_hook(accumulate)

        return forward_hook

    carriers = list(carriers)
    requires_grad = {param: param.requires_grad for param in model.parameters()}
    handles = [layer.register_forward_hook(record(name)) for name, layer in layers.items()]
    try:
        for param in model.parameters():
            param.requires_grad_(False)
        for param in carriers:
            param.requires_grad_(True)  # zero-valued: the output is unchanged, but now carries a gradient
        n_batches = 0
        with torch.enable_grad():
            for batch in batches:
                loss_fn(batch).backward()
                n_batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)
            param.grad = None
        for param in carriers:
            param.grad = None
    unseen = [name for name, count in counts.items() if count != n_batches]
    if unseen:
        raise RuntimeError(
            f"{method_name} saw gradients for {unseen[:3]} {[counts[n] for n in unseen[:3]]} times over {n_batches} batches; "
            f"every adapted layer must be on the loss's path exactly once per batch"
        )
    return n_batches


def estimate_weight_gradients(
    model: nn.Module, layers: dict[str, LoRALayer], batches: Iterable[Any], loss_fn: Callable[[Any], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``dL/dW`` (out x in, float32) of each layer's base weight, averaged over ``batches``.

    ``loss_fn(batch)`` runs the forward pass and returns the scalar loss; this function calls backward.
    """
    sums = {name: layer.lora_B.new_zeros(layer.lora_B.shape[0], layer.lora_A.shape[1]) for name, layer in layers.items()}  # (out, in)

    def add(name: str, g: torch.Tensor, x: torch.Tensor) -> None:
        sums[name].addmm_(g.T, x)  # sum over every token of g_t x_t^T

    n_batches = accumulate_weight_gradients(model, dict(layers), [layer.lora_B for layer in layers.values()], batches, loss_fn, add)
    return {name: total / n_batches for name, total in sums.items()}


@torch.no_grad()
def initialise_from_gradients(
    layers: dict[str, LoRALayer],
    gradients: dict[str, torch.Tensor],
    r: int,
    gamma: float,
    niter: int | None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Set every layer's ``(A, B)`` (and ``A0, B0``) from its gradient estimate.

    ``reduce`` (e.g. an all-reduce mean across ranks) is applied to each estimate first, so every
    process of a distributed run computes the same factors from the same averaged gradient.
    """
    for name, layer in layers.items():
        gradient = gradients[name]
        if reduce is not None:
            gradient = reduce(gradient)
        layer.set_initial_factors(*lora_ga_factors(gradient, r, gamma, niter))

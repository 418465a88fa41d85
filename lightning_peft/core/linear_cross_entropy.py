"""Cross-entropy through the output head, chunk by chunk, without ever holding the (tokens x vocab) logits.

A causal LM's loss is ``mean_n [logsumexp(W h_n + b) - (W h_n + b)[y_n]]`` over the ``N`` scored tokens, with
``W`` the (vocab ``V``, hidden ``H``) output head. Computed the plain way (``logits = lm_head(h)``, then
``cross_entropy``) it holds the float32 logits (N x V), the log-softmax autograd saves (N x V) and, in backward,
their gradient (N x V): at SmolLM2's vocabulary (49,152) a 4 x 1024 batch is 805 MB per copy, and at a 128K
vocabulary the logits outweigh a 4-bit 8B model's activations. The gradient needs none of that at once::

    p_n          = softmax(W h_n + b)                       (V,)   one chunk of rows at a time
    dL/dz_n      = (p_n - onehot(y_n)) / N                  (V,)   the logits' gradient, never kept
    dL/dh_n      = W^T dL/dz_n                              (H,)
    dL/dW       += dL/dz_n h_n^T,   dL/db += dL/dz_n        only when the head is trained (full fine-tuning)

So this loss computes the gradients *in the forward pass*, chunk by chunk, and keeps only ``dL/dh`` (N x H, the
size of the hidden states) and, for a trained head, ``dL/dW`` (the size of the weight, which its ``.grad`` is
anyway); backward scales them by the incoming gradient. Each chunk is about 64 MiB of float32 logits, so the
loss's memory no longer grows with the number of tokens. The FLOPs are the plain loss's: the logits product,
``dL/dh`` and (trained head only) ``dL/dW``, each once. Recomputing the logits in backward instead (Liger's
and cut-cross-entropy's choice, which wastes nothing when the loss is not backpropagated) would add a third
of the head's FLOPs to every training step; a validation step, which never needs a gradient, skips the
gradient products here (grad mode off).

Rows whose target is ``ignore_index`` (-100: prompts and padding of chat data) are dropped before the head:
the plain loss computes their logits and multiplies their gradient by zero. On chat data, where most tokens
are prompt, that is most of the head's work.

Numerics follow the plain loss exactly: the head's product runs in the hidden states' dtype (as ``lm_head``
does), the softmax in float32 (as transformers' loss upcasts), and the logits' gradient is cast back to the
hidden dtype before the two products (the backward of that upcast). The only difference is the order of the
sums over chunks, so gradients agree within float32 rounding (``tests/test_linear_cross_entropy.py``).

Why our own (pure torch, every device) rather than a library, as of 2026-12 (``docs/performance.md``):
``cut-cross-entropy`` (Wijmans et al. 2024, arXiv:2411.09009) backpropagates in bf16/fp16 only, needs an
Ampere+ GPU, filters small gradients by default (approximate) and has a non-standard licence; ``liger-kernel``'s
fused linear cross-entropy (BSD-2) is Triton only (no CPU path) and recomputes in backward.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

#: The label value every Hugging Face loss (and torch's cross_entropy) skips.
IGNORE_INDEX = -100
#: Float32 logits per chunk: small against a model's activations, large enough for full-speed products.
CHUNK_BYTES = 64 * 2**20


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so that a chunk's float32 logits take about :data:`CHUNK_BYTES` (341 at vocab 49,152)."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``F.linear(hidden, weight, bias)`` against ``targets`` (all valid), gradients
    computed in forward (module docstring). ``wants`` says which of hidden/weight/bias need a gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,  # (N, H), only scored rows
        weight: torch.Tensor,  # (V, H)
        bias: Optional[torch.Tensor],  # (V,)
        targets: torch.Tensor,  # (N,) in [0, V)
        chunk_rows: int,
        wants: tuple[bool, bool, bool],
    ) -> torch.Tensor:
        n = hidden.shape[0]
        want_hidden, want_weight, want_bias = wants
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # Summed in float32 over chunks: a 16-bit running sum would round at every chunk.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias and bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # Float32 factors take the mean's 1/N in their (smaller) products; 16-bit ones take it before the cast,
        # where the plain loss's gradient has it, so that they round as it does.
        fold_scale = hidden.dtype in (torch.float32, torch.float64)
        for start in range(0, n, chunk_rows):
            h = hidden[start : start + chunk_rows]  # (C, H)
            t = targets[start : start + chunk_rows]  # (C,)
            # The head in its own dtype, the softmax in float32 (as transformers upcasts); one fused kernel.
            log_probs = torch.log_softmax(F.linear(h, weight, bias).float(), dim=-1)  # (C, V)
            total -= log_probs.gather(1, t[:, None]).sum()
            if not any(wants):
                continue
            grad = log_probs.exp_()  # softmax, in place (C, V)
            grad[torch.arange(t.numel(), device=t.device), t] -= 1.0  # dL/dz = p - onehot(y), times 1/N below
            scale = 1.0 / n
            if not fold_scale:
                grad.mul_(scale)
                scale = 1.0
            grad = grad.to(h.dtype)  # the backward of the plain loss's .float()
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[start : start + chunk_rows])  # (C, H)
                if scale != 1.0:
                    grad_hidden[start : start + chunk_rows].mul_(scale)
            if grad_weight is not None:
                # In float32 from the 16-bit factors: what one 16-bit product over all rows accumulates in,
                # where a 16-bit product per chunk would round every chunk's partial sum.
                grad_weight.addmm_(grad.t().float(), h.float(), alpha=scale)  # (V, H)
            if grad_bias is not None:
                grad_bias.add_(grad.float().sum(0), alpha=scale)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total / n

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        saved = iter(ctx.saved_tensors)
        grads = []
        for present, dtype in zip(ctx.present, ctx.dtypes):
            grads.append((next(saved) * grad_output).to(dtype) if present else None)
        return (*grads, None, None, None)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=...)`` (the mean over
    the scored targets), chunk by chunk: the (tokens x vocab) logits are never held (module docstring).

    Args:
        hidden: (..., H) the head's inputs (already aligned with ``targets``: for a causal LM, position ``t``
            predicts token ``t + 1``).
        weight: (V, H) the output head's weight; ``bias``: its (V,) bias, if any.
        targets: (...) token ids in ``[0, V)``, or ``ignore_index`` for positions that are not scored.
        chunk_rows: scored rows per chunk (default :func:`default_chunk_rows`: ~64 MiB of float32 logits).

    Returns the scalar mean loss in float32; ``nan`` when no target is scored (0/0, as the plain loss).
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not align: need (..., H) and (...)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} is not (vocab, {hidden.shape[-1]}) for hidden states of size {hidden.shape[-1]}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows <= 0):
        raise ValueError(f"chunk_rows must be a positive integer (e.g. 256), got {chunk_rows!r}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    scored = (targets != ignore_index).nonzero().squeeze(1)  # one host sync, as the plain loss's mean has
    if scored.numel() == 0:
        return (hidden.sum() * 0.0).float() / 0.0  # nan, still connected to the graph, as the plain loss
    targets = targets.index_select(0, scored)
    low, high = int(targets.min()), int(targets.max())
    vocab = weight.shape[0]
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(
            f"target token id {bad} is outside the head's vocabulary [0, {vocab}) (ids come from a different tokenizer, or an "
            f"ignored position is not marked {ignore_index})"
        )
    if scored.numel() != hidden.shape[0]:
        hidden = hidden.index_select(0, scored)  # (N_scored, H): unscored rows never reach the head
    grad_on = torch.is_grad_enabled()
    wants = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows or default_chunk_rows(vocab), wants)

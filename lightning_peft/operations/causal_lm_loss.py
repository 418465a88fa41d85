"""A Hugging Face causal LM's training loss without its (tokens x vocab) logits.

``model(input_ids, labels=labels).loss`` builds the float32 logits of every position, then the loss. Here the
model runs with its output head (``get_output_embeddings()``) answering with its *input*, so ``output.logits``
holds the final hidden states; :func:`~lightning_peft.core.linear_cross_entropy.linear_cross_entropy` then
applies the head's weight chunk by chunk. Everything else in the model's forward (hooks of prompt tuning and
LLaMA-Adapter, gradient checkpointing, ``logits_to_keep``'s slice, a k-bit base) runs as it always does.

That is exact only when the head is the model's last step. :func:`lean_loss_obstacle` names what would make
it wrong, and :func:`check_head_is_last` catches the rest on a real batch (a model that scales or soft-caps
its logits after the head, as Gemma 2 and Cohere do): a caller falls back to the plain loss or refuses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_peft.core.linear_cross_entropy import IGNORE_INDEX, linear_cross_entropy


def output_head(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def lean_loss_obstacle(model: nn.Module) -> Optional[str]:
    """Why the chunked loss cannot stand in for ``model(..., labels=...).loss``, or ``None`` when it can."""
    head = output_head(model)
    if head is None:
        return f"{type(model).__name__} has no output head (get_output_embeddings() is None)"
    # A subclass with its own forward (bitsandbytes' Linear4bit/Linear8bitLt) or an adapter wrapping the head
    # (LoRA on lm_head, modules_to_save) computes something other than F.linear(h, weight, bias).
    if type(head).forward is not nn.Linear.forward or not isinstance(head, nn.Linear):
        return f"its output head is a {type(head).__name__}, not a plain nn.Linear (an adapted or quantized head)"
    if not head.weight.is_floating_point():
        return f"its output head's weight is {head.weight.dtype} (quantized)"
    if head._forward_hooks or head._forward_pre_hooks:
        return "its output head has forward hooks, which expect logits"
    config = getattr(model, "config", None)
    if getattr(config, "output_router_logits", False):
        return "it adds a mixture-of-experts router loss to its loss (output_router_logits=True)"
    return None


@contextlib.contextmanager
def head_returns_input(head: nn.Module, record: Optional[list] = None) -> Iterator[None]:
    """Within the block, ``head(x)`` returns ``x`` (or, with ``record``, computes as usual and appends its
    output to it). The instance attribute shadows the class's ``forward`` and is removed after."""
    original = type(head).forward

    def passthrough(x: torch.Tensor) -> torch.Tensor:
        if record is None:
            return x
        record.append(original(head, x))
        return record[-1]

    head.forward = passthrough
    try:
        yield
    finally:
        del head.forward


def _targets(labels: torch.Tensor, positions: int, logits_to_keep: Union[int, torch.Tensor]) -> torch.Tensor:
    """The target of each position the head sees: the next token's label (the last position has none),
    sliced as transformers slices the hidden states for ``logits_to_keep`` (0 keeps all)."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    targets = shifted[:, keep]
    if targets.shape[1] != positions:
        raise ValueError(f"the model returned {positions} positions for labels of length {labels.shape[1]} (logits_to_keep={logits_to_keep!r})")
    return targets


def _model_call(model: nn.Module, batch: dict[str, Any], logits_to_keep: Union[int, torch.Tensor]) -> dict[str, Any]:
    call = {k: v for k, v in batch.items() if k != "labels" and v is not None}
    call["use_cache"] = False  # training and scoring never reuse a key/value cache
    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        call["logits_to_keep"] = logits_to_keep
    return call


def causal_lm_loss(
    model: nn.Module,
    batch: dict[str, Any],
    labels: torch.Tensor,
    *,
    logits_to_keep: Union[int, torch.Tensor] = 0,
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """``model(**batch, labels=labels).loss`` (mean next-token cross-entropy over labels that are not -100),
    without the logits. ``batch`` holds the model's inputs (``input_ids``, ``attention_mask``,
    ``position_ids``, ...); call :func:`lean_loss_obstacle` and :func:`check_head_is_last` first."""
    head = output_head(model)
    with head_returns_input(head):
        hidden = model(**_model_call(model, batch, logits_to_keep)).logits  # (B, T', H), final-normed
    targets = _targets(labels, hidden.shape[1], logits_to_keep)
    return linear_cross_entropy(hidden, head.weight, targets.to(hidden.device), head.bias, chunk_rows=chunk_rows)


@torch.no_grad()
def check_head_is_last(model: nn.Module, batch: dict[str, Any], tokens: int = 8) -> Optional[str]:
    """Run the model once on the first ``tokens`` tokens of the batch's first row and check that its logits are
    its head's output, unchanged; the reason when they are not (the model post-processes its logits)."""
    small = {k: v[:1, :tokens] if isinstance(v, torch.Tensor) and v.dim() == 2 else v for k, v in batch.items() if k != "labels"}
    head = output_head(model)
    record: list = []
    with head_returns_input(head, record):
        logits = model(**_model_call(model, small, 0)).logits
    if not record:
        return "the model's forward never called its output head"
    produced = record[-1][:, -logits.shape[1] :]  # prompt tuning cuts its virtual positions from the logits
    if produced.shape != logits.shape or not torch.equal(produced.float(), logits.float()):
        return "the model changes its logits after the output head (logit scaling or soft-capping)"
    return None

"""Scoring a causal language model on text: token-weighted log-likelihood sums and generation diversity.

These are the two source-domain measurements of Biderman et al., 2024, "LoRA Learns Less and Forgets Less"
(arXiv:2405.09673), at the cost a training run can afford:

- **Loss on source-domain text.** The mean negative log-likelihood per predicted token, ``sum(NLL) / tokens``,
  and its perplexity ``exp`` of that. The sums (not a mean of batch means) are what is returned, so shards read
  by different processes add up to exactly the one-process value, however unevenly the tokens fall.
- **Generation diversity.** The paper finds that LoRA keeps the base model's generations more diverse than full
  fine-tuning does. The cheap statistic used here is *distinct-n* (Li et al., 2016, arXiv:1510.03055): the
  number of distinct n-grams among all n-grams of the generated continuations, divided by their number (1.0
  = no n-gram repeats; a model that loops on one phrase falls towards 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

# What Hugging Face losses (and torch's cross_entropy) skip.
IGNORE_INDEX = -100


def vocabulary_size(model: nn.Module) -> int:
    """The number of rows of the model's input embedding: the ids it can read."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None or not hasattr(embeddings, "num_embeddings"):
        raise TypeError(f"{type(model).__name__} has no input embedding (get_input_embeddings()); a causal language model is needed")
    return int(embeddings.num_embeddings)


def language_model_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The next-token targets of a batch: its 2-D ``labels`` when it has them (chat data masks the prompt with
    -100), else its own ``input_ids`` with padding (``attention_mask == 0``) masked out."""
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.shape == batch["input_ids"].shape:
        return labels
    mask = batch.get("attention_mask")
    return batch["input_ids"] if mask is None else batch["input_ids"].masked_fill(mask == 0, IGNORE_INDEX)


def check_token_ids(batch: dict[str, Any], vocab: int, where: str) -> None:
    """Raise if ``batch`` is not a dict with ``input_ids``, or holds ids the model cannot read (text tokenised
    by another tokenizer: an id past the embedding would crash inside the model, or on CPU read garbage)."""
    if not isinstance(batch, dict) or "input_ids" not in batch:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{where}: a batch must be a dict with 'input_ids' (and optionally 'attention_mask', 'labels'); got {found}")
    ids = batch["input_ids"]
    if ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise ValueError(
            f"{where}: token ids range over [{int(ids.min())}, {int(ids.max())}] but the model's vocabulary has {vocab} ids "
            f"(0 to {vocab - 1}); tokenize the source text with the model's own tokenizer"
        )


@torch.no_grad()
def negative_log_likelihood_sums(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device, where: str) -> torch.Tensor:
    """``[sum of token NLLs, number of predicted tokens]`` (float64, on ``device``) over ``batches``.

    Token ``t + 1`` is predicted from tokens ``<= t``, so ``labels[:, 1:]`` are the scored targets. The model's
    own loss (its mean over those targets) is used rather than our own cross-entropy, so methods that change the
    sequence (virtual tokens of prompt tuning) are scored as the model scores itself; it is multiplied back by
    the target count to give a sum.
    """
    vocab = vocabulary_size(model)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        check_token_ids(batch, vocab, where)
        batch = {key: value.to(device) for key, value in batch.items() if isinstance(value, torch.Tensor)}
        labels = language_model_labels(batch)
        count = int((labels[:, 1:] != IGNORE_INDEX).sum())
        if count == 0:
            continue  # nothing to predict (the loss would be 0/0)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels, use_cache=False).loss
        totals[0] += loss.double() * count
        totals[1] += count
    return totals


def distinct_ngrams(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n: distinct n-grams over all n-grams, counted across ``sequences`` (1.0 when none has n tokens)."""
    if n < 1:
        raise ValueError(f"n must be >= 1 for distinct n-grams, got {n}")
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


@torch.no_grad()
def sampled_continuations(
    model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, seed: int, device: torch.device
) -> list[list[int]]:
    """One sampled continuation (temperature 1, ``max_new_tokens`` new ids) per prompt, from a fixed seed.

    Sampling draws from the global random generators; they are forked and restored, so measuring diversity
    never changes the training run's dropout masks or data order (and a resumed run stays exact).
    """
    devices = [device] if device.type == "cuda" else []
    outputs = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for prompt in prompts:
            ids = torch.tensor([list(prompt)], device=device)
            generated = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=0,
            )
            outputs.append(generated[0, ids.shape[1] :].tolist())
    return outputs

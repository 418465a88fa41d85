"""Scoring a causal language model on text: token-weighted log-likelihood sums and generation diversity.

These are the two source-domain measurements of Biderman et al., 2024, "LoRA Learns Less and Forgets Less"
(arXiv:2405.09673), at the cost a training run can afford:

- **Loss on source-domain text.** The mean negative log-likelihood per predicted token, ``sum(NLL) / tokens``,
  and its perplexity ``exp`` of that. The sums (not a mean of batch means) are what is returned, so shards read
  by different processes add up to the one-process value (to float64 rounding), however unevenly the tokens fall.
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
from transformers import GenerationConfig

from lightning_peft.core.linear_cross_entropy import IGNORE_INDEX


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


def check_token_ids(batch: Any, vocab: int, where: str) -> None:
    """Raise if ``batch`` is not a dict with ``input_ids``, or holds input ids or labels the model cannot read
    (text tokenized by another tokenizer: an index past the embedding or the output head, which on a GPU is a
    device-side assert that kills the process)."""
    if not isinstance(batch, dict) or "input_ids" not in batch:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{where}: a batch must be a dict with 'input_ids' (and optionally 'attention_mask', 'labels'); got {found}")
    for key, ids in (("token ids", batch["input_ids"]), ("labels", language_model_labels(batch))):
        ids = ids[ids != IGNORE_INDEX] if key == "labels" else ids
        if ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
            raise ValueError(
                f"{where}: {key} range over [{int(ids.min())}, {int(ids.max())}] but the model's vocabulary has {vocab} ids "
                f"(0 to {vocab - 1}; labels may also be {IGNORE_INDEX}); tokenize the source text with the model's own tokenizer"
            )


@torch.no_grad()
def negative_log_likelihood_sums(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device, where: str) -> torch.Tensor:
    """``[sum of token NLLs, number of predicted tokens]`` (float64, on ``device``) over ``batches``.

    Token ``t + 1`` is predicted from tokens ``<= t``, so ``labels[:, 1:]`` are the scored targets. The sum is
    computed here from the logits (float32 log-softmax, float64 accumulation), not taken from the model's
    ``.loss``: a mixture-of-experts model adds its router's auxiliary loss to that, and a mean times a count is
    not a sum. Methods that add virtual tokens cut them from the logits again, so logits align with inputs.
    """
    vocab = vocabulary_size(model)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        check_token_ids(batch, vocab, where)
        batch = {key: value.to(device) for key, value in batch.items() if isinstance(value, torch.Tensor)}
        targets = language_model_labels(batch)[:, 1:]
        count = int((targets != IGNORE_INDEX).sum())
        if count == 0:
            continue  # nothing to predict
        # position_ids: a packed batch (ChatDataModule(pack=True)) keeps its conversations apart through them.
        inputs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
        logits = model(input_ids=batch["input_ids"], **inputs, use_cache=False).logits
        nll = nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        totals[0] += nll.double()
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

    The sampling settings are given whole, so none of the model's own generation defaults (a repetition
    penalty, ``no_repeat_ngram_size``, top-p) changes the distribution whose diversity is measured. Sampling
    draws from the global random generators; they are forked and restored, so measuring diversity never changes
    the training run's dropout masks or data order (and a resumed run stays exact).
    """
    devices = [device] if device.type == "cuda" else []
    settings = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
        max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=0,
    )  # fmt: skip
    outputs = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for prompt in prompts:
            ids = torch.tensor([list(prompt)], device=device)
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=settings)
            outputs.append(generated[0, ids.shape[1] :].tolist())
    return outputs

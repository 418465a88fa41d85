"""Sequence packing: several short examples in one row, none of them seeing another.

Chat conversations vary in length (the offline chat data: median 50 tokens, longest 489), so a batch padded to
its longest example is mostly padding, and the model spends most of its step on it. Packing fills each row of
``max_length`` tokens with whole examples, first-fit in decreasing length (a bin-packing heuristic that needs
at most 11/9 of the fewest possible rows, plus one; Johnson 1973, Dosa 2007), and keeps them apart:

- ``position_ids`` restart at 0 for every example, so each is positioned exactly as it would be alone;
- no ``attention_mask``: from position ids that restart (with no mask and no key/value cache: ``use_cache=False``,
  as the tasks call the model), transformers builds a block-diagonal causal mask, so no token attends across an example boundary. The attention implementations that do this
  are ``sdpa``, ``eager`` and ``flex_attention`` (``masking_utils.find_packed_sequence_indices``) and
  ``flash_attention_2``/``_3`` (which read the boundaries from the position ids as ``cu_seqlens``);
- the first token of every example gets label -100: it would be predicted from the previous example's
  last token. (Alone, it is never predicted either: nothing comes before it.)

So every example's loss terms are the ones it has unpacked (``tests/test_packing.py``); the padding that is
left (the end of a row, or of a batch's shorter rows) is its own segment with ignored labels.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_peft.core.linear_cross_entropy import IGNORE_INDEX


def pack_examples(examples: list[dict[str, Any]], max_length: int) -> list[dict[str, list[int]]]:
    """Rows of at most ``max_length`` tokens, each a concatenation of whole examples (first-fit decreasing).

    Each example is ``{"input_ids": [...], "labels": [...]}`` of at most ``max_length`` tokens; each row is
    ``{"input_ids", "labels", "position_ids"}``. Deterministic: ties keep the examples' order.
    """
    for index, example in enumerate(examples):
        if len(example["input_ids"]) > max_length:
            raise ValueError(f"example {index} has {len(example['input_ids'])} tokens, more than the packed row length max_length={max_length}")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []  # indices of the examples in each row
    room: list[int] = []
    for i in order:
        length = len(examples[i]["input_ids"])
        row = next((r for r, free in enumerate(room) if free >= length), None)
        if row is None:
            rows.append([])
            room.append(max_length)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= length
    packed = []
    for members in rows:
        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in sorted(members):  # within a row, the data's own order
            ids = list(examples[i]["input_ids"])
            input_ids += ids
            labels += [IGNORE_INDEX] + list(examples[i]["labels"])[1:]
            positions += list(range(len(ids)))
        packed.append({"input_ids": input_ids, "labels": labels, "position_ids": positions})
    return packed


def packed_collate(features: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packed rows to the longest; the padding is one more segment (positions from 0, labels -100)."""
    longest = max(len(f["input_ids"]) for f in features)
    batch: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    for f in features:
        pad = longest - len(f["input_ids"])
        batch["input_ids"].append(list(f["input_ids"]) + [pad_token_id] * pad)
        batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
        batch["position_ids"].append(list(f["position_ids"]) + list(range(pad)))
    return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def padding_fraction(lengths: list[int], batch_size: int) -> float:
    """The share of padding in batches of ``batch_size`` consecutive sequences, each padded to its longest."""
    padded = real = 0
    for start in range(0, len(lengths), batch_size):
        group = lengths[start : start + batch_size]
        padded += max(group) * len(group)
        real += sum(group)
    return 1.0 - real / padded if padded else 0.0

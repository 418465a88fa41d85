"""Sequence packing: rows hold whole examples apart (their own positions, no attention across them), and every
example's loss terms equal its unpacked computation, under the attention implementations that separate them."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from lightning_helpers import VOCAB, save_tiny_llama, tiny_llama

from lightning_peft import PromptTuning, apply_peft
from lightning_peft.operations.causal_lm_loss import causal_lm_loss
from lightning_peft.recipes.data import ChatDataModule
from lightning_peft.recipes.packing import pack_examples, packed_collate, padding_fraction
from lightning_peft.recipes.tasks import CausalLMTask

LENGTHS = [5, 9, 3, 7, 2, 6]


def _examples(lengths: list[int] = LENGTHS, seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for length in lengths:
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        labels = [-100] * (length // 2) + ids[length // 2 :]  # a prompt, then the reply
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def test_rows_hold_every_example_once_whole_with_its_own_positions() -> None:
    examples = _examples()
    rows = pack_examples(examples, max_length=12)
    assert all(len(r["input_ids"]) <= 12 for r in rows)
    assert len(rows) == 3  # 32 tokens: first-fit decreasing fills 9+3, 7+5, 6+2 (the fewest rows of 12 possible)
    found = []
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        for a, b in zip(starts, starts[1:] + [len(row["input_ids"])]):
            assert row["position_ids"][a:b] == list(range(b - a))
            found.append(row["input_ids"][a:b])
            assert row["labels"][a] == -100  # never predicted from the previous example
    assert sorted(found) == sorted(e["input_ids"] for e in examples)
    assert pack_examples(examples, 12) == rows  # deterministic


def test_a_too_long_example_and_the_padding_fraction() -> None:
    with pytest.raises(ValueError, match=r"example 1 has 9 tokens, more than the packed row length max_length=8"):
        pack_examples(_examples(), max_length=8)
    assert padding_fraction([2, 4, 4], batch_size=2) == pytest.approx(1 - 10 / 12)  # (4+4) + 4 padded to 12


def _token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position NLL of the next token (0 where the target is ignored)."""
    targets = F.pad(labels[1:], (0, 1), value=-100)
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="none")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_each_examples_loss_terms_equal_its_unpacked_computation(attention: str) -> None:
    model = tiny_llama(0, attn_implementation=attention).eval()
    examples = _examples()
    batch = packed_collate(pack_examples(examples, max_length=12), pad_token_id=0)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (3, 12)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for r in range(batch["input_ids"].shape[0]):
            positions = batch["position_ids"][r].tolist()
            starts = [i for i, p in enumerate(positions) if p == 0]
            for a, b in zip(starts, starts[1:] + [len(positions)]):
                ids = batch["input_ids"][r, a:b]
                match = [e for e in examples if e["input_ids"] == ids.tolist()]
                if not match:
                    assert (batch["labels"][r, a:b] == -100).all()  # the padding segment
                    continue
                alone = model(input_ids=ids[None], use_cache=False).logits[0]
                torch.testing.assert_close(packed[r, a:b], alone, rtol=1e-5, atol=1e-5)
                labels = torch.tensor(match[0]["labels"])
                torch.testing.assert_close(_token_nll(packed[r, a:b], batch["labels"][r, a:b]), _token_nll(alone, labels), rtol=1e-5, atol=1e-6)


def test_the_packed_mean_loss_is_the_token_mean_over_the_unpacked_examples() -> None:
    model = tiny_llama(0).eval()
    examples = _examples()
    batch = packed_collate(pack_examples(examples, max_length=12), pad_token_id=0)
    with torch.no_grad():
        terms = []
        for e in examples:
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
            labels = torch.tensor(e["labels"])
            terms.append(_token_nll(logits, labels)[F.pad(labels[1:], (0, 1), value=-100) != -100])
        expected = torch.cat(terms).mean()
        plain = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False).loss
        chunked = causal_lm_loss(model, {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}, batch["labels"])
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.assets
def test_chat_data_module_packs_both_splits_and_reports_the_padding(assets_dir) -> None:
    model = str(assets_dir / "smollm2-135m-instruct")
    chat = assets_dir / "data/chat"
    padded = ChatDataModule(model, str(chat / "train.jsonl"), str(chat / "validation.jsonl"), max_length=256, batch_size=4, max_train_samples=200, max_val_samples=40)
    packed = ChatDataModule(model, str(chat / "train.jsonl"), str(chat / "validation.jsonl"), max_length=256, batch_size=4, max_train_samples=200, max_val_samples=40, pack=True)
    padded.setup("fit")
    packed.setup("fit")
    stats = packed.packing_stats["train_file"]
    assert stats["examples"] == len(padded.train_dataset) and stats["rows"] == len(packed.train_dataset) < stats["examples"] / 3
    assert stats["padding_before"] > 0.2 and stats["padding_after"] < 0.1
    # The same tokens, and the same scored tokens, as the unpacked conversations.
    real = sum(len(e["input_ids"]) for e in padded.train_dataset.examples)
    assert sum(len(r["input_ids"]) for r in packed.train_dataset.examples) == real
    scored = lambda ds: sum(sum(1 for t in e["labels"][1:] if t != -100) for e in ds.examples)  # noqa: E731
    assert scored(packed.train_dataset) == scored(padded.train_dataset) and scored(packed.val_dataset) == scored(padded.val_dataset)
    batch = next(iter(packed.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "position_ids"} and batch["input_ids"].shape[0] == 4


def test_pack_must_be_a_bool(tmp_path) -> None:
    with pytest.raises(TypeError, match=r"`pack` must be true or false, got 'yes'"):
        ChatDataModule("tok", "a.jsonl", "b.jsonl", pack="yes")  # type: ignore[arg-type]


def test_packed_batches_refuse_virtual_tokens(tmp_path) -> None:
    task = CausalLMTask(save_tiny_llama(tmp_path / "llama"))
    task.configure_model()
    apply_peft(task.model, PromptTuning(num_virtual_tokens=2))
    batch = packed_collate(pack_examples(_examples(), max_length=12), pad_token_id=0)
    with pytest.raises(ValueError, match=r"packed batches .* cannot feed prompt, P- or prefix tuning.*pack: false"):
        task._loss(batch)
    json.dumps(task.hparams)  # the task is unchanged and still serialisable

"""Data modules against tiny synthetic files and a word-level tokenizer built in the test.

With one token per whitespace-separated word, every expected block, mask and padding below can
be written out by hand.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from lightning_peft.recipes.data import (
    IGNORE_INDEX,
    ChatDataModule,
    ClassificationDataModule,
    TextFileDataModule,
    pad_collate,
)

SPECIALS = ["[unk]", "[pad]", "[eos]", "<system>", "<user>", "<assistant>", "<end>", "<last>"]
WORDS = [f"w{i}" for i in range(40)] + "hi there hello friend bye see you good bad film a b c d e f g x".split()
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
N = len(SPECIALS)  # id of w0; w{i} has id N + i
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <end> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def ids(text: str) -> list[int]:
    return [VOCAB[w] for w in text.split()]


@pytest.fixture
def make_tokenizer(tmp_path):
    def make(pad: bool = True, chat_template: str = CHAT_TEMPLATE) -> str:
        backend = Tokenizer(WordLevel(VOCAB, unk_token="[unk]"))
        backend.pre_tokenizer = WhitespaceSplit()
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend, unk_token="[unk]", eos_token="[eos]", pad_token="[pad]" if pad else None
        )
        tok.chat_template = chat_template
        path = tmp_path / f"tok_pad{pad}_{abs(hash(chat_template))}"
        tok.save_pretrained(path)
        return str(path)

    return make


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def write_csv(path: Path, header: list[str], rows: list[list]) -> str:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def chat(*turns: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    return {"messages": messages}


# ------------------------------------------------------------------------------------------------
# pad_collate
# ------------------------------------------------------------------------------------------------


def test_pad_collate_right_pads_ids_mask_and_labels():
    batch = pad_collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=1
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


# ------------------------------------------------------------------------------------------------
# TextFileDataModule
# ------------------------------------------------------------------------------------------------


def test_text_blocks_and_tail_holdout(tmp_path, make_tokenizer):
    # 23 tokens, blocks of 4 -> 5 blocks (w20..w22 dropped); round(5 * 0.4) = 2 held out: the last two.
    train_file = tmp_path / "t.txt"
    train_file.write_text(" ".join(f"w{i}" for i in range(23)))
    dm = TextFileDataModule(make_tokenizer(), str(train_file), val_fraction=0.4, block_size=4, batch_size=2)
    dm.setup("fit")
    block = lambda k: [N + i for i in range(4 * k, 4 * k + 4)]  # noqa: E731
    assert [ex["input_ids"] for ex in dm.train_dataset] == [block(0), block(1), block(2)]
    assert [ex["input_ids"] for ex in dm.val_dataset] == [block(3), block(4)]
    assert all(ex["labels"] == ex["input_ids"] for ex in [*dm.train_dataset, *dm.val_dataset])

    (val_batch,) = list(dm.val_dataloader())  # validation is not shuffled
    assert val_batch["input_ids"].tolist() == [block(3), block(4)]
    assert val_batch["labels"].tolist() == val_batch["input_ids"].tolist()
    assert val_batch["attention_mask"].tolist() == [[1] * 4] * 2
    train_rows = sorted(row for b in dm.train_dataloader() for row in b["input_ids"].tolist())
    assert train_rows == [block(0), block(1), block(2)]


def test_text_holdout_rounds_and_keeps_at_least_one(tmp_path, make_tokenizer):
    train_file = tmp_path / "t.txt"
    train_file.write_text(" ".join(f"w{i}" for i in range(40)))  # 10 blocks of 4
    for fraction, n_val in [(0.1, 1), (0.01, 1), (0.26, 3), (0.5, 5)]:
        dm = TextFileDataModule(make_tokenizer(), str(train_file), val_fraction=fraction, block_size=4)
        dm.setup()
        assert (len(dm.train_dataset), len(dm.val_dataset)) == (10 - n_val, n_val), fraction
        assert dm.val_dataset[0]["input_ids"][0] == N + 4 * (10 - n_val)


def test_text_val_file_and_block_limits(tmp_path, make_tokenizer):
    train_file, val_file = tmp_path / "t.txt", tmp_path / "v.txt"
    train_file.write_text(" ".join(f"w{i}" for i in range(12)))
    val_file.write_text("\n".join(f"w{i}" for i in range(30, 39)))  # newlines split words too
    dm = TextFileDataModule(
        make_tokenizer(), str(train_file), str(val_file), block_size=3, max_train_blocks=2, max_val_blocks=5
    )
    dm.setup()
    assert [ex["input_ids"] for ex in dm.train_dataset] == [[N, N + 1, N + 2], [N + 3, N + 4, N + 5]]
    assert [ex["input_ids"] for ex in dm.val_dataset] == [[N + 30 + 3 * k + j for j in range(3)] for k in range(3)]


def test_text_too_short_to_split(tmp_path, make_tokenizer):
    train_file = tmp_path / "t.txt"
    train_file.write_text("w1 w2 w3 w4 w5")  # one block of 4
    dm = TextFileDataModule(make_tokenizer(), str(train_file), block_size=4)
    with pytest.raises(ValueError, match="only 1 blocks of 4 tokens"):
        dm.setup()


@pytest.mark.parametrize(
    "kwargs, match",
    [({"val_fraction": 1.0}, "val_fraction"), ({"block_size": 0}, "block_size"), ({"batch_size": -1}, "batch_size")],
)
def test_text_rejects_bad_arguments_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextFileDataModule("unused", "unused.txt", **kwargs)


def test_missing_files_name_the_path_and_the_fix(tmp_path, make_tokenizer):
    missing = str(tmp_path / "nope" / "missing.txt")
    tok = make_tokenizer()
    existing = write_jsonl(tmp_path / "ok.jsonl", [chat("hi", "hello")])
    modules = [
        TextFileDataModule(tok, missing),
        ChatDataModule(tok, existing, missing),
        ClassificationDataModule(tok, missing, existing),
    ]
    for dm in modules:
        with pytest.raises(FileNotFoundError, match="prepare-assets") as err:
            dm.setup("fit")
        assert missing in str(err.value)
        # prepare_data (once per node, before any rank's setup) fails the same way, and never tokenizes.
        with pytest.raises(FileNotFoundError, match="prepare-assets") as err:
            dm.prepare_data()
        assert missing in str(err.value)


def test_prepare_data_accepts_files_that_exist_without_loading_anything(tmp_path):
    existing = write_jsonl(tmp_path / "ok.jsonl", [chat("hi", "hello")])
    dm = ChatDataModule("no/such/tokenizer", existing, existing)  # the tokenizer would fail to load if touched
    dm.prepare_data()
    assert dm._tokenizer is None and dm.train_dataset is None


# ------------------------------------------------------------------------------------------------
# ChatDataModule
# ------------------------------------------------------------------------------------------------


def test_chat_labels_only_assistant_replies_and_their_end_token(tmp_path, make_tokenizer):
    conv = chat("hi there", "hello friend", "bye", "see you", system="good")
    f = write_jsonl(tmp_path / "c.jsonl", [conv])
    dm = ChatDataModule(make_tokenizer(), f, f)
    dm.setup()
    (ex,) = dm.train_dataset
    text = (
        "<system> good <end> <user> hi there <end> <assistant> hello friend <end> "
        "<user> bye <end> <assistant> see you <end>"
    )
    assert ex["input_ids"] == ids(text)
    # by hand: positions 8-10 ("hello friend <end>") and 15-17 ("see you <end>") are the replies
    expected = [IGNORE_INDEX] * 18
    for pos in [8, 9, 10, 15, 16, 17]:
        expected[pos] = ids(text)[pos]
    assert ex["labels"] == expected


def test_chat_truncates_and_drops_conversations_without_reply_tokens(tmp_path, make_tokenizer):
    long_prompt = chat("a b c d e f g", "x")  # the reply starts at token 10
    short = chat("hi", "hello friend")  # <user> hi <end> <assistant> hello friend <end> = 7 tokens
    f = write_jsonl(tmp_path / "c.jsonl", [long_prompt, short])
    dm = ChatDataModule(make_tokenizer(), f, f, max_length=6)
    with pytest.warns(UserWarning, match="1 conversations"):
        dm.setup()
    assert dm.num_dropped == {"train_file": 1, "val_file": 1}
    (ex,) = dm.train_dataset
    assert ex["input_ids"] == ids("<user> hi <end> <assistant> hello friend")
    assert ex["labels"] == [IGNORE_INDEX] * 4 + ids("hello friend")


def test_chat_batches_right_padded_with_ignored_labels(tmp_path, make_tokenizer):
    f = write_jsonl(tmp_path / "c.jsonl", [chat("hi", "hello"), chat("hi there", "see you", "bye", "x")])
    dm = ChatDataModule(make_tokenizer(), f, f, batch_size=2)
    dm.setup()
    (batch,) = list(dm.val_dataloader())
    pad = VOCAB["[pad]"]
    first = ids("<user> hi <end> <assistant> hello <end>")
    assert batch["input_ids"][0].tolist() == first + [pad] * 8
    assert batch["attention_mask"][0].tolist() == [1] * 6 + [0] * 8
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 4 + ids("hello <end>") + [IGNORE_INDEX] * 8
    assert batch["attention_mask"][1].tolist() == [1] * 14


def test_chat_pads_with_eos_when_tokenizer_has_no_pad(tmp_path, make_tokenizer):
    f = write_jsonl(tmp_path / "c.jsonl", [chat("hi", "hello"), chat("hi there", "see you")])
    dm = ChatDataModule(make_tokenizer(pad=False), f, f, batch_size=2)
    dm.setup()
    (batch,) = list(dm.val_dataloader())
    assert batch["input_ids"][0, -1].item() == VOCAB["[eos]"]
    assert batch["labels"][0, -1].item() == IGNORE_INDEX


def test_chat_rejects_template_that_is_not_prefix_consistent(tmp_path, make_tokenizer):
    # marks only the final message, so the rendering of a prefix is not a prefix of the rendering
    template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}"
        "{% if loop.last %} <last>{% endif %} <end> {% endfor %}"
    )
    f = write_jsonl(tmp_path / "c.jsonl", [chat("hi", "hello", "bye", "see you")])
    dm = ChatDataModule(make_tokenizer(chat_template=template), f, f)
    with pytest.raises(ValueError, match="prefix-consistently"):
        dm.setup()


def test_chat_missing_messages_key_names_it(tmp_path, make_tokenizer):
    f = write_jsonl(tmp_path / "c.jsonl", [{"conversation": [], "id": 3}])
    dm = ChatDataModule(make_tokenizer(), f, f)
    with pytest.raises(ValueError, match=r"'messages' not found .*columns found: \['conversation', 'id'\]"):
        dm.setup()


def test_chat_batch_feeds_a_causal_lm(tmp_path, make_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    f = write_jsonl(tmp_path / "c.jsonl", [chat("hi", "hello"), chat("hi there", "see you", "bye", "x")])
    dm = ChatDataModule(make_tokenizer(), f, f, batch_size=2)
    dm.setup()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4,
    )  # fmt: skip
    loss = LlamaForCausalLM(config)(**next(iter(dm.train_dataloader()))).loss
    assert torch.isfinite(loss) and loss.item() > 0


# ------------------------------------------------------------------------------------------------
# ClassificationDataModule
# ------------------------------------------------------------------------------------------------


def test_classification_csv_dynamic_padding(tmp_path, make_tokenizer):
    train = write_csv(tmp_path / "t.csv", ["label", "text", "extra"], [[1, "good film", "z"], [0, "bad", "z"]])
    val = write_csv(tmp_path / "v.csv", ["label", "text", "extra"], [[2, "a b c d e", "z"]])
    dm = ClassificationDataModule(make_tokenizer(), train, val, max_length=3, batch_size=2)
    dm.setup("fit")
    assert dm.num_labels == 3
    assert [ex["input_ids"] for ex in dm.train_dataset] == [ids("good film"), ids("bad")]
    assert dm.val_dataset[0]["input_ids"] == ids("a b c")  # truncated to max_length
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].tolist() == [2]
    (train_batch,) = list(dm.train_dataloader())
    assert train_batch["input_ids"].shape == (2, 2)  # padded to the longest in the batch, not max_length
    order = train_batch["labels"].tolist()
    row = order.index(0)
    assert train_batch["input_ids"][row].tolist() == ids("bad") + [VOCAB["[pad]"]]
    assert train_batch["attention_mask"][row].tolist() == [1, 0]


def test_classification_jsonl_custom_columns_and_sample_limits(tmp_path, make_tokenizer):
    records = [{"sentence": f"w{i}", "y": i % 2} for i in range(5)]
    f = write_jsonl(tmp_path / "d.jsonl", records)
    dm = ClassificationDataModule(
        make_tokenizer(), f, f, text_column="sentence", label_column="y", max_train_samples=3, max_val_samples=1
    )
    dm.setup()
    assert [(ex["input_ids"], ex["labels"]) for ex in dm.train_dataset] == [([N], 0), ([N + 1], 1), ([N + 2], 0)]
    assert len(dm.val_dataset) == 1


def test_classification_missing_column_lists_columns(tmp_path, make_tokenizer):
    csv_file = write_csv(tmp_path / "t.csv", ["sentence", "label"], [["good", 1]])
    dm = ClassificationDataModule(make_tokenizer(), csv_file, csv_file)
    with pytest.raises(ValueError, match=r"'text' not found in .*t\.csv; columns found: \['sentence', 'label'\]"):
        dm.setup()
    jsonl_file = write_jsonl(tmp_path / "t.jsonl", [{"text": "good", "target": 1}])
    dm = ClassificationDataModule(make_tokenizer(), jsonl_file, jsonl_file)
    with pytest.raises(ValueError, match=r"'label' not found in .*row 1; columns found: \['target', 'text'\]"):
        dm.setup()


def test_classification_rejects_non_integer_labels_and_unknown_extensions(tmp_path, make_tokenizer):
    csv_file = write_csv(tmp_path / "t.csv", ["text", "label"], [["good", 1], ["bad", "neg"]])
    dm = ClassificationDataModule(make_tokenizer(), csv_file, csv_file)
    with pytest.raises(ValueError, match=r"row 2: label 'neg'"):
        dm.setup()
    tsv = tmp_path / "t.tsv"
    tsv.write_text("text\tlabel\n")
    dm = ClassificationDataModule(make_tokenizer(), str(tsv), str(tsv))
    with pytest.raises(ValueError, match="unsupported extension '.tsv'"):
        dm.setup()


def test_classification_batch_feeds_a_bert_classifier(tmp_path, make_tokenizer):
    from transformers import BertConfig, BertForSequenceClassification

    f = write_csv(tmp_path / "t.csv", ["text", "label"], [["good film", 1], ["bad", 0], ["a b c", 1]])
    dm = ClassificationDataModule(make_tokenizer(), f, f, batch_size=3)
    dm.setup()
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_labels=dm.num_labels, pad_token_id=VOCAB["[pad]"],
    )  # fmt: skip
    out = BertForSequenceClassification(config)(**next(iter(dm.val_dataloader())))
    assert out.logits.shape == (3, 2) and torch.isfinite(out.loss)


# ------------------------------------------------------------------------------------------------
# Configuration from YAML (jsonargparse), as the CLI does it
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [TextFileDataModule, ChatDataModule, ClassificationDataModule])
def test_data_modules_build_from_class_path_config(cls, tmp_path):
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningDataModule, "data")
    init_args = {"tokenizer": "some/tokenizer", "train_file": "train.x", "val_file": "val.x", "batch_size": 3}
    cfg = parser.parse_object({"data": {"class_path": f"lightning_peft.recipes.data.{cls.__name__}", "init_args": init_args}})
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, cls) and dm.batch_size == 3
    assert dm.hparams["train_file"] == "train.x"  # saved for checkpoints; nothing was read yet
    assert dm.train_dataset is None


# ------------------------------------------------------------------------------------------------
# mid-epoch resume: the batches after a resume are the uninterrupted run's
# ------------------------------------------------------------------------------------------------
class _RecordBatches(__import__("lightning.pytorch", fromlist=["LightningModule"]).LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[list[int]]] = {}

    def training_step(self, batch, batch_idx):
        self.seen[self.global_step + 1] = batch["input_ids"].tolist()
        return (self.weight * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, datamodule, max_steps, ckpt_path=None, every=None):
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = _RecordBatches()
    callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1)] if every else []
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=bool(every), callbacks=callbacks, limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.parametrize("stop", [2, 4, 5, 7], ids=["mid-epoch-1", "mid-epoch-2", "epoch-end", "next-epoch"])
def test_resume_continues_with_the_uninterrupted_runs_batches(tmp_path, make_tokenizer, stop, recwarn):
    train_file = tmp_path / "t.txt"
    train_file.write_text(" ".join(f"w{i % 20}" for i in range(44)))  # 11 blocks of 4: 10 for training, 5 batches
    def data():
        return TextFileDataModule(make_tokenizer(), str(train_file), val_fraction=0.1, block_size=4, batch_size=2)

    import lightning.pytorch as L

    L.seed_everything(7)
    uninterrupted = _fit(tmp_path / "a", data(), max_steps=12)
    assert len({str(uninterrupted[s]) for s in range(1, 6)}) == 5 and uninterrupted[1] != uninterrupted[6]  # shuffled per epoch
    L.seed_everything(7)
    _fit(tmp_path / "b", data(), max_steps=stop, every=stop)
    L.seed_everything(123)  # another seed before the resume: the checkpoint's order wins
    resumed = _fit(tmp_path / "c", data(), max_steps=12, ckpt_path=str(tmp_path / "b" / "ckpt" / f"epoch={(stop - 1) // 5}-step={stop}.ckpt"))
    assert resumed == {s: uninterrupted[s] for s in range(stop + 1, 13)}
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


# ------------------------------------------------------------------------------------------------
# several processes: the resumable sampler shards like DistributedSampler and resumes per rank
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length, world, shuffle, drop_last", [(10, 2, True, False), (11, 3, True, False), (11, 3, False, False), (11, 3, True, True)])
def test_resumable_sampler_shards_exactly_like_distributed_sampler(length, world, shuffle, drop_last):
    """The oracle is torch's DistributedSampler (same seed + epoch permutation, same padding and striding)."""
    from torch.utils.data import DistributedSampler

    from lightning_peft.integration.resumable_sampler import ResumableSampler

    for epoch in (0, 3):
        for rank in range(world):
            ours = ResumableSampler(length, shuffle=shuffle, seed=5, num_replicas=world, rank=rank, drop_last=drop_last)
            reference = DistributedSampler(range(length), num_replicas=world, rank=rank, shuffle=shuffle, seed=5, drop_last=drop_last)
            ours.set_epoch(epoch)
            reference.set_epoch(epoch)
            assert list(ours) == list(reference) and len(ours) == len(reference)
            ours.resume_at(epoch, 2)  # two indices of this rank's shard were done before the kill
            assert list(ours) == list(reference)[2:]


def test_resumable_loader_takes_the_rank_of_lightnings_distributed_sampler():
    from torch.utils.data import DistributedSampler

    from lightning_peft.integration.resumable_sampler import ResumableDataLoader, ResumableSampler

    rows = list(range(9))
    replaced = DistributedSampler(rows, num_replicas=2, rank=1, shuffle=False)
    loader = ResumableDataLoader(rows, batch_size=2, shuffle=True, seed=3, sampler=replaced)  # what Lightning rebuilds
    assert isinstance(loader.sampler, ResumableSampler) and (loader.sampler.num_replicas, loader.sampler.rank) == (2, 1)
    assert loader.sampler.shuffle  # our order (seeded, shuffled), its shard
    with pytest.raises(ValueError, match=r"rank=2 is not in \[0, num_replicas=2\)"):
        ResumableSampler(4, shuffle=False, seed=0, num_replicas=2, rank=2)

"""LightningDataModules for the three kinds of fine-tuning this project demonstrates.

* :class:`TextFileDataModule` -- causal language modelling on one plain-text file, cut into
  fixed-length blocks (the GPT-2 / nanoGPT recipe).
* :class:`ChatDataModule` -- supervised fine-tuning on conversations, with the loss on the
  assistant's replies only (as in InstructGPT, Ouyang et al. 2022, https://arxiv.org/abs/2203.02155,
  and Alpaca/QLoRA practice): learning to reproduce the user's side wastes capacity and lets long
  prompts drown out the replies.
* :class:`ClassificationDataModule` -- sequence classification from a CSV or JSONL file.

All three take the tokenizer as a name or path (``AutoTokenizer.from_pretrained``) so that they
can be built from YAML by jsonargparse, read and tokenize in :meth:`setup` (not ``__init__``, so
that building a config never touches the disk), and yield batches as dicts of tensors
(``input_ids``, ``attention_mask``, ``labels``) ready for a Hugging Face model's ``forward``.
Tokenization is deterministic; only the training loader shuffles, from Lightning's seed and the epoch, and it
resumes mid-epoch from a checkpoint (:mod:`lightning_peft.integration.resumable_sampler`).

The default files come from ``lightning-peft prepare-assets`` (see :mod:`lightning_peft.recipes.assets`).
"""

from __future__ import annotations

import csv
import json
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_peft.core.linear_cross_entropy import IGNORE_INDEX
from lightning_peft.integration.resumable_sampler import ResumableDataLoader, resume_position
from lightning_peft.recipes.packing import pack_examples, packed_collate, padding_fraction


class _ListDataset(Dataset):
    """Pre-tokenized examples held in memory; the corpora here are a few MB at most."""

    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


def pad_collate(features: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples to the longest one.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0 and per-token
    ``labels`` with -100, so padding neither attends nor counts in the loss. An integer
    ``labels`` (classification) is stacked as is. Right padding keeps position ids of the real
    tokens unchanged for models that derive them from the sequence index.
    """
    longest = max(len(f["input_ids"]) for f in features)
    batch: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:
        pad = longest - len(f["input_ids"])
        batch["input_ids"].append(list(f["input_ids"]) + [pad_token_id] * pad)
        batch["attention_mask"].append(list(f.get("attention_mask", [1] * len(f["input_ids"]))) + [0] * pad)
        labels = f["labels"]
        batch["labels"].append(labels if isinstance(labels, int) else list(labels) + [IGNORE_INDEX] * pad)
    return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def _training_position(datamodule: LightningDataModule) -> dict[str, int]:
    return resume_position(getattr(datamodule, "trainer", None))


def _require_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"{what} {str(p)!r} does not exist (resolved: {p.resolve()}). Run `lightning-peft prepare-assets` "
            "to create the offline assets, or point the data module at your own file."
        )
    return p


def _check_positive(**values: Optional[int]) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")


class _TokenizedDataModule(LightningDataModule):
    """What the three modules share: the tokenizer, the two datasets and their loaders."""

    def __init__(self, tokenizer: str, batch_size: int, num_workers: int) -> None:
        super().__init__()
        _check_positive(batch_size=batch_size)
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers!r}")
        self.tokenizer_name = tokenizer
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._tokenizer = None
        self.train_dataset: Optional[_ListDataset] = None
        self.val_dataset: Optional[_ListDataset] = None
        # The training order's seed: Lightning's (seed_everything) at construction; a checkpoint restores it.
        self.shuffle_seed = torch.initial_seed() % 2**31

    @property
    def tokenizer(self):
        """The tokenizer, loaded on first use (so configs can be built without it)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
        return self._tokenizer

    @property
    def pad_token_id(self) -> int:
        # Causal LMs often ship without a pad token; eos is the usual stand-in. Padded positions
        # are masked out of attention and loss, so which id fills them does not matter.
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise ValueError(f"tokenizer {self.tokenizer_name!r} has neither a pad nor an eos token to pad with")
        return pad

    @override
    def prepare_data(self) -> None:
        """Check that the data files are there, before any rank starts building its splits.

        Lightning calls this once per node (local rank 0). Nothing is downloaded or written here: the files come
        from ``lightning-peft prepare-assets`` run before the job, onto a filesystem every node sees, because a
        download inside a multi-node job races between nodes. A missing file therefore fails here, once per node,
        with how to make it, rather than in ``setup`` on every rank.
        """
        for path, what in ((getattr(self, "train_file", None), "training file"), (getattr(self, "val_file", None), "validation file")):
            if path is not None:
                _require_file(path, what)

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        # fit, validate and test all need the same two splits; build them once.
        if self.train_dataset is None:
            self.train_dataset, self.val_dataset = self._build()

    def _build(self) -> tuple[_ListDataset, _ListDataset]:
        raise NotImplementedError

    def _loader(self, dataset: Optional[_ListDataset], shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            seed=self.shuffle_seed,
            position=partial(_training_position, self),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=partial(self._collate_function(), pad_token_id=self.pad_token_id),  # a partial pickles for workers
        )

    def _collate_function(self):
        return pad_collate

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)


class TextFileDataModule(_TokenizedDataModule):
    """Causal LM data from a plain-text file, in non-overlapping blocks of ``block_size`` tokens.

    The whole file is tokenized as one string (no special tokens added) and cut into
    ``len(ids) // block_size`` consecutive blocks; the remainder shorter than a block is dropped.
    ``labels`` equal ``input_ids`` -- the model shifts them by one internally.

    Without ``val_file`` the *last* ``round(n_blocks * val_fraction)`` blocks (at least one) are held
    out, in order: a contiguous tail rather than a random sample, so no validation block is ever
    the direct continuation of a training block it was shuffled away from. ``max_train_blocks`` /
    ``max_val_blocks`` then keep the first blocks of each split (for quick runs).

    Example::

        dm = TextFileDataModule("assets/smollm2-135m-instruct", "assets/data/hamlet.txt", block_size=128)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))  # input_ids: (4, 128)
    """

    def __init__(
        self,
        tokenizer: str,
        train_file: str,
        val_file: Optional[str] = None,
        val_fraction: float = 0.1,
        block_size: int = 128,
        batch_size: int = 4,
        num_workers: int = 0,
        max_train_blocks: Optional[int] = None,
        max_val_blocks: Optional[int] = None,
    ) -> None:
        super().__init__(tokenizer, batch_size, num_workers)
        _check_positive(block_size=block_size, max_train_blocks=max_train_blocks, max_val_blocks=max_val_blocks)
        if val_file is None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in (0, 1) when no `val_file` is given, got {val_fraction!r}")
        self.save_hyperparameters()
        self.train_file = train_file
        self.val_file = val_file
        self.val_fraction = val_fraction
        self.block_size = block_size
        self.max_train_blocks = max_train_blocks
        self.max_val_blocks = max_val_blocks

    def _blocks(self, path: str, what: str) -> list[list[int]]:
        text = _require_file(path, what).read_text(encoding="utf-8")
        # verbose=False: a whole book is longer than model_max_length, which is expected here.
        ids = self.tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        n = len(ids) // self.block_size
        return [ids[i * self.block_size : (i + 1) * self.block_size] for i in range(n)]

    def _build(self) -> tuple[_ListDataset, _ListDataset]:
        train = self._blocks(self.train_file, "train_file")
        if self.val_file is not None:
            val = self._blocks(self.val_file, "val_file")
        else:
            n_val = max(1, round(len(train) * self.val_fraction))
            if n_val >= len(train):
                raise ValueError(
                    f"{self.train_file!r} gives only {len(train)} blocks of {self.block_size} tokens; too few to hold "
                    f"out {n_val} for validation and still train. Use a smaller `block_size` or a longer file."
                )
            train, val = train[:-n_val], train[-n_val:]
        train, val = train[: self.max_train_blocks], val[: self.max_val_blocks]
        wrap = lambda blocks: _ListDataset([{"input_ids": b, "labels": b} for b in blocks])  # noqa: E731
        return wrap(train), wrap(val)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no} is not valid JSON: {err}") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no} must hold a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def _require_column(record: dict[str, Any], column: str, where: str) -> Any:
    if column not in record:
        raise ValueError(f"column {column!r} not found in {where}; columns found: {sorted(record)}")
    return record[column]


def encode_chat(tokenizer, messages: list[dict[str, str]], max_length: int) -> dict[str, list[int]]:
    """Tokenize one conversation with the tokenizer's chat template; label assistant replies only.

    A reply's span in the rendered text runs from the end of ``template(messages[:i],
    add_generation_prompt=True)`` (the prompt up to the assistant header) to the end of
    ``template(messages[:i+1])`` less trailing whitespace, so it covers the reply *and* the token
    the template closes the turn with (``<|im_end|>`` for ChatML) -- the model must learn to
    stop -- but not the newline separating turns. Tokens whose first character lies in such a
    span keep their id as label; all others get -100. Working in characters (via the fast
    tokenizer's offset mapping) rather than subtracting token counts of separately tokenized
    prefixes stays right even when a merge crosses a turn boundary.

    ``return_assistant_tokens_mask`` would be simpler but needs ``{% generation %}`` markers that
    most templates (SmolLM2's included) lack. The sequence is cut to its first ``max_length`` tokens.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(prompt) and full.startswith(upto) and len(prompt) <= len(upto)):
            # e.g. templates that rewrite earlier turns (dropping reasoning) once a later one exists
            raise ValueError(
                "the chat template does not render conversations prefix-consistently, so assistant replies "
                f"cannot be located for the loss mask (turn {i} of {messages!r})"
            )
        # The separator the template puts *between* turns ("\n" after <|im_end|>) is not part of the reply.
        spans.append((len(prompt), len(upto.rstrip())))
    if not tokenizer.is_fast:
        raise ValueError(f"ChatDataModule needs a fast tokenizer (offset mapping); got {type(tokenizer).__name__}")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = enc["input_ids"][:max_length]
    labels = [
        tok if any(a <= start < b for a, b in spans) else IGNORE_INDEX
        for tok, (start, _end) in zip(ids, enc["offset_mapping"])
    ]
    return {"input_ids": ids, "labels": labels}


class _SplitFilesDataModule(_TokenizedDataModule):
    """A train file and a validation file of examples, each cut to ``max_length`` tokens, with
    ``max_*_samples`` keeping the first examples of each (chat and classification)."""

    def __init__(
        self,
        tokenizer: str,
        train_file: str,
        val_file: str,
        max_length: int,
        batch_size: int,
        num_workers: int,
        max_train_samples: Optional[int],
        max_val_samples: Optional[int],
    ) -> None:
        super().__init__(tokenizer, batch_size, num_workers)
        _check_positive(max_length=max_length, max_train_samples=max_train_samples, max_val_samples=max_val_samples)
        self.train_file = train_file
        self.val_file = val_file
        self.max_length = max_length
        self.max_train_samples = max_train_samples
        self.max_val_samples = max_val_samples


class ChatDataModule(_SplitFilesDataModule):
    """Supervised fine-tuning on JSONL conversations, loss on the assistant's replies only.

    Each line is ``{"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}``,
    rendered with the tokenizer's chat template (see :func:`encode_chat` for the label mask).
    Conversations longer than ``max_length`` tokens are cut; one left with no reply token to
    learn from is dropped (and counted in ``num_dropped``), since its loss would be 0/0.

    Example::

        dm = ChatDataModule("assets/smollm2-135m-instruct", "assets/data/chat/train.jsonl",
                            "assets/data/chat/validation.jsonl")
    """

    def __init__(
        self,
        tokenizer: str,
        train_file: str,
        val_file: str,
        max_length: int = 256,
        batch_size: int = 4,
        num_workers: int = 0,
        max_train_samples: Optional[int] = None,
        max_val_samples: Optional[int] = None,
        pack: bool = False,
    ) -> None:
        super().__init__(tokenizer, train_file, val_file, max_length, batch_size, num_workers, max_train_samples, max_val_samples)
        if not isinstance(pack, bool):
            raise TypeError(f"`pack` must be true or false, got {pack!r}")
        self.save_hyperparameters()
        self.pack = pack
        self.num_dropped: dict[str, int] = {}
        self.packing_stats: dict[str, dict[str, float]] = {}

    def _collate_function(self):
        return packed_collate if self.pack else pad_collate

    def _packed(self, dataset: _ListDataset, what: str) -> _ListDataset:
        lengths = [len(e["input_ids"]) for e in dataset.examples]
        rows = pack_examples(dataset.examples, self.max_length)
        # The padding removed: that of the same conversations in padded batches holding as many of them as a batch
        # of packed rows does (unshuffled order), against that of the packed rows in batches of batch_size.
        per_batch = max(1, round(len(lengths) / max(1, len(rows)) * self.batch_size))
        stats = {
            "examples": len(lengths),
            "rows": len(rows),
            "padding_before": padding_fraction(lengths, per_batch),
            "padding_after": padding_fraction([len(r["input_ids"]) for r in rows], self.batch_size),
        }
        self.packing_stats[what] = stats
        rank_zero_info(
            f"{what}: packed {stats['examples']} conversations into {stats['rows']} rows of <= {self.max_length} tokens; padding "
            f"{stats['padding_before']:.1%} (batches of {per_batch} conversations) -> {stats['padding_after']:.1%} (batches of "
            f"{self.batch_size} rows)"
        )
        return _ListDataset(rows)

    def _encode_file(self, path: str, what: str, limit: Optional[int]) -> _ListDataset:
        p = _require_file(path, what)
        records = _read_jsonl(p)[:limit]
        examples = []
        for line_no, record in enumerate(records, start=1):
            messages = _require_column(record, "messages", f"{p} record {line_no}")
            example = encode_chat(self.tokenizer, messages, self.max_length)
            if any(label != IGNORE_INDEX for label in example["labels"]):
                examples.append(example)
        self.num_dropped[what] = len(records) - len(examples)
        if self.num_dropped[what]:
            rank_zero_warn(
                f"{self.num_dropped[what]} conversations in {p} have no assistant token within max_length="
                f"{self.max_length} and were dropped"
            )
        return _ListDataset(examples)

    def _build(self) -> tuple[_ListDataset, _ListDataset]:
        train = self._encode_file(self.train_file, "train_file", self.max_train_samples)
        val = self._encode_file(self.val_file, "val_file", self.max_val_samples)
        if self.pack:
            train, val = self._packed(train, "train_file"), self._packed(val, "val_file")
        return train, val


class ClassificationDataModule(_SplitFilesDataModule):
    """Sequence classification from a CSV or JSONL file (chosen by extension) with integer labels.

    Texts are truncated to ``max_length`` tokens and padded per batch to the longest one (dynamic
    padding: short sentences do not pay for the longest in the corpus). ``max_*_samples`` keep the
    first rows of each file. ``num_labels`` (``max label + 1`` over both splits) is set by ``setup``.

    Example::

        dm = ClassificationDataModule("assets/minilm-l6", "assets/data/rotten_tomatoes/train.csv",
                                      "assets/data/rotten_tomatoes/validation.csv", max_train_samples=600)
    """

    def __init__(
        self,
        tokenizer: str,
        train_file: str,
        val_file: str,
        text_column: str = "text",
        label_column: str = "label",
        max_length: int = 128,
        batch_size: int = 16,
        num_workers: int = 0,
        max_train_samples: Optional[int] = None,
        max_val_samples: Optional[int] = None,
    ) -> None:
        super().__init__(tokenizer, train_file, val_file, max_length, batch_size, num_workers, max_train_samples, max_val_samples)
        self.save_hyperparameters()
        self.text_column = text_column
        self.label_column = label_column
        self.num_labels: Optional[int] = None

    def _read_rows(self, path: Path) -> list[dict[str, Any]]:
        suffix = path.suffix.lower()
        if suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as fh:
                reader = csv.DictReader(fh)
                rows = list(reader)
                columns = reader.fieldnames or []
            for column in (self.text_column, self.label_column):
                if column not in columns:
                    raise ValueError(f"column {column!r} not found in {path}; columns found: {list(columns)}")
            return rows
        if suffix in (".jsonl", ".json"):
            return _read_jsonl(path)
        raise ValueError(f"{path}: unsupported extension {suffix!r}; use .csv or .jsonl")

    def _encode_file(self, path: str, what: str, limit: Optional[int]) -> _ListDataset:
        p = _require_file(path, what)
        texts, labels = [], []
        for row_no, row in enumerate(self._read_rows(p)[:limit], start=1):
            where = f"{p} row {row_no}"
            texts.append(str(_require_column(row, self.text_column, where)))
            label = _require_column(row, self.label_column, where)
            try:
                labels.append(int(label))
            except (TypeError, ValueError):
                message = f"{where}: label {label!r} in column {self.label_column!r} is not an integer"
                raise ValueError(message) from None
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, verbose=False)
        return _ListDataset(
            [
                {"input_ids": ids, "attention_mask": mask, "labels": label}
                for ids, mask, label in zip(enc["input_ids"], enc["attention_mask"], labels)
            ]
        )

    def _build(self) -> tuple[_ListDataset, _ListDataset]:
        train = self._encode_file(self.train_file, "train_file", self.max_train_samples)
        val = self._encode_file(self.val_file, "val_file", self.max_val_samples)
        self.num_labels = 1 + max((ex["labels"] for ex in [*train.examples, *val.examples]), default=-1)
        return train, val

"""ForgettingMonitor: the base measurement against an independent float64 evaluation of the base model, exactly
zero forgetting with the adapters disabled, the CSV logger's columns, DDP's all-reduce against one process, full
fine-tuning, a 4-bit base, resume (the base survives the checkpoint and the monitor leaves training untouched),
generation diversity, and bad input."""

from __future__ import annotations

import copy
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning_helpers import VOCAB, DestroyProcessGroupAtTeardown, LitCausalLM, lora, make_trainer, tiny_llama, token_loader
from tiny_models import randomize_adapters
from torch import nn
from torch.utils.data import DataLoader

from lightning_peft import ForgettingMonitor, PEFTCallback, Quantization, apply_peft, disable_adapters
from lightning_peft.operations.text_scoring import distinct_ngrams
from lightning_peft.quantization import quantize_model

REPO_ROOT = Path(__file__).resolve().parent.parent


def source_batches(n_batches: int = 3, batch_size: int = 2, length: int = 9, seed: int = 77) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of different real lengths, so token counts differ from batch to batch (a mean of batch
    means would then differ from the token-weighted mean)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(1, VOCAB, (batch_size, length), generator=generator)
        lengths = torch.randint(3, length + 1, (batch_size,), generator=generator)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        batches.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    return batches


def source_loader(**kwargs) -> DataLoader:
    return DataLoader(source_batches(**kwargs), batch_size=None)


@torch.no_grad()
def reference_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Independent of the package: float64 log-softmax of the logits, next-token targets, padding skipped."""
    total, count = 0.0, 0
    model.eval()
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = batch["input_ids"][:, 1:]
        keep = batch["attention_mask"][:, 1:].bool()
        total -= float(logp.gather(-1, targets[..., None])[..., 0][keep].sum())
        count += int(keep.sum())
    return total / count


class LitAdapted(LitCausalLM):
    """A module whose model already carries non-zero adapters, so its outputs differ from the base's."""

    def __init__(self) -> None:
        super().__init__(model=tiny_llama(0))
        apply_peft(self.model, lora())
        randomize_adapters(self.model, seed=1, std=0.3)


def test_the_base_measurement_is_the_base_model_evaluated_by_hand(tmp_path) -> None:
    base = tiny_llama(0)
    module = LitAdapted()
    monitor = ForgettingMonitor(source=source_loader(), every_n_steps=1)
    make_trainer(tmp_path, max_steps=1, callbacks=[monitor]).fit(module, train_dataloaders=token_loader())
    expected = reference_loss(base, source_batches())
    adapted = reference_loss(copy.deepcopy(module.model).eval(), source_batches())
    assert abs(adapted - expected) > 1e-3, "the adapters must change the outputs for this test to tell base from adapted"
    assert monitor.base["source_loss"] == pytest.approx(expected, rel=1e-6)
    assert monitor.base["source_perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)


class _TrainsThroughDisabledAdapters(LitAdapted):
    """Keeps a graph to backpropagate while its adapters are off (they then take no part in the loss)."""

    def training_step(self, batch, batch_idx):
        trainable = sum(p.sum() for p in self.parameters() if p.requires_grad)
        return super().training_step(batch, batch_idx) + 0.0 * trainable


def test_with_the_adapters_disabled_the_forgetting_is_exactly_zero(tmp_path) -> None:
    module = _TrainsThroughDisabledAdapters()
    monitor = ForgettingMonitor(source=source_loader(), every_n_steps=1, target=source_loader(seed=9))
    trainer = make_trainer(tmp_path, max_steps=3, logger=CSVLogger(tmp_path), callbacks=[monitor])
    with disable_adapters(module.model):  # the whole run, base measurement included, sees the base model
        trainer.fit(module, train_dataloaders=token_loader())
    changes = [key for key in monitor.history[-1] if key.endswith("_change")]
    assert set(changes) == {"source_loss_change", "source_perplexity_change", "target_loss_change"}
    assert [h["step"] for h in monitor.history] == [0, 1, 2, 3]
    assert all(h[key] == 0.0 for h in monitor.history for key in changes)
    with open(trainer.logger.log_dir + "/metrics.csv", newline="") as fh:
        assert all(float(row[key]) == 0.0 for row in csv.DictReader(fh) for key in changes)
    # And with them on, the same trained model has moved away from its base.
    assert monitor.measure(trainer, module)["source_loss"] != monitor.base["source_loss"]


def test_it_logs_through_a_csv_logger_with_the_expected_keys_and_a_summary(tmp_path) -> None:
    target = source_batches(n_batches=2, seed=5)
    monitor = ForgettingMonitor(source=source_loader(), every_n_steps=2, target=DataLoader(target, batch_size=None))
    trainer = make_trainer(tmp_path, max_steps=5, logger=CSVLogger(tmp_path), callbacks=[PEFTCallback(lora()), monitor])
    module = LitCausalLM()
    trainer.fit(module, train_dataloaders=token_loader(n_batches=6))
    with open(trainer.logger.log_dir + "/metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    expected = {"step", "source_loss", "source_loss_change", "source_perplexity", "source_perplexity_change", "target_loss", "target_loss_change"}
    assert set(rows[0]) == expected
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 5]  # the base, every 2 steps, and the end
    for row, measured in zip(rows, monitor.history):
        for key in expected - {"step"}:
            assert float(row[key]) == pytest.approx(measured[key], rel=1e-6)
    assert float(rows[0]["source_loss_change"]) == 0.0
    # The last target loss is the trained model's, recomputed by hand.
    assert monitor.history[-1]["target_loss"] == pytest.approx(reference_loss(module.model, target), rel=1e-6)
    last = monitor.history[-1]
    assert "learned: target loss" in monitor.summary and "forgot: source loss" in monitor.summary
    assert f"{last['target_loss']:.4f}" in monitor.summary and f"{last['source_loss']:.4f}" in monitor.summary


def test_the_trainer_target_metric_is_logged_beside(tmp_path) -> None:
    monitor = ForgettingMonitor(source=source_loader(), every_n_steps=2, target_metric="val_loss")
    trainer = make_trainer(tmp_path, max_steps=4, val_check_interval=2, callbacks=[PEFTCallback(lora()), monitor])
    trainer.fit(LitCausalLM(), train_dataloaders=token_loader(n_batches=4), val_dataloaders=token_loader(n_batches=1))
    module = trainer.lightning_module
    measured = [h for h in monitor.history if "target_val_loss" in h]
    # Validation at steps 2 and 4 lands on the rows of the source measurements of the same steps.
    assert [h["step"] for h in measured] == [2, 4] and all("source_loss" in h for h in measured)
    with torch.no_grad():
        module.model.eval()
        by_hand = float(module._loss(next(iter(token_loader(n_batches=1)))))
    assert measured[-1]["target_val_loss"] == pytest.approx(by_hand, rel=1e-6)
    assert "target val_loss" in monitor.summary
    # A validation outside fit (as the CLI runs before and after it) adds nothing to the run's curve.
    before = copy.deepcopy(monitor.history)
    trainer.validate(module, dataloaders=token_loader(n_batches=1), verbose=False)
    assert monitor.history == before


def test_full_fine_tuning_is_measured_against_the_model_before_any_step(tmp_path) -> None:
    module = LitCausalLM()
    before = reference_loss(copy.deepcopy(module.model), source_batches())
    monitor = ForgettingMonitor(source=source_loader(), every_n_steps=2)
    make_trainer(tmp_path, max_steps=4, callbacks=[monitor]).fit(module, train_dataloaders=token_loader())
    assert monitor.base["source_loss"] == pytest.approx(before, rel=1e-6)
    after = reference_loss(module.model, source_batches())
    assert monitor.history[-1]["source_loss"] == pytest.approx(after, rel=1e-6)
    assert monitor.history[-1]["source_loss_change"] == pytest.approx(after - before, abs=1e-6)
    assert abs(after - before) > 1e-3


def test_a_four_bit_base_is_measured_with_its_adapters_disabled(tmp_path) -> None:
    quantization = Quantization(bits=4, compute_dtype="float32")
    reference = tiny_llama(0)
    quantize_model(reference, quantization)
    expected = reference_loss(reference, source_batches())
    monitor = ForgettingMonitor(source=source_loader(), every_n_steps=1)
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[PEFTCallback(lora(), quantization=quantization), monitor])
    trainer.fit(LitCausalLM(), train_dataloaders=token_loader())
    assert monitor.base["source_loss"] == pytest.approx(expected, rel=1e-6)
    assert [h["step"] for h in monitor.history] == [0, 1, 2]


class _Dropout(LitCausalLM):
    """Dropout draws from the global generator: any random draw the monitor made would change the losses."""

    def __init__(self) -> None:
        super().__init__(attention_dropout=0.3)


def test_the_monitor_leaves_training_exactly_as_without_it(tmp_path) -> None:
    plain, monitored = _Dropout(), _Dropout()
    L.seed_everything(5)
    make_trainer(tmp_path / "a", max_steps=4, callbacks=[PEFTCallback(lora())]).fit(plain, train_dataloaders=token_loader())
    L.seed_everything(5)
    monitor = ForgettingMonitor(source=DataLoader(source_batches(), batch_size=None, shuffle=True), every_n_steps=1, metrics=("loss", "distinct"), prompts=[[1, 2, 3]], max_new_tokens=4)
    make_trainer(tmp_path / "b", max_steps=4, callbacks=[PEFTCallback(lora()), monitor]).fit(monitored, train_dataloaders=token_loader())
    assert plain.step_losses == monitored.step_losses
    assert len(monitor.history) == 5


def test_a_resumed_run_keeps_the_base_it_started_from(tmp_path) -> None:
    first = ForgettingMonitor(source=source_loader(), every_n_steps=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    make_trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[first, checkpoint]).fit(LitCausalLM(), train_dataloaders=token_loader())
    resumed = ForgettingMonitor(source=source_loader(), every_n_steps=2)
    module = LitCausalLM()
    trainer = make_trainer(tmp_path, max_steps=4, enable_checkpointing=True, callbacks=[resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt2")])
    trainer.fit(module, train_dataloaders=token_loader(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    # Full fine-tuning: measured at this fit's start, the "base" would be the step-2 weights.
    assert resumed.base == first.base
    assert [h["step"] for h in resumed.history] == [0, 2, 4]
    assert resumed.history[:2] == first.history


def test_distinct_ngrams_closed_form() -> None:
    assert distinct_ngrams([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)  # (1,2) (2,1) (1,2)
    assert distinct_ngrams([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert distinct_ngrams([[7]], 2) == 1.0  # no bigram at all
    with pytest.raises(ValueError, match="n must be >= 1 for distinct n-grams, got 0"):
        distinct_ngrams([[1]], 0)


def test_diversity_is_logged_and_repeats_for_the_same_model(tmp_path) -> None:
    monitor = ForgettingMonitor(source=source_loader(), every_n_steps=2, metrics=["loss", "distinct"], prompts=[[5, 6], [7, 8, 9]], max_new_tokens=6, ngram=2)
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[PEFTCallback(lora()), monitor])
    module = LitCausalLM()
    trainer.fit(module, train_dataloaders=token_loader())
    again = monitor.measure(trainer, module)
    assert again["distinct_2"] == monitor.history[-1]["distinct_2"]
    assert 0.0 < again["distinct_2"] <= 1.0
    assert "distinct_2_change" in monitor.history[-1]


class _ExpectOnEveryRank(L.Callback):
    def __init__(self, expected: float, batches: list[dict[str, torch.Tensor]]) -> None:
        self.expected, self.batches = expected, batches

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        monitor = next(c for c in trainer.callbacks if isinstance(c, ForgettingMonitor))
        assert trainer.world_size == 2
        assert monitor.base["source_loss"] == pytest.approx(self.expected, rel=1e-6), (trainer.global_rank, monitor.base)
        # After the step: the trained model (the same on both ranks) scored on all batches in this one process.
        trained = reference_loss(copy.deepcopy(pl_module.model), self.batches)
        assert monitor.history[-1]["step"] == 1 and monitor.history[-1]["source_loss"] == pytest.approx(trained, rel=1e-6)


def test_ddp_all_reduce_equals_the_one_process_value(tmp_path) -> None:
    # 3 batches on 2 ranks: rank 0 scores batches 0 and 2, rank 1 batch 1, with different token counts.
    batches = source_batches(n_batches=3)
    expected = reference_loss(tiny_llama(0), batches)
    monitor = ForgettingMonitor(source=DataLoader(batches, batch_size=None), every_n_steps=1)
    trainer = make_trainer(
        tmp_path, strategy="ddp_spawn", devices=2, max_steps=1,
        callbacks=[PEFTCallback(lora()), monitor, _ExpectOnEveryRank(expected, batches), DestroyProcessGroupAtTeardown()],
    )  # fmt: skip
    trainer.fit(LitCausalLM(), train_dataloaders=token_loader(n_batches=4))


def test_under_ddp_a_bad_batch_on_one_rank_raises_on_every_rank(tmp_path) -> None:
    # Batch 1 belongs to rank 1's shard; rank 0 must not be left waiting in the all-reduce (a hang, not an error).
    batches = source_batches(n_batches=2)
    batches[1] = {**batches[1], "input_ids": batches[1]["input_ids"] + VOCAB}
    monitor = ForgettingMonitor(source=DataLoader(batches, batch_size=None), every_n_steps=1)
    trainer = make_trainer(tmp_path, strategy="ddp_spawn", devices=2, max_steps=1, callbacks=[PEFTCallback(lora()), monitor, DestroyProcessGroupAtTeardown()])
    with pytest.raises(Exception, match="token ids range over"):
        trainer.fit(LitCausalLM(), train_dataloaders=token_loader(n_batches=4))


# -- bad input --------------------------------------------------------------------------------------------
def test_a_source_without_batches_is_named(tmp_path) -> None:
    monitor = ForgettingMonitor(source=DataLoader([], batch_size=None), every_n_steps=1)
    with pytest.raises(ValueError, match="the source loader yielded no batches with tokens to predict"):
        make_trainer(tmp_path, max_steps=1, callbacks=[monitor]).fit(LitCausalLM(), train_dataloaders=token_loader())


@pytest.mark.parametrize(
    "batch, message",
    [
        ({"input_ids": torch.tensor([[3, -1, 4]])}, r"token ids range over \[-1, 4\]"),
        ({"input_ids": torch.tensor([[3, 5, 4]]), "labels": torch.tensor([[-100, 5, VOCAB + 1]])}, rf"labels range over \[5, {VOCAB + 1}\]"),
    ],
)
def test_negative_ids_and_labels_outside_the_vocabulary_are_named(tmp_path, batch, message) -> None:
    monitor = ForgettingMonitor(source=DataLoader([batch], batch_size=None), every_n_steps=1)
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, max_steps=1, callbacks=[monitor]).fit(LitCausalLM(), train_dataloaders=token_loader())


def test_a_one_shot_iterator_is_refused() -> None:
    with pytest.raises(TypeError, match="source is a one-shot iterator .*pass a DataLoader or a list of batches"):
        ForgettingMonitor(source=(batch for batch in source_batches()))


def test_ids_of_another_tokenizer_are_named(tmp_path) -> None:
    batch = {"input_ids": torch.tensor([[3, VOCAB + 500, 4]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    monitor = ForgettingMonitor(source=DataLoader([batch], batch_size=None), every_n_steps=1)
    message = rf"token ids range over \[3, {VOCAB + 500}\] but the model's vocabulary has {VOCAB} ids .*model's own tokenizer"
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, max_steps=1, callbacks=[monitor]).fit(LitCausalLM(), train_dataloaders=token_loader())


@pytest.mark.parametrize("every", [0, -3, 1.5, True])
def test_every_n_steps_must_be_positive(every) -> None:
    with pytest.raises(ValueError, match=rf"every_n_steps must be a positive integer .*got {every!r}"):
        ForgettingMonitor(source=source_loader(), every_n_steps=every)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(metrics=["loss", "bleu"]), r"metrics must be a non-empty subset of \['loss', 'perplexity', 'distinct'\], got \['loss', 'bleu'\]"),
        (dict(metrics=["distinct"]), "metrics include 'distinct' but no prompts were given"),
        (dict(max_batches=0), "max_batches must be a positive integer, got 0"),
        (dict(ngram=0, prompts=[[1]]), "ngram must be a positive integer, got 0"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ForgettingMonitor(source=source_loader(), **kwargs)


def test_a_source_that_is_not_batches_is_named() -> None:
    with pytest.raises(TypeError, match="source must be a DataLoader .* or a LightningDataModule, got str"):
        ForgettingMonitor(source="assets/data/chat/validation.jsonl")


def test_a_batch_without_input_ids_is_named(tmp_path) -> None:
    monitor = ForgettingMonitor(source=DataLoader([{"text": torch.zeros(1)}], batch_size=None), every_n_steps=1)
    with pytest.raises(ValueError, match=r"source: a batch must be a dict with 'input_ids' .*got \['text'\]"):
        make_trainer(tmp_path, max_steps=1, callbacks=[monitor]).fit(LitCausalLM(), train_dataloaders=token_loader())


@pytest.mark.assets
@pytest.mark.slow
def test_the_claims_benchmark_quick_mode_runs_on_the_real_model(assets_dir, tmp_path) -> None:
    """``bench_forgetting.py --quick``: 2 steps of full fine-tuning and of LoRA r=8 on SmolLM2 + Hamlet, measured on
    chat. The spectrum ranks it reports obey what the methods allow: a rank-8 LoRA perturbation has at most 8."""
    args = [
        sys.executable, str(REPO_ROOT / "benchmarks" / "bench_forgetting.py"), "--quick", "--out", str(tmp_path),
        "--model", str(assets_dir / "smollm2-135m-instruct"), "--text", str(assets_dir / "data" / "hamlet.txt"),
        "--chat", str(assets_dir / "data" / "chat" / "validation.jsonl"),
    ]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {r["method"]: r for r in json.loads((tmp_path / "forgetting.json").read_text())["runs"]}
    assert set(runs) == {"full fine-tuning", "LoRA r=8 (all linear)"}
    for run in runs.values():
        assert math.isfinite(run["learned"]) and math.isfinite(run["forgot"]) and run["steps"] == 2
        assert run["learned"] > 0, run  # two steps on Hamlet already lower the held-out Hamlet loss
    assert 1 <= runs["LoRA r=8 (all linear)"]["rank_90_max"] <= 8
    assert runs["full fine-tuning"]["rank_90_mean"] > 8
    assert "| full fine-tuning |" in result.stdout and "| LoRA r=8 (all linear) |" in result.stdout


def test_gradient_accumulation_measures_once_per_optimizer_step(tmp_path) -> None:
    monitor = ForgettingMonitor(source=source_loader(), every_n_steps=1)
    make_trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, callbacks=[PEFTCallback(lora()), monitor]).fit(
        LitCausalLM(), train_dataloaders=token_loader(n_batches=6)
    )
    assert [h["step"] for h in monitor.history] == [0, 1, 2, 3]


def test_a_measurement_leaves_every_module_in_its_mode(tmp_path) -> None:
    monitor = ForgettingMonitor(source=source_loader(), every_n_steps=1)
    module = LitCausalLM()
    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[PEFTCallback(lora()), monitor])
    trainer.fit(module, train_dataloaders=token_loader())
    module.model.train()
    module.model.model.layers[0].eval()  # a frozen block its owner keeps in eval mode
    modes = {name: m.training for name, m in module.model.named_modules()}
    monitor.measure(trainer, module)
    assert {name: m.training for name, m in module.model.named_modules()} == modes


def test_two_monitors_on_two_sources_in_one_trainer_checkpoint_apart(tmp_path) -> None:
    chat = ForgettingMonitor(source=source_loader(seed=1), every_n_steps=1, name="chat")
    reviews = ForgettingMonitor(source=source_loader(seed=2), every_n_steps=1, name="reviews")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1)
    make_trainer(tmp_path, max_steps=1, enable_checkpointing=True, callbacks=[PEFTCallback(lora()), chat, reviews, checkpoint]).fit(
        LitCausalLM(), train_dataloaders=token_loader()
    )
    assert chat.base["source_loss"] != reviews.base["source_loss"]
    state = torch.load(next((tmp_path / "ckpt").glob("*.ckpt")), weights_only=True)["callbacks"]
    assert state[chat.state_key]["base"] == chat.base and state[reviews.state_key]["base"] == reviews.base


def test_a_run_that_takes_no_step_is_measured_once_at_the_end(tmp_path) -> None:
    # ITI and other methods fitted from data end the fit at step 0: the fitted model must still be scored.
    class _StopAtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            randomize_adapters(pl_module.model, seed=3, std=0.3)  # what a data-driven fit would install
            trainer.should_stop = True

    monitor = ForgettingMonitor(source=source_loader(), every_n_steps=5)
    make_trainer(tmp_path, max_steps=5, callbacks=[PEFTCallback(lora()), monitor, _StopAtStart()]).fit(LitCausalLM(), train_dataloaders=token_loader())
    assert [h["step"] for h in monitor.history] == [0, 0]
    assert monitor.history[-1]["source_loss_change"] != 0.0


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_strategies_are_refused_with_the_reason(strategy) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    sharded = FSDPStrategy() if strategy == "fsdp" else DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    monitor = ForgettingMonitor(source=source_loader())
    with pytest.raises(ValueError, match=rf"ForgettingMonitor does not support {type(sharded).__name__}: .*Use DDP"):
        monitor.setup(SimpleNamespace(strategy=sharded), LitCausalLM(), "fit")


def test_nested_disable_adapters_leaves_the_outer_one_in_force() -> None:
    model = LitAdapted().model
    batch = source_batches(n_batches=1)
    with disable_adapters(model):
        base = reference_loss(model, batch)
        with disable_adapters(model):
            pass
        assert reference_loss(model, batch) == base  # still the base model after the inner block
    assert reference_loss(model, batch) != base

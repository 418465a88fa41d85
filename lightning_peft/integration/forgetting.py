"""``ForgettingMonitor``: measure what a fine-tune forgets, not just what it learns.

Biderman et al., 2024, "LoRA Learns Less and Forgets Less" (arXiv:2405.09673): a fine-tuning run has two
numbers, how much it learned on the target domain and how much it lost on the *source* domain, what the base
model could do before. They plot one against the other (the learning-forgetting Pareto curve) and find that
LoRA sits lower on both axes than full fine-tuning, while keeping the base model's generations more diverse.

This callback takes the second number during training, for any method (or none: full fine-tuning) on any
Trainer. When training starts it measures the base model on source-domain text (with the adapters disabled, so what is
measured is the base even when an init such as text-initialised prompt tuning already changed the outputs;
before any step for full fine-tuning). Every ``every_n_steps`` optimizer steps, and once more at the end, it
measures the current model the same way and logs, through the Trainer's loggers:

- ``source_loss``, ``source_perplexity``: token-weighted mean NLL on the source text, and ``exp`` of it;
- ``source_loss_change``, ``source_perplexity_change``: the same minus the base model's value (> 0: forgetting);
- ``distinct_<n>``, ``distinct_<n>_change`` with ``"distinct"`` in ``metrics``: distinct-n of sampled
  continuations of fixed prompts (a cheap diversity statistic; see :mod:`lightning_peft.operations.text_scoring`);
- ``target_loss`` and ``target_loss_change`` when a ``target`` loader is given; and the Trainer's own target
  metric (``target_metric``, e.g. ``val_loss``) as ``target_<name>`` beside them whenever it has a value.

At fit end one line sums it up: learned X on the target, forgot Y on the source.

Under DDP every rank scores every ``world_size``-th batch of the source loader and the sums of token NLLs and
token counts are all-reduced, so the result equals the one-process value. Every rank checks every batch first,
so bad input raises on all ranks together instead of leaving the others waiting in the all-reduce. Sharded
strategies (FSDP, DeepSpeed) are refused at setup: there a forward pass is itself a collective that each rank
must enter as often as the others, and the inner model cannot be called outside its root wrapper. The
measurement runs without gradients, in eval mode, under the Trainer's precision, with the random generators
forked and restored: a monitored run trains exactly as an unmonitored one, and resumes exactly (the base
measurement is kept in the checkpoint, so a resumed full fine-tune is still compared with the model it started
from). The base is measured at ``on_train_start``, after every strategy has restored its checkpoint.

Costs: one forward pass over the source batches per measurement (``max_batches`` caps them), plus, with
``"distinct"``, ``len(prompts) * max_new_tokens`` decoding steps. With ``every_n_steps`` at 10x the time of
one measurement, the monitor adds about 10% to a run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_peft.core.model_lookup import find_model
from lightning_peft.integration.strategies import shards_parameters
from lightning_peft.operations.merging import disable_adapters
from lightning_peft.operations.text_scoring import (
    check_token_ids,
    distinct_ngrams,
    negative_log_likelihood_sums,
    sampled_continuations,
    vocabulary_size,
)

METRICS = ("loss", "perplexity", "distinct")

Source = Union[Iterable[dict[str, torch.Tensor]], pl.LightningDataModule]


def _check_source(source: Any, what: str) -> None:
    if isinstance(source, (str, bytes, dict)) or not (isinstance(source, pl.LightningDataModule) or hasattr(source, "__iter__")):
        raise TypeError(
            f"{what} must be a DataLoader (or any iterable of batches) or a LightningDataModule, got {type(source).__name__}"
        )
    if isinstance(source, Iterator):
        # A generator is used up by the first measurement; the second would find it empty. (Checked by type: calling
        # iter() on a DataLoader would draw from the global random generator.)
        raise TypeError(f"{what} is a one-shot iterator ({type(source).__name__}); pass a DataLoader or a list of batches, which can be read again")


def _loader_of(source: Source) -> Iterable[dict[str, torch.Tensor]]:
    """A data module's validation loader (set up here if the Trainer has not), or the loader itself."""
    if isinstance(source, pl.LightningDataModule):
        source.prepare_data()
        source.setup("validate")
        return source.val_dataloader()
    return source


class ForgettingMonitor(Callback):
    """Log source-domain loss and perplexity (and optionally generation diversity) against the base model.

    Args:
        source: source-domain text, as a DataLoader (or any iterable) of causal-LM batches (dicts with
            ``input_ids`` and optionally ``attention_mask`` and ``labels``; padding is masked out), or a
            LightningDataModule whose ``val_dataloader()`` gives them.
        every_n_steps: measure every this many optimizer steps (and at the end of training).
        metrics: any of ``"loss"``, ``"perplexity"``, ``"distinct"`` (the last needs ``prompts``). The source loss
            is logged whatever is asked: the other figures are read against it.
        target: optional target-domain batches, scored the same way (``target_loss``), base included.
        target_metric: the Trainer metric logged beside the source figures (``target_<name>``) and used for the
            summary when no ``target`` loader is given.
        max_batches: score only the first this many source (and target) batches.
        prompts: token-id lists, or strings (tokenized by the LightningModule's ``tokenizer``), to continue for
            ``"distinct"``.
        max_new_tokens: tokens sampled per prompt; ngram: the ``n`` of distinct-n; seed: the sampling seed.
        model_attr: attribute of the LightningModule holding the model (by default the module's
            ``peft_model_attr``, else the single transformers model inside it, as ``PEFTCallback`` finds it).
        name: tells monitors apart in one Trainer (one per source domain): it keys each one's checkpoint state.

    Example::

        monitor = ForgettingMonitor(source=DataLoader(chat_blocks, batch_size=8), every_n_steps=50)
        trainer = L.Trainer(callbacks=[PEFTCallback(LoRA(r=8, target_modules="all-linear")), monitor])
        trainer.fit(task, datamodule=shakespeare)
        print(monitor.summary)  # learned: target val_loss 3.93 -> 3.41 (-0.52); forgot: source loss ...
    """

    def __init__(
        self,
        source: Source,
        every_n_steps: int = 50,
        metrics: Sequence[str] = ("loss", "perplexity"),
        target: Optional[Source] = None,
        target_metric: Optional[str] = "val_loss",
        max_batches: Optional[int] = None,
        prompts: Optional[Sequence[Union[str, Sequence[int]]]] = None,
        max_new_tokens: int = 32,
        ngram: int = 2,
        seed: int = 0,
        model_attr: Optional[str] = None,
        name: Optional[str] = None,
    ) -> None:
        _check_source(source, "source")
        if target is not None:
            _check_source(target, "target")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be a positive integer (optimizer steps between measurements), got {every_n_steps!r}")
        if isinstance(metrics, str):
            metrics = [metrics]
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics:
            raise ValueError(f"metrics must be a non-empty subset of {list(METRICS)}, got {list(metrics)!r}")
        if "distinct" in metrics and not prompts:
            raise ValueError("metrics include 'distinct' but no prompts were given: pass prompts=[...] to sample continuations of")
        for argument, value in (("max_batches", max_batches), ("max_new_tokens", max_new_tokens), ("ngram", ngram)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{argument} must be a positive integer, got {value!r}")
        self.source = source
        self.every_n_steps = every_n_steps
        self.metrics = tuple(metrics)
        self.target = target
        self.target_metric = target_metric
        self.max_batches = max_batches
        self.prompts = list(prompts) if prompts is not None else None
        self.max_new_tokens = max_new_tokens
        self.ngram = ngram
        self.seed = seed
        self.model_attr = model_attr
        self.name = name
        # What the checkpoint carries: the base model's figures and every measurement so far.
        self.base: Optional[dict[str, float]] = None
        self.history: list[dict[str, float]] = []
        self.summary: Optional[str] = None
        self._last_step: Optional[int] = None
        self._first_target_metric: Optional[float] = None
        self._last_target_metric: Optional[float] = None
        self._measured_after_base = False
        self._loaders: dict[str, Iterable] = {}

    # -- measuring ---------------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name) if self.name is not None else super().state_key

    def _model(self, pl_module: pl.LightningModule) -> nn.Module:
        model = find_model(pl_module, self.model_attr or getattr(pl_module, "peft_model_attr", None))
        if model is None:
            raise ValueError(f"{type(pl_module).__name__} holds no model to measure (model_attr={self.model_attr!r})")
        return model

    def _shard(self, loader: Iterable, trainer: pl.Trainer, vocab: int, what: str) -> list[dict[str, torch.Tensor]]:
        """This rank's batches: every ``world_size``-th, from its rank on, of the first ``max_batches``. Every
        batch is checked on every rank, so a bad one raises everywhere before any rank enters the all-reduce."""
        rank, world = trainer.global_rank, trainer.world_size
        mine = []
        for index, batch in enumerate(loader):
            if self.max_batches is not None and index >= self.max_batches:
                break
            check_token_ids(batch, vocab, what)
            if index % world == rank:
                mine.append(batch)
        return mine

    def _mean_loss(self, loader: Iterable, trainer: pl.Trainer, model: nn.Module, what: str) -> float:
        device = trainer.strategy.root_device
        batches = self._shard(loader, trainer, vocabulary_size(model), what)
        sums = negative_log_likelihood_sums(model, batches, device, what)
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
        if float(sums[1]) == 0:
            raise ValueError(
                f"the {what} loader yielded no batches with tokens to predict (an empty loader, or every label "
                f"masked); give the ForgettingMonitor at least one batch of text"
            )
        return float(sums[0] / sums[1])

    def _prompt_ids(self, pl_module: pl.LightningModule) -> list[list[int]]:
        assert self.prompts is not None
        tokenizer = getattr(pl_module, "tokenizer", None)
        if tokenizer is None and any(isinstance(p, str) for p in self.prompts):
            raise ValueError(
                f"prompts are strings but {type(pl_module).__name__} has no tokenizer attribute; pass token-id lists instead"
            )
        ids = [list(map(int, p)) if not isinstance(p, str) else tokenizer(p)["input_ids"] for p in self.prompts]
        vocab = vocabulary_size(self._model(pl_module))
        for prompt in ids:
            check_token_ids({"input_ids": torch.tensor([prompt])}, vocab, "prompts")
        return ids

    def _loader(self, what: str) -> Iterable:
        """The source (or target) loader, resolved once per fit: a data module is prepared and set up here."""
        if what not in self._loaders:
            self._loaders[what] = _loader_of(self.source if what == "source" else self.target)
        return self._loaders[what]

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Score the model as it is now (eval mode, no gradient, the random state left untouched)."""
        model = self._model(pl_module)
        modes = {module: module.training for module in model.modules()}
        device = trainer.strategy.root_device
        values: dict[str, float] = {}
        model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), trainer.strategy.precision_plugin.forward_context():
                # The loss is always logged: every other source figure is read against it.
                loss = values["source_loss"] = self._mean_loss(self._loader("source"), trainer, model, "source")
                if "perplexity" in self.metrics:
                    values["source_perplexity"] = math.exp(min(loss, 700.0))
                if self.target is not None:
                    values["target_loss"] = self._mean_loss(self._loader("target"), trainer, model, "target")
                if "distinct" in self.metrics:
                    continuations = sampled_continuations(model, self._prompt_ids(pl_module), self.max_new_tokens, self.seed, device)
                    values[f"distinct_{self.ngram}"] = distinct_ngrams(continuations, self.ngram)
        finally:
            for module, training in modes.items():
                module.training = training
        return values

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        values = self.measure(trainer, pl_module)
        assert self.base is not None
        logged = dict(values)
        for key, value in values.items():
            logged[f"{key}_change"] = value - self.base[key]
        self._log(trainer, logged, step)
        self.history.append({"step": float(step), **logged})
        self._last_step = step
        self._measured_after_base = True

    @staticmethod
    def _log(trainer: pl.Trainer, values: dict[str, float], step: int) -> None:
        # Straight to the loggers: self.log is not allowed in on_fit_start, and these figures belong to a
        # step, not to an epoch aggregate. callback_metrics lets ModelCheckpoint(monitor="source_loss") use them.
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in values.items()})

    # -- hooks -------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        if shards_parameters(trainer.strategy):
            raise ValueError(
                f"ForgettingMonitor does not support {type(trainer.strategy).__name__}: under a sharded strategy each forward "
                f"pass is a collective every rank must enter equally often, through the root wrapper. Use DDP (strategy='ddp'), "
                f"or measure the exported adapter on one device afterwards"
            )
        # A new fit starts a new run: nothing of an earlier fit of this instance carries over. A resumed fit gets its
        # state back from the checkpoint (load_state_dict), which comes after setup.
        self.base, self.history, self.summary, self._last_step = None, [], None, None
        self._first_target_metric = self._last_target_metric = None
        self._measured_after_base = False
        self._loaders = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_start, not on_fit_start: FSDP and DeepSpeed restore checkpoints after on_fit_start, and a
        # "base" measured before that would be the unrestored model.
        if self.base is not None:
            return  # resumed: the base was measured when the run began, before any step
        with disable_adapters(self._model(pl_module)):
            self.base = self.measure(trainer, pl_module)
        base = dict(self.base)
        base.update({f"{key}_change": 0.0 for key in self.base})
        self._log(trainer, base, trainer.global_step)
        self.history.append({"step": float(trainer.global_step), **base})
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        # global_step moves once per optimizer step: with gradient accumulation several batches end on one step.
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._record(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation runs after the step's on_train_batch_end, so the target metric is read here, when it is new,
        # and logged at the same step as the source figures measured just before it.
        # Only inside fit: a trainer.validate() before or after it (as the CLI runs) is not part of the run's curve.
        fitting = trainer.state.fn == TrainerFn.FITTING
        if not fitting or trainer.sanity_checking or self.target_metric is None or self.target_metric not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.target_metric])
        key = f"target_{self.target_metric}"
        self._log(trainer, {key: value}, trainer.global_step)
        if self.history and self.history[-1]["step"] == trainer.global_step:
            self.history[-1][key] = value
        else:
            self.history.append({"step": float(trainer.global_step), key: value})
        if self._first_target_metric is None:
            self._first_target_metric = value
        self._last_target_metric = value

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.base is None:
            return
        # Also when no step was taken (a method fitted from data, like ITI): the run's model is then measured once.
        if trainer.global_step != self._last_step or not self._measured_after_base:
            self._record(trainer, pl_module)
        self.summary = self._summary(trainer)
        rank_zero_info(self.summary)

    def _summary(self, trainer: pl.Trainer) -> str:
        assert self.base is not None
        last = next(h for h in reversed(self.history) if "source_loss" in h)
        if "target_loss" in self.base:
            learned = f"target loss {self.base['target_loss']:.4f} -> {last['target_loss']:.4f} ({last['target_loss_change']:+.4f})"
        elif self._first_target_metric is not None:
            learned = (
                f"target {self.target_metric} {self._first_target_metric:.4f} (first validation) -> {self._last_target_metric:.4f} "
                f"({self._last_target_metric - self._first_target_metric:+.4f})"
            )
        else:
            learned = "no target measurement (pass target= or validate during fit)"
        loss = self.base["source_loss"], last["source_loss"]
        forgot = f"source loss {loss[0]:.4f} -> {loss[1]:.4f} ({loss[1] - loss[0]:+.4f}, perplexity x{math.exp(min(loss[1] - loss[0], 700.0)):.3f})"
        extra = ""
        key = f"distinct_{self.ngram}"
        if key in self.base:
            extra = f"; distinct-{self.ngram} {self.base[key]:.3f} -> {last[key]:.3f}"
        return f"ForgettingMonitor at step {trainer.global_step}: learned: {learned}; forgot: {forgot}{extra}"

    # -- checkpoint state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "history": self.history,
            "last_step": self._last_step,
            "first_target_metric": self._first_target_metric,
            "last_target_metric": self._last_target_metric,
            "measured_after_base": self._measured_after_base,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base = state_dict["base"]
        self.history = list(state_dict["history"])
        self._last_step = state_dict["last_step"]
        self._first_target_metric = state_dict["first_target_metric"]
        self._last_target_metric = state_dict["last_target_metric"]
        self._measured_after_base = state_dict["measured_after_base"]

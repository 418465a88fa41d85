"""Small LightningModules, models and data shared by the Lightning integration tests.

Everything is tiny, random-initialised from a config, seeded and float32, so a test runs in about a
second on CPU and two runs with the same seed are bitwise identical.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lightning_peft import LoRA, PEFTMixin
from lightning_peft.core.adapter_layer import adapter_layers

# Tiny models on a shared 2-core machine: extra intra-op threads only fight each other (10x slower).
torch.set_num_threads(1)

VOCAB = 128
TARGETS = ["q_proj", "v_proj"]


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    config = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_dropout=0.0,
    )
    config.update(overrides)
    return LlamaConfig(**config)


def tiny_llama(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """A random-init tiny Llama; the same seed gives bitwise the same weights."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).float()


def save_tiny_llama(path: Any, seed: int = 0, **overrides: Any) -> str:
    tiny_llama(seed, **overrides).save_pretrained(path)
    return str(path)


def token_batches(n_batches: int = 3, batch_size: int = 2, seq_len: int = 8, seed: int = 1234) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n_batches * batch_size, seq_len), generator=generator)
    return [{"input_ids": row} for row in ids]


def token_loader(n_batches: int = 3, batch_size: int = 2, seq_len: int = 8, seed: int = 1234) -> DataLoader:
    """``n_batches`` fixed batches of dicts, always in the same order."""
    return DataLoader(token_batches(n_batches, batch_size, seq_len, seed), batch_size=batch_size, shuffle=False)


def make_trainer(tmp_path: Any, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        max_steps=2,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def lora(**overrides: Any) -> LoRA:
    args: dict[str, Any] = dict(r=4, alpha=8, target_modules=list(TARGETS))
    args.update(overrides)
    return LoRA(**args)


class _CausalLMSteps:
    """Training/eval steps shared by the two modules; records every training loss by global step."""

    lr = 1e-2

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss  # type: ignore[attr-defined]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.step_losses[self.global_step + 1] = loss.item()  # type: ignore[attr-defined]
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))  # type: ignore[attr-defined]

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch))  # type: ignore[attr-defined]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Only trainable parameters, built here (after injection): the pattern the package asks for.
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)  # type: ignore[attr-defined]


class LitCausalLM(_CausalLMSteps, L.LightningModule):
    """A plain module holding ``self.model`` built in ``__init__`` (the PEFTCallback path)."""

    def __init__(self, seed: int = 0, model: nn.Module | None = None, **config: Any) -> None:
        super().__init__()
        self.model = model if model is not None else tiny_llama(seed, **config)
        self.step_losses: dict[int, float] = {}


class LitTwoModels(_CausalLMSteps, L.LightningModule):
    """Two transformers models in one module: which to adapt is ambiguous without ``model_attr``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama(0)
        # Parameters outside the adapted model keep their requires_grad (a head beside the backbone
        # should train), so a teacher is frozen by its owner, as distillation code does anyway.
        self.teacher = tiny_llama(1).requires_grad_(False)
        self.step_losses: dict[int, float] = {}


class LitEagerOptimizer(LitCausalLM):
    """Builds its optimizer from ``self.parameters()`` in ``__init__``, i.e. before injection."""

    def __init__(self) -> None:
        super().__init__()
        self.eager_optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.eager_optimizer


class LitPEFTCausalLM(_CausalLMSteps, PEFTMixin, L.LightningModule):
    """A PEFTMixin module that builds its base in ``configure_base_model``.

    The base comes from ``model_path`` (a ``save_pretrained`` directory) or from ``seed``; the LoRA
    arguments, when given, set the method in ``__init__`` (otherwise a PEFTCallback hands it over).
    ``events`` records what ``configure_model`` did, in order.
    """

    def __init__(self, model_path: str | None = None, seed: int = 0, lora_args: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        if lora_args is not None:
            self.peft_method = LoRA(**lora_args)
        self.model: nn.Module | None = None
        self.events: list[tuple[str, Any]] = []
        self.step_losses: dict[int, float] = {}

    def configure_base_model(self) -> nn.Module:
        self.events.append(("build", None))
        if self.hparams.model_path is not None:
            return AutoModelForCausalLM.from_pretrained(self.hparams.model_path, dtype=torch.float32)
        return tiny_llama(self.hparams.seed)


class LitPEFTParallel(LitPEFTCausalLM):
    """Records each ``parallelize`` call and whether the adapters already existed at that moment."""

    def parallelize(self) -> None:
        self.events.append(("parallelize", len(list(adapter_layers(self.model)))))


class LitMLP(L.LightningModule):
    """A plain torch model (no transformers): ``self.net = Sequential(Linear, ReLU, Linear)``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.step_losses: dict[int, float] = {}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.step_losses[self.global_step + 1] = loss.item()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def mlp_loader(n: int = 16, batch_size: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(n, 8, generator=generator)
    y = torch.randn(n, 4, generator=generator)
    return DataLoader(list(zip(x, y)), batch_size=batch_size, shuffle=False)


def logits(model: nn.Module, batch: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    batch = batch or next(iter(token_loader(n_batches=1)))
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def trainable_names(module: nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def clean_environment() -> dict[str, str]:
    """This process's environment without Lightning's seed variables: an earlier test in the same pytest worker
    may have called seed_everything, and a distributed strategy re-seeds from PL_GLOBAL_SEED in its setup while a
    single-device run does not, so the runs would start from different adapters."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PL_")}


def shard_llama_fsdp2(model: nn.Module, mesh: Any) -> None:
    """FSDP2 the usual way: every decoder layer, then the root, over ``mesh`` (after the adapters were injected)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def run_distributed_script(main) -> None:
    """Run a distributed test script's ``main`` and then take its process group down explicitly.

    Left to interpreter exit, the gloo process group's threads are torn down in whatever order the runtime
    picks; now and then a rank then aborted *after* finishing ("terminate called without an active
    exception", exit -6) and failed a run that had succeeded. torch asks for destroy_process_group() anyway.
    """
    import torch.distributed as dist

    main()  # a rank that fails raises here: no barrier that the others would wait at forever
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears down while another still talks to it
        dist.destroy_process_group()


class DestroyProcessGroupAtTeardown(L.Callback):
    """Each spawned rank takes its gloo process group down itself: left to the exit of the worker process,
    its threads are torn down in any order and a rank now and then aborted after a successful run
    ("terminate called without an active exception", SIGABRT)."""

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

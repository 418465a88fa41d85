"""Data-parallel training on CPU (gloo, 2 processes): the same adapters as one process with the same
global batch, for one method of each family (LoRA, DoRA, (IA)3, a bottleneck adapter, prefix tuning), for a
composition with LayerDrop (the ranks skip the same layers) and for QLoRA; and every rank starts from rank 0's adapter without relying on DDP's own broadcast (which
FSDP2 does not do)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_helpers import DestroyProcessGroupAtTeardown
from lightning_helpers import LitCausalLM, make_trainer, token_batches
from lightning_peft import IA3, Adapter, DoRA, LayerDrop, LoRA, PEFTCallback, PrefixTuning, Quantization
from lightning_peft.integration.distributed import broadcast_adapters

GLOBAL_BATCH = 4
STEPS = 3


class ShardedLM(LitCausalLM):
    """Rank ``r`` of ``w`` trains on rows ``r, r + w, ...`` in batches of ``GLOBAL_BATCH / w``: at every
    step the ranks' batches together are exactly the single-process batch (the loss is a mean over
    equally many tokens per row, so the mean of the ranks' means is the global mean)."""

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        rows = token_batches(n_batches=STEPS, batch_size=GLOBAL_BATCH)
        return DataLoader(rows[rank::world], batch_size=GLOBAL_BATCH // world, shuffle=False)


class SeedAtSetup(L.Callback):
    """Seeds just before injection, so the single-process run and rank 0 draw the same adapter."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        torch.manual_seed(123)


class SaveTrainable(L.Callback):
    """Rank 0 writes the trainable tensors at the start and at the end of training."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule, suffix: str) -> None:
        if trainer.is_global_zero:
            torch.save({n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}, f"{self.path}.{suffix}")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module, "start")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module, "end")


def train(tmp_path: Path, devices: int, method: Any, quantization: Quantization | None = None) -> dict[str, dict[str, torch.Tensor]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"trainable-{devices}"
    trainer = make_trainer(
        tmp_path,
        devices=devices,
        # A fresh process for the 1-device run too: some first-use initialisations (seen with bitsandbytes'
        # NF4 on CPU) draw from the global RNG once per process, so a run inside a pytest worker that has
        # already used them would start from a different adapter than the spawned ranks.
        strategy="ddp_spawn",
        max_steps=STEPS,
        use_distributed_sampler=False,  # ShardedLM shards itself
        callbacks=[SeedAtSetup(), PEFTCallback(method, quantization=quantization), SaveTrainable(path), DestroyProcessGroupAtTeardown()],
    )
    trainer.fit(ShardedLM())
    return {when: torch.load(f"{path}.{when}") for when in ("start", "end")}


METHODS = {
    "lora": lambda: (LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), None),
    "dora": lambda: (DoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), None),
    "ia3": lambda: (IA3(), None),
    "houlsby": lambda: (Adapter(style="houlsby", reduction_factor=4), None),
    "prefix-tuning": lambda: (PrefixTuning(num_virtual_tokens=4, projection=True), None),
    # Every rank must skip the same layers at each step (and DDP find the unused parameters): otherwise the
    # ranks' averaged gradients are not the one-process gradient. Steps 1-3 do skip (test_layerdrop.py).
    "lora+ia3+layerdrop": lambda: ([LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), IA3(target_modules=["k_proj"], feedforward_modules=[]), LayerDrop(p=0.5)], None),
    "qlora-nf4": lambda: (LoRA(r=4, alpha=8, target_modules="all-linear"), Quantization(bits=4, compute_dtype="float32")),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_two_ddp_processes_train_the_same_adapters_as_one(tmp_path, name):
    method, quantization = METHODS[name]()
    one = train(tmp_path / "one", 1, method, quantization)
    two = train(tmp_path / "two", 2, method, quantization)
    assert one["end"].keys() == two["end"].keys() and one["end"]
    for key, value in one["end"].items():
        torch.testing.assert_close(two["start"][key], one["start"][key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(two["end"][key], value, rtol=0, atol=1e-5, msg=key)
    moved = max((one["end"][k] - one["start"][k]).abs().max().item() for k in one["end"])
    assert moved > 1e-3  # three AdamW steps at lr 1e-2 really trained the adapters


class _DifferentSeedOnEachRank(L.Callback):
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        torch.manual_seed(1000 + trainer.global_rank)


class _SameAdaptersBeforeWrapping(L.Callback):
    """Runs its ``setup`` right after PEFTCallback's and before the strategy wraps the model in DDP
    (whose own broadcast would hide a missing one): the adapters must already be rank 0's everywhere."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        trainable = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        assert trainable
        for name, param in trainable:
            gathered = trainer.strategy.all_gather(param.detach())
            assert torch.equal(gathered[0], gathered[1]), name


def test_injection_broadcasts_rank_zero_adapters(tmp_path):
    method = LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init="gaussian")  # A and B both random
    trainer = make_trainer(
        tmp_path, devices=2, strategy="ddp_spawn", max_steps=1, use_distributed_sampler=False,
        callbacks=[_DifferentSeedOnEachRank(), PEFTCallback(method), _SameAdaptersBeforeWrapping(), DestroyProcessGroupAtTeardown()],
    )  # fmt: skip
    trainer.fit(ShardedLM())


def test_broadcast_is_a_no_op_without_a_process_group():
    model = LitCausalLM().model
    assert broadcast_adapters(model) == 0


# -- setups refused at setup, with what would work ----------------------------------------------------
@pytest.mark.parametrize("save_last, strategy, warned", [
    (True, "fsdp2", True), ("link", "fsdp2", False), (True, "fsdp-sharded", True), (True, "fsdp-full", False), (True, "ddp", False),
])  # fmt: skip
def test_a_sharded_last_checkpoint_rewritten_in_place_is_warned(tmp_path, save_last, strategy, warned, recwarn):
    """Lightning rewrites a sharded last.ckpt directory in place (tests/test_kill_resume.py kills FSDP2 with a link)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    from lightning_peft.integration.strategies import warn_in_place_last_checkpoint

    strategies = {
        "fsdp2": lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        "fsdp-sharded": lambda: FSDPStrategy(state_dict_type="sharded"),
        "fsdp-full": lambda: FSDPStrategy(state_dict_type="full"),
        "ddp": DDPStrategy,
    }
    # Only the strategy and the checkpoint callbacks are read (Lightning's FSDP1 refuses a CPU Trainer).
    trainer = SimpleNamespace(strategy=strategies[strategy](), checkpoint_callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=save_last)])
    warn_in_place_last_checkpoint(trainer)
    messages = [str(w.message) for w in recwarn if "rewrites last.ckpt in place" in str(w.message)]
    assert bool(messages) == warned, messages
    if warned:
        assert f"under {type(trainer.strategy).__name__}" in messages[0] and "save_last='link'" in messages[0]


def test_unsupported_strategy_is_named():
    from lightning_peft.integration.strategies import check_strategy

    class HomeMadeStrategy:  # stands for a custom Strategy outside Lightning's families (only its type is read)
        pass

    fake_trainer = type("FakeTrainer", (), {"strategy": HomeMadeStrategy()})()
    with pytest.raises(ValueError, match=r"does not support the HomeMadeStrategy strategy; use 'auto'/single device, 'ddp'"):
        check_strategy(fake_trainer, None)


@pytest.mark.parametrize("strategy_name", ["model-parallel", "deepspeed-zero3"])
def test_merged_export_under_a_sharding_strategy_is_refused_with_the_way_that_works(strategy_name):
    from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

    from lightning_peft.integration.strategies import check_merged_export

    if strategy_name == "deepspeed-zero3":
        pytest.importorskip("deepspeed")
        strategy, shown = DeepSpeedStrategy(stage=3), "DeepSpeedStrategy (ZeRO-3)"
    else:
        strategy, shown = ModelParallelStrategy(), "ModelParallelStrategy"
    fake_trainer = type("FakeTrainer", (), {"strategy": strategy})()
    check_merged_export(fake_trainer, export_merged=False)  # adapters alone are fine
    with pytest.raises(ValueError, match=rf"export_merged=True under {re.escape(shown)}: the base weights are sharded.*load_adapter"):
        check_merged_export(fake_trainer, export_merged=True)


def test_injecting_into_an_already_sharded_model_is_refused(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        module = LitCausalLM()
        fully_shard(module.model)  # sharded before injection, e.g. in the module's __init__
        with pytest.raises(RuntimeError, match=r"already sharded \(FSDP\) before the adapters were injected.*PEFTMixin.parallelize"):
            make_trainer(tmp_path, callbacks=[PEFTCallback(LoRA(r=4, target_modules=["q_proj"]))]).fit(module, [])
    finally:
        dist.destroy_process_group()


def test_reentrant_checkpointing_with_find_unused_parameters_is_refused(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    module = LitCausalLM()
    module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    trainer = make_trainer(tmp_path, strategy=DDPStrategy(find_unused_parameters=True), devices=1)
    from lightning_peft.integration.strategies import check_strategy

    with pytest.raises(ValueError, match=r"mark a variable ready only once.*PEFT needs no find_unused_parameters"):
        check_strategy(trainer, module.model)
    module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    check_strategy(trainer, module.model)  # non-reentrant is fine

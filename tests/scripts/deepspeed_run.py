"""One DeepSpeed ZeRO (Lightning ``DeepSpeedStrategy``) or single-process training run on CPU, for
tests/test_deepspeed.py.

Lightning allows DeepSpeed on CUDA only; DeepSpeed itself runs on CPU processes (its CPU accelerator falls
back to gloo). :class:`CPUDeepSpeedStrategy` lifts Lightning's CUDA check and gives DeepSpeed a device rank
(Lightning passes the GPU index, ``None`` on CPU, which DeepSpeed reads as "not distributed"). ZeRO's
partitioning, the checkpoint files and Lightning's save/load paths are unchanged. Parameters of any size are
partitioned (``stage3_param_persistence_threshold=0``); by default ZeRO-3 keeps small ones whole, which
would hide the empty-adapter export this run checks for.

    python tests/scripts/deepspeed_run.py --devices 2 --stage 3 --out run.pt --export-dir e [--ckpt-dir d] [--resume ckpt]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_helpers import LitCausalLM, run_distributed_script, token_batches  # noqa: E402
from lightning_peft import LoRA, PEFTCallback  # noqa: E402

GLOBAL_BATCH = 4
STEPS_PER_EPOCH = 2  # checkpoints at epoch ends, where a resumed run sees exactly the data it would have


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` on CPU processes (see module docstring)."""

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)  # the index is DeepSpeed's device rank; tensors stay on the CPU

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA check only

    def setup_distributed(self) -> None:
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()


class ShardedLM(LitCausalLM):
    """Each rank reads its own rows of the global batch."""

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        rows = token_batches(n_batches=STEPS_PER_EPOCH, batch_size=GLOBAL_BATCH)
        return DataLoader(rows[rank::world], batch_size=GLOBAL_BATCH // world, shuffle=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", required=True)
    parser.add_argument("--export-dir", required=True)
    parser.add_argument("--ckpt-dir")
    parser.add_argument("--resume")
    args = parser.parse_args()

    torch.manual_seed(123)
    callbacks: list = [PEFTCallback(LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), export_dir=args.export_dir)]
    if args.ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=STEPS_PER_EPOCH, save_top_k=-1))
    strategy = "auto"
    if args.devices > 1:
        config = {"zero_optimization": {"stage": args.stage, "stage3_param_persistence_threshold": 0}, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // args.devices}
        strategy = CPUDeepSpeedStrategy(config=config, exclude_frozen_parameters=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(args.ckpt_dir),
        num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=callbacks,
    )  # fmt: skip
    module = ShardedLM(seed=0)
    trainer.fit(module, ckpt_path=args.resume)
    if trainer.is_global_zero:
        torch.save({"losses": module.step_losses}, args.out)


if __name__ == "__main__":
    run_distributed_script(main)

"""One FSDP2 (``ModelParallelStrategy``) or single-process training run, for tests/test_fsdp2.py.

Launched as its own script because ModelParallelStrategy starts its other ranks by re-running the
command line (inside pytest that would re-run pytest). Writes the trainable tensors at the end of
training and the per-step losses to ``--out``.

    python tests/scripts/fsdp2_run.py --devices 2 --steps 3 --out run.pt [--ckpt-dir d] [--resume ckpt] [--qlora]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_helpers import LitPEFTCausalLM, run_distributed_script, shard_llama_fsdp2, tiny_llama, token_batches  # noqa: E402
from lightning_peft import LoRA, PEFTCallback, Quantization  # noqa: E402


GLOBAL_BATCH = 4
# Short epochs: checkpoints are taken at epoch ends, where a resumed run continues with exactly the data
# the uninterrupted run saw (a mid-epoch resume restarts a plain DataLoader from its first batch).
STEPS_PER_EPOCH = 2
# "large" (12M parameters) makes the adapter-only checkpoint's size more than per-tensor overhead; "small" is
# the default tiny Llama (28K), where the 1- and 2-process runs agree to float32 rounding. On "large", AdamW
# turns the different summation order of a 2-rank reduce-scatter into up to 8e-5 after 4 steps on the
# near-zero q_proj gradients (its update is about grad / sqrt(v)), so equality is checked on "small".
MODEL_SHAPES = {
    "small": {},
    "large": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, vocab_size=512),
}


class ShardedFSDP2LM(LitPEFTCausalLM):
    """The PEFTMixin test module with FSDP2 applied in ``parallelize`` (after injection), per decoder
    layer and at the root, over the data-parallel mesh; each rank reads its own rows of the batch."""

    def __init__(self, steps: int, shape: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps = steps
        self.shape = shape

    def configure_base_model(self):
        return tiny_llama(0, **MODEL_SHAPES[self.shape])

    def parallelize(self) -> None:
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None:  # single process: nothing to shard
            return
        shard_llama_fsdp2(self.model, mesh["data_parallel"])

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        rows = token_batches(n_batches=STEPS_PER_EPOCH, batch_size=GLOBAL_BATCH)
        return DataLoader(rows[rank::world], batch_size=GLOBAL_BATCH // world, shuffle=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt-dir")
    parser.add_argument("--resume")
    parser.add_argument("--shape", choices=sorted(MODEL_SHAPES), default="small")
    parser.add_argument("--qlora", action="store_true", help="quantize the base to NF4 (codes stored as float32) before injection")
    args = parser.parse_args()

    torch.manual_seed(123)
    callbacks = []
    if args.ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=STEPS_PER_EPOCH, save_top_k=-1))
    lora_args = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    if args.qlora:
        quantization = Quantization(bits=4, compute_dtype="float32", quant_storage="float32")
        callbacks.append(PEFTCallback(LoRA(**lora_args), quantization=quantization))
    strategy = (
        ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
        if args.devices > 1
        else "auto"
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(args.ckpt_dir),
        num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=callbacks,
    )  # fmt: skip
    module = ShardedFSDP2LM(steps=args.steps, shape=args.shape, lora_args=lora_args)
    trainer.fit(module, ckpt_path=args.resume)
    state = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            state[name] = full.detach().clone()
    if args.ckpt_dir:
        # What a checkpoint of the whole model would hold, in the same sharded format, for comparison.
        import torch.distributed.checkpoint as dcp

        dcp.save({"state_dict": module.model.state_dict()}, checkpoint_id=str(Path(args.ckpt_dir) / "full-model"))
    if trainer.is_global_zero:
        model_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        torch.save({"trainable": state, "losses": module.step_losses, "model_bytes": model_bytes}, args.out)


if __name__ == "__main__":
    run_distributed_script(main)

"""One training run for tests/test_kill_resume.py: LoRA (dropout 0.1) or another method on a tiny Llama,
a shuffled resumable loader spanning epochs, a checkpoint after every step (last.ckpt + one per step).

    kill_resume_run.py OUT --method lora [--devices 2 --strategy ddp|fsdp2] [--kill-at-step K --kill-in step|checkpoint] [--resume CKPT]

With ``--kill-at-step`` the job SIGKILLs itself (every process) at step K: ``step`` after the optimizer step and
before that step's checkpoint, ``checkpoint`` in the middle of writing that step's checkpoint (half the file; for
FSDP2's sharded checkpoint, after the shards and before ``meta.pt``). What it trained is in OUT/losses.json
(appended per step, flushed) and, on a normal end, OUT/adapter.safetensors.

FSDP2 (``ModelParallelStrategy``, data-parallel 2): the module shards each decoder layer and the root in
``configure_model``, after the callback injected the adapters; ``last.ckpt`` is a link (``save_last="link"``),
because Lightning rewrites a sharded ``last.ckpt`` in place.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_helpers import LitCausalLM, run_distributed_script, shard_llama_fsdp2, token_batches  # noqa: E402

from lightning_peft import IA3, Adapter, LoRA, PEFTCallback, PromptTuning, Quantization  # noqa: E402
from lightning_peft.integration.resumable_sampler import ResumableDataLoader, resume_position  # noqa: E402

METHODS = {
    "lora": lambda: LoRA(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"]),
    "houlsby": lambda: Adapter(style="houlsby", reduction_factor=4),
    "ia3": lambda: IA3(),
    "prompt": lambda: PromptTuning(num_virtual_tokens=3),
    "qlora": lambda: LoRA(r=4, alpha=8, dropout=0.1, target_modules="all-linear"),
}
QUANTIZED = {"qlora": lambda: Quantization(bits=4, compute_dtype="float32")}
STEPS = 8  # 3 batches per epoch: the run crosses two epoch boundaries


class ShardedLitCausalLM(LitCausalLM):
    """FSDP2: every decoder layer and the root sharded over the data-parallel mesh (adapters injected by then)."""

    def configure_model(self) -> None:
        shard_llama_fsdp2(self.model, self.device_mesh["data_parallel"])


class Record(Callback):
    def __init__(self, out: Path, kill_at: int | None, kill_in: str) -> None:
        self.out, self.kill_at, self.kill_in = out, kill_at, kill_in

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.global_rank != 0:
            if step == self.kill_at and self.kill_in == "step":
                trainer.strategy.barrier()
            return
        with open(self.out / "losses.json", "a") as fh:
            fh.write(json.dumps({"step": step, "loss": float(outputs["loss"])}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if step == self.kill_at and self.kill_in == "step":
            trainer.strategy.barrier()  # every rank has finished the step; then the whole job dies at once
            os.killpg(os.getpgid(0), signal.SIGKILL)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step == self.kill_at and self.kill_in == "checkpoint":
            from lightning.pytorch.strategies import ModelParallelStrategy

            if isinstance(trainer.strategy, ModelParallelStrategy):
                from lightning.pytorch.strategies import model_parallel

                real_save = model_parallel._distributed_checkpoint_save

                def shards_then_die(state, path):
                    real_save(state, path)  # every rank's shard and DCP's .metadata are on disk; meta.pt is not
                    trainer.strategy.barrier()
                    if trainer.global_rank == 0:
                        os.killpg(os.getpgid(0), signal.SIGKILL)
                    trainer.strategy.barrier()  # the other rank waits to be killed

                model_parallel._distributed_checkpoint_save = shards_then_die
                return
            from lightning.fabric.utilities import cloud_io

            real_save = torch.save

            def half_then_die(obj, f, *args, **kwargs):
                real_save(obj, f, *args, **kwargs)
                if hasattr(f, "getvalue"):  # Lightning serialises to memory first, then writes the file
                    cloud_io.torch.save = real_save
                    original_open = cloud_io.fsspec.core.url_to_fs

                    def dying_fs(*a, **k):
                        fs, path = original_open(*a, **k)
                        real_open = fs.open

                        def open_and_die(p, mode="rb", **kw):
                            handle = real_open(p, mode, **kw)
                            handle.write(f.getvalue()[: len(f.getvalue()) // 2])
                            handle.flush()
                            os.killpg(os.getpgid(0), signal.SIGKILL)  # every rank of the job at once

                        fs.open = open_and_die
                        return fs, path

                    cloud_io.fsspec.core.url_to_fs = dying_fs

            cloud_io.torch.save = half_then_die


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--method", default="lora", choices=sorted(METHODS))
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-in", default="step", choices=["step", "checkpoint"])
    parser.add_argument("--resume")
    parser.add_argument("--export-dir", help="also export: step-N/ at every checkpoint and adapter/ at fit end")
    parser.add_argument("--devices", type=int, default=1, help="2: two processes (Lightning starts the second rank by re-running this script)")
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp2"], help="with --devices 2")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0)
    fsdp2 = args.devices > 1 and args.strategy == "fsdp2"
    module = ShardedLitCausalLM(seed=0) if fsdp2 else LitCausalLM(seed=0)
    trainer_holder: dict = {}
    loader = ResumableDataLoader(
        token_batches(n_batches=3), batch_size=2, shuffle=True, seed=0, position=lambda: resume_position(trainer_holder.get("t"))
    )
    saver = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=1, save_top_k=-1, save_last="link" if fsdp2 else True)
    if fsdp2:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp" if args.devices > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=STEPS, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=out, enable_checkpointing=True,
        callbacks=[
            PEFTCallback(
                METHODS[args.method](), quantization=QUANTIZED.get(args.method, lambda: None)(),
                export_dir=args.export_dir, export_on="both",
            ),
            saver, Record(out, args.kill_at_step, args.kill_in),
        ],
    )  # fmt: skip
    trainer_holder["t"] = trainer
    trainer.fit(module, loader, ckpt_path=args.resume)
    trained = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in module.named_parameters() if p.requires_grad}
    if trainer.global_rank != 0:
        return
    save_file({n: p.detach().clone().contiguous() for n, p in trained.items()}, out / "adapter.safetensors")


if __name__ == "__main__":
    run_distributed_script(main)

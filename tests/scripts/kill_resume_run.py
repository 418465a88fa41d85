"""One training run for tests/test_kill_resume.py: LoRA (dropout 0.1) or another method on a tiny Llama,
a shuffled resumable loader spanning epochs, a checkpoint after every step (last.ckpt + one per step).

    kill_resume_run.py OUT --method lora [--kill-at-step K --kill-in step|checkpoint] [--resume CKPT]

With ``--kill-at-step`` the process SIGKILLs itself at step K: ``step`` after the optimizer step and before
that step's checkpoint, ``checkpoint`` in the middle of writing that step's checkpoint file. What it trained
is in OUT/losses.json (appended per step, flushed) and, on a normal end, OUT/adapter.safetensors.
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
from lightning_helpers import LitCausalLM, token_batches  # noqa: E402

from lightning_peft import IA3, Adapter, LoRA, PEFTCallback, PromptTuning, Quantization  # noqa: E402
from lightning_peft.resumable_sampler import ResumableDataLoader, resume_position  # noqa: E402

METHODS = {
    "lora": lambda: LoRA(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"]),
    "houlsby": lambda: Adapter(style="houlsby", reduction_factor=4),
    "ia3": lambda: IA3(),
    "prompt": lambda: PromptTuning(num_virtual_tokens=3),
    "qlora": lambda: LoRA(r=4, alpha=8, dropout=0.1, target_modules="all-linear"),
}
QUANTIZED = {"qlora": lambda: Quantization(bits=4, compute_dtype="float32")}
STEPS = 8  # 3 batches per epoch: the run crosses two epoch boundaries


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
            import lightning.fabric.utilities.cloud_io as cloud_io

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
                            os.kill(os.getpid(), signal.SIGKILL)

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
    parser.add_argument("--devices", type=int, default=1, help="2: DDP (Lightning starts the second rank by re-running this script)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0)
    module = LitCausalLM(seed=0)
    trainer_holder: dict = {}
    loader = ResumableDataLoader(
        token_batches(n_batches=3), batch_size=2, shuffle=True, seed=0, position=lambda: resume_position(trainer_holder.get("t"))
    )
    saver = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=1, save_top_k=-1, save_last=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto", max_steps=STEPS, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=out, enable_checkpointing=True,
        callbacks=[
            PEFTCallback(METHODS[args.method](), quantization=QUANTIZED.get(args.method, lambda: None)()),
            saver, Record(out, args.kill_at_step, args.kill_in),
        ],
    )  # fmt: skip
    trainer_holder["t"] = trainer
    trainer.fit(module, loader, ckpt_path=args.resume)
    if trainer.global_rank != 0:
        return
    save_file({n: p.detach().clone().contiguous() for n, p in module.named_parameters() if p.requires_grad}, out / "adapter.safetensors")


if __name__ == "__main__":
    main()

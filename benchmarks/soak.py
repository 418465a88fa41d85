"""Soak: a long run of a tiny model with frequent checkpoints and step exports, watching resident memory.

    python benchmarks/soak.py                    # 2000 steps, checkpoint + export every 10, save_top_k=3
    python benchmarks/soak.py --steps 200        # quicker

Prints the resident set size (VmRSS) every 100 steps, its least-squares slope after warm-up (the first
quarter of the run) in KiB per 100 steps, what the checkpoint and export directories hold at the end, and
whether the last checkpoint resumes (one more step from it, in the same process).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from lightning_helpers import LitCausalLM, token_batches  # noqa: E402

from lightning_peft import LoRA, PEFTCallback  # noqa: E402
from lightning_peft.integration.resumable_sampler import ResumableDataLoader  # noqa: E402


def rss_kib() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))


class WatchMemory(Callback):
    def __init__(self) -> None:
        self.samples: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step % 100 == 0:
            self.samples.append((trainer.global_step, rss_kib()))
            print(f"step {trainer.global_step:5d}  RSS {self.samples[-1][1] / 1024:.1f} MiB", flush=True)


def slope(points: list[tuple[int, int]]) -> float:
    n = len(points)
    mean_x, mean_y = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / max(sum((x - mean_x) ** 2 for x, _ in points), 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="lightning-peft-soak-"))
    watch = WatchMemory()
    saver = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=args.every, save_top_k=3, monitor="step", mode="max", save_last=True)
    peft = PEFTCallback(LoRA(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"]), export_dir=str(root / "export"), export_on="checkpoint")
    loader = ResumableDataLoader(token_batches(n_batches=8), batch_size=2, shuffle=True, seed=0)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=args.steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root, callbacks=[peft, saver, watch],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(LitCausalLM(seed=0), loader)
    elapsed = time.perf_counter() - start
    after_warmup = [p for p in watch.samples if p[0] >= args.steps // 4]
    checkpoints = sorted(p.name for p in (root / "ckpt").iterdir())
    exports = sorted(p.name for p in (root / "export").iterdir())
    print(f"{args.steps} steps in {elapsed:.0f} s; RSS {watch.samples[0][1] / 1024:.1f} -> {watch.samples[-1][1] / 1024:.1f} MiB")
    print(f"RSS slope after warm-up: {slope(after_warmup) * 100:.1f} KiB per 100 steps ({len(after_warmup)} samples)")
    print(f"checkpoints: {checkpoints}")
    print(f"exports: {exports}")
    resumed = L.Trainer(
        accelerator="cpu", max_steps=args.steps + 1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root, enable_checkpointing=False,
        callbacks=[PEFTCallback(LoRA(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"]))],
    )  # fmt: skip
    resumed.fit(LitCausalLM(seed=0), ResumableDataLoader(token_batches(n_batches=8), batch_size=2, shuffle=True, seed=0), ckpt_path=str(root / "ckpt" / "last.ckpt"))
    print(f"last.ckpt resumed: global_step {resumed.global_step} (expected {args.steps + 1})")


if __name__ == "__main__":
    main()

"""Prompt tuning, P-tuning, prefix tuning and LLaMA-Adapter beside LoRA: held-out loss at the same budget.

    python benchmarks/bench_prompt_methods.py                  # every config, 20 steps each (~15 min on 2 cores)
    python benchmarks/bench_prompt_methods.py --steps 10 --methods prompt_tuning lora

Each method runs as its own config (``configs/<method>.yaml``: SmolLM2-135M-Instruct on Hamlet, blocks of
128 tokens, batch 4, AdamW at the config's learning rate, seed 42) through the real CLI in its own
subprocess, with everything but the method held equal: the same steps, data order and held-out blocks.
Reported per method: trainable parameters (from the callback's log line), held-out loss before and after
training (from the CLI's ``held-out val_loss: before -> after`` line) and wall time. Learning rates are
the configs' own, each chosen once for its method (none was tuned on these held-out blocks).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = ["lora", "prompt_tuning", "p_tuning", "prefix_tuning", "llama_adapter"]
HELD_OUT = re.compile(r"held-out val_loss: ([\d.]+) -> ([\d.]+)")
TRAINABLE = re.compile(r"trainable params: ([\d,]+) / ([\d,]+)")


def run(method: str, steps: int, workdir: Path) -> dict[str, float | str]:
    command = [
        sys.executable, "-m", "lightning_peft.recipes.cli", "fit", "--config", str(REPO / "configs" / f"{method}.yaml"),
        f"--trainer.max_steps={steps}",
        "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=[]",  # no ModelCheckpoint: nothing is kept
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={workdir / method}",
        "--peft.export_dir=null",
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = result.stdout + result.stderr
    held_out, trainable = HELD_OUT.search(output), TRAINABLE.search(output)
    if result.returncode != 0 or held_out is None or trainable is None:
        raise RuntimeError(f"{method} failed (exit {result.returncode}):\n{output[-3000:]}")
    return {
        "method": method,
        "trainable": int(trainable.group(1).replace(",", "")),
        "before": float(held_out.group(1)),
        "after": float(held_out.group(2)),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per method (batches of 4 x 128 tokens)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    args = parser.parse_args()
    print(f"SmolLM2-135M-Instruct on Hamlet, {args.steps} steps of 4 x 128 tokens per method", flush=True)
    print(f"{'method':<15} {'trainable':>10} {'loss before':>12} {'loss after':>11} {'change':>8} {'wall s':>7}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            row = run(method, args.steps, Path(tmp))
            change = row["after"] - row["before"]
            print(
                f"{method:<15} {row['trainable']:>10,} {row['before']:>12.4f} {row['after']:>11.4f} {change:>+8.4f} {row['seconds']:>7.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

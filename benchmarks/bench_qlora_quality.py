"""16-bit LoRA vs NF4 QLoRA: held-out perplexity after the same number of steps, on real data.

    python benchmarks/bench_qlora_quality.py                 # configs/qlora.yaml, 30 steps each (~10 min on 2 cores)
    python benchmarks/bench_qlora_quality.py --steps 15
    python benchmarks/bench_qlora_quality.py --model DIR --text FILE   # another safetensors causal LM / text

The QLoRA paper (Dettmers et al., 2023, Sec. 4 and Table 3-4) reports that NF4 with double
quantization recovers 16-bit LoRA quality: the adapters learn to compensate the quantization error.
This checks the claim at our scale (SmolLM2-135M, Hamlet) with everything else held equal: both runs
are ``configs/qlora.yaml`` (LoRA r=16 on every linear layer, same seed, same data order, same
held-out blocks, same optimizer), and the only difference is the base:

- ``lora-16bit``: the checkpoint's bf16 weights, held exactly in float32 (float32 compute, as the
  QLoRA run uses; on a CPU bf16 matmuls are ~30x slower, and fp32 holds every bf16 value exactly);
- ``qlora-nf4``: the same weights streamed into NF4 + double quantization, float32 compute.

Both use torch AdamW, so the 8-bit optimizer state of the config does not blur the comparison of the
base precision. Each run is the real CLI in its own subprocess; the figures are parsed from the
``held-out val_perplexity: before -> after`` line it prints. Reported: the perplexity of each base
before training, after training, and the relative gap ``(qlora - lora) / lora`` after training.
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
HELD_OUT = re.compile(r"held-out val_perplexity: ([\d.]+) -> ([\d.]+)")

VARIANTS = {
    "lora-16bit": ["--model.init_args.quantization", "null"],
    "qlora-nf4": [],
}


def run_variant(name: str, extra: list[str], steps: int, workdir: Path, model: str | None, text: str | None) -> tuple[float, float, float]:
    """Run the CLI once; return (perplexity before, perplexity after, wall seconds)."""
    command = [
        sys.executable, "-m", "lightning_peft.recipes.cli", "fit", "--config", str(REPO / "configs" / "qlora.yaml"),
        f"--trainer.max_steps={steps}",
        "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=[]",  # no ModelCheckpoint: nothing is kept
        "--trainer.logger=false",
        f"--trainer.default_root_dir={workdir / name}",
        "--peft.export_dir=null",
        "--model.init_args.optimizer=torch.optim.AdamW",
        "--model.init_args.optimizer.init_args.lr=5e-4",
        "--model.init_args.optimizer.init_args.weight_decay=0.0",
        *extra,
    ]  # fmt: skip
    if model:
        command += [f"--model.init_args.model_name_or_path={model}", f"--data.init_args.tokenizer={model}"]
    if text:
        command += [f"--data.init_args.train_file={text}"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    match = HELD_OUT.search(result.stdout)
    if result.returncode != 0 or match is None:
        raise SystemExit(f"{name} failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return float(match.group(1)), float(match.group(2)), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps for each variant")
    parser.add_argument("--model", default=None, help="a safetensors causal-LM directory or Hub id (default: the config's SmolLM2)")
    parser.add_argument("--text", default=None, help="a plain-text file (default: the config's Hamlet)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name, extra in VARIANTS.items():
            results[name] = run_variant(name, extra, args.steps, Path(workdir), args.model, args.text)
            before, after, seconds = results[name]
            print(f"{name:>11}: held-out perplexity {before:7.2f} -> {after:7.2f} after {args.steps} steps ({seconds:.0f} s)", flush=True)
    lora, qlora = results["lora-16bit"][1], results["qlora-nf4"][1]
    gap_before = (results["qlora-nf4"][0] - results["lora-16bit"][0]) / results["lora-16bit"][0]
    gap = (qlora - lora) / lora
    print(f"gap before training (NF4 base vs 16-bit base): {gap_before:+.1%}")
    print(f"gap after {args.steps} steps ((qlora - lora) / lora): {gap:+.2%}  (target: within 3%)")


if __name__ == "__main__":
    main()

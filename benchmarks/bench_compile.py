"""``compile=True`` (regional compilation of the transformer blocks) against eager: step time, side by side.

    python benchmarks/bench_compile.py                 # SmolLM2, LoRA r=8 (q, v), Hamlet 4 x 256, 6 timed steps each
    python benchmarks/bench_compile.py --seq 128 --steps 3

Two copies of SmolLM2-135M-Instruct in float32 with LoRA r=8 on q_proj/v_proj (``configs/lora.yaml``'s method),
one with every decoder block compiled in place (:func:`lightning_peft.core.compilation.compile_blocks`, what
``CausalLMTask(compile=True)`` does after injection), take alternating training steps (forward, chunked loss,
backward, AdamW step) on the same Hamlet batches. Reported: the first compiled step (the compilation itself),
the median of the later steps of each, the losses of the two (equal up to the compiler's float reassociation).
Last line: ``compile step time ratio X`` (compiled / eager, steady state).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from lightning_peft import LoRA, apply_peft
from lightning_peft.core.compilation import compile_blocks
from lightning_peft.operations.causal_lm_loss import causal_lm_loss
from lightning_peft.recipes.data import TextFileDataModule

REPO = Path(__file__).resolve().parent.parent


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> tuple[float, float]:
    start = time.perf_counter()
    loss = causal_lm_loss(model, {"input_ids": batch["input_ids"]}, batch["labels"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    value = loss.item()  # waits for the device, so the time is the step's
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "assets/smollm2-135m-instruct"))
    parser.add_argument("--text", default=str(REPO / "assets/data/hamlet.txt"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu", help="e.g. cuda (the model trains in float32 there too)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).train()
    apply_peft(eager, LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    compiled = copy.deepcopy(eager)
    blocks = compile_blocks(compiled)
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for name, m in (("eager", eager), ("compiled", compiled))}
    models = {"eager": eager, "compiled": compiled}
    data = TextFileDataModule(args.model, args.text, block_size=args.seq, batch_size=args.batch)
    data.shuffle_seed = 0
    data.setup("fit")
    batches = iter(data.train_dataloader())
    print(f"{len(blocks)} blocks compiled; batch {args.batch} x {args.seq}, {torch.get_num_threads()} threads, torch {torch.__version__}")

    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(args.steps + 1):
        batch = {k: v.to(args.device) for k, v in next(batches).items()}
        losses = {}
        for name in (("eager", "compiled") if step % 2 == 0 else ("compiled", "eager")):
            seconds, losses[name] = train_step(models[name], optimizers[name], batch)
            if step == 0:
                print(f"first step {name}: {seconds:.1f} s" + (" (includes compilation)" if name == "compiled" else ""))
            else:
                times[name].append(seconds)
        print(f"step {step}: eager loss {losses['eager']:.5f}, compiled {losses['compiled']:.5f}")
    median = {name: statistics.median(t) for name, t in times.items()}
    print("\n| blocks | median step (s) |\n|---|---:|")
    for name, seconds in median.items():
        print(f"| {name} | {seconds:.2f} |")
    print(f"compile step time ratio {median['compiled'] / median['eager']:.3f}")


if __name__ == "__main__":
    main()

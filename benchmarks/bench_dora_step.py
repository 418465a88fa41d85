"""DoRA's training-step overhead over LoRA: lightning_peft against HF peft, in one process.

    python benchmarks/bench_dora_step.py --model tiny --steps 20                          # CPU, seconds
    python benchmarks/bench_dora_step.py                                                  # SmolLM2-135M (assets/)
    python benchmarks/bench_dora_step.py --model llama-1b --device cuda --dtype bfloat16 --seq-len 1024

Four variants share the base weights, the batch and AdamW on their trainable parameters: our LoRA, our
DoRA, peft's LoRA and peft's DoRA (``use_dora=True``), all on the same targets with dropout 0. They run
interleaved (A, B, C, D, A, B, ...) so machine noise hits them alike. Reported: the median step times
and, per interleaved round, the ratios DoRA / LoRA for each package (their medians). The issue's bar:
our DoRA overhead (ratio - 1) at most half of peft's, and a ratio of at most 1.3.
"""

from __future__ import annotations

import copy
import statistics

import torch

from bench_lora_step import describe, gpu_busy_seconds, load_model, make_step, step_benchmark_parser
from lightning_peft import DoRA, LoRA, apply_peft


def main() -> None:
    args = step_benchmark_parser(__doc__, steps=10, targets="all-linear").parse_args()
    torch.manual_seed(0)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    base = load_model(args.model, dtype).to(device).train()
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    ids = torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    from peft import LoraConfig, get_peft_model

    models = {}
    for name, method in (("ours LoRA", LoRA), ("ours DoRA", DoRA)):
        models[name] = copy.deepcopy(base)
        apply_peft(models[name], method(r=args.r, alpha=2 * args.r, target_modules=targets))
    for name, use_dora in (("peft LoRA", False), ("peft DoRA", True)):
        config = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets, lora_dropout=0.0, use_dora=use_dora)
        models[name] = get_peft_model(copy.deepcopy(base), config)
    del base
    steps = {name: make_step(model, batch) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.steps + 2):
        for name, step in steps.items():
            elapsed = step()
            if i >= 2:
                times[name].append(elapsed)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    ours, theirs = ratio("ours DoRA", "ours LoRA"), ratio("peft DoRA", "peft LoRA")
    print(f"model: {args.model}, batch {args.batch_size}x{args.seq_len}, r={args.r} on {targets}, {args.dtype}, {describe(device)}")
    for name, values in times.items():
        print(f"  step time {name:>10}: median {statistics.median(values) * 1000:8.1f} ms over {len(values)} steps")
    print(f"  DoRA / LoRA, lightning_peft: {ours:.3f}")
    print(f"  DoRA / LoRA, peft          : {theirs:.3f}")
    print(f"  our DoRA / peft DoRA       : {ratio('ours DoRA', 'peft DoRA'):.3f}")
    print(f"  overhead ours / peft       : {(ours - 1) / max(theirs - 1, 1e-9):.2f}  (bar: <= 0.5; and ours <= 1.3)")
    if device.type == "cuda":
        # The same ratios on the GPU's own busy time: they differ from the wall ratios when the host
        # cannot launch kernels as fast as the GPU runs them (small batches, fast GPUs).
        busy = {name: gpu_busy_seconds(step) for name, step in steps.items()}
        ours_busy, theirs_busy = busy["ours DoRA"] / busy["ours LoRA"], busy["peft DoRA"] / busy["peft LoRA"]
        for name, seconds in busy.items():
            print(f"  GPU busy {name:>10}: {seconds * 1000:8.1f} ms per step (wall {statistics.median(times[name]) * 1000:.1f} ms)")
        print(f"  GPU-busy DoRA / LoRA: lightning_peft {ours_busy:.3f}, peft {theirs_busy:.3f}, overhead ours / peft {(ours_busy - 1) / max(theirs_busy - 1, 1e-9):.2f}")


if __name__ == "__main__":
    main()

"""LoRA training-step time: lightning_peft vs HF peft vs the frozen-base floor, in one process.

The three variants share the same base weights, batch and optimizer settings and run interleaved
(A, B, C, A, B, C, ...) so machine noise hits them alike; we report medians and the ratios, which are
what transfers between machines. Also reported: the adapter-only checkpoint size against a full one.

    python benchmarks/bench_lora_step.py                       # SmolLM2-135M from assets/ (prepare-assets)
    python benchmarks/bench_lora_step.py --model tiny --steps 30
    python benchmarks/bench_lora_step.py --model llama-1b --device cuda --dtype bfloat16 --batch-size 4 --seq-len 1024

The floor is the same model with no adapters and no weight gradients: forward plus the backward pass
to the inputs, which any adapter method must also pay. LoRA's extra cost over it is its own overhead.
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from lightning_peft import LoRA, apply_peft


# Random-weight Llama shapes: step time does not depend on the values, and no download is needed.
RANDOM_SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4),
    # Llama-3.2-1B's shape (1.24B parameters).
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
}


def load_model(name: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name in RANDOM_SHAPES:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**RANDOM_SHAPES[name])).to(dtype)
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype)


def make_step(model: nn.Module, batch: dict[str, torch.Tensor]):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    on_cuda = batch["input_ids"].is_cuda

    def step() -> float:
        # CUDA runs asynchronously: synchronise on both sides so the wall time is the GPU's work.
        if on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if on_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def gpu_busy_seconds(step, steps: int = 3) -> float:
    """Seconds per step that CUDA kernels ran (torch.profiler), to set against the wall time: where the
    wall is much longer, the host's kernel launches, not the GPU, bound the step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
    busy_us = sum(event.device_time for event in prof.events() if event.device_type.name == "CUDA")
    return busy_us / steps / 1e6


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU threads {torch.get_num_threads()}, torch {torch.__version__}"


def checkpoint_bytes(state: dict[str, torch.Tensor]) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def step_benchmark_parser(description: str, steps: int, targets: str) -> argparse.ArgumentParser:
    """The arguments every step-time benchmark takes (model, device, dtype, batch, steps, rank, targets)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/smollm2-135m-instruct", help=f"model path/Hub id, or a random shape: {sorted(RANDOM_SHAPES)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--targets", default=targets, help="comma-separated module names, or all-linear")
    return parser


def main() -> None:
    args = step_benchmark_parser(__doc__, steps=12, targets="q_proj,v_proj").parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    base = load_model(args.model, dtype).to(device).train()
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    ours = copy.deepcopy(base)
    apply_peft(ours, LoRA(r=args.r, alpha=2 * args.r, target_modules=targets))

    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets, lora_dropout=0.0))

    floor = copy.deepcopy(base)
    floor.requires_grad_(False)
    # The backward pass must still run through every layer: make the embeddings' output need a grad.
    floor.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))

    variants = {"lightning_peft": make_step(ours, batch), "peft": make_step(theirs, batch), "floor": make_step(floor, batch)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.steps + 2):
        for name, step in variants.items():
            elapsed = step()
            if i >= 2:
                times[name].append(elapsed)

    med = {k: statistics.median(v) for k, v in times.items()}
    # Ratios per interleaved round, then their median: robust to drift in machine speed.
    ratio_peft = statistics.median(a / b for a, b in zip(times["lightning_peft"], times["peft"]))
    ratio_floor = statistics.median(a / b for a, b in zip(times["lightning_peft"], times["floor"]))
    ratio_peft_floor = statistics.median(a / b for a, b in zip(times["peft"], times["floor"]))

    full_bytes = checkpoint_bytes(base.state_dict())
    adapter_bytes = checkpoint_bytes({n: p for n, p in ours.named_parameters() if p.requires_grad})
    n_params = sum(p.numel() for p in base.parameters())
    print(f"model: {args.model} ({n_params / 1e6:.1f}M params), batch {args.batch_size}x{args.seq_len}, LoRA r={args.r} on {targets}, {args.dtype}, {describe(device)}")
    for name in variants:
        print(f"  step time {name:>15}: median {med[name] * 1000:8.1f} ms over {len(times[name])} steps")
    print(f"  ratio lightning_peft / peft : {ratio_peft:.3f}  (median of per-round ratios)")
    print(f"  ratio lightning_peft / floor: {ratio_floor:.3f}")
    print(f"  ratio peft / floor          : {ratio_peft_floor:.3f}")
    print(f"  checkpoint bytes: adapter-only {adapter_bytes:,} vs full {full_bytes:,} ({100 * adapter_bytes / full_bytes:.3f}%)")


if __name__ == "__main__":
    main()

"""The chunked causal-LM loss against transformers' plain loss: peak memory and step time, side by side.

    python benchmarks/bench_loss_memory.py                   # SmolLM2, LoRA r=8 (q, v), 4 x 1024 tokens, 3 rounds
    python benchmarks/bench_loss_memory.py --gradient-checkpointing

SmolLM2-135M-Instruct (vocabulary 49,152) in float32 with LoRA r=8 on q_proj/v_proj (``configs/lora.yaml``'s
method) takes training steps (forward, backward, AdamW step) on 4 Hamlet blocks of 1024 tokens, with three
losses in turn, in one process:

- ``plain``: ``model(..., labels=labels).loss`` (transformers: float32 logits of every position, then the loss);
- ``chunked``: :func:`lightning_peft.operations.causal_lm_loss.causal_lm_loss` (``CausalLMTask(loss="chunked")``);
- ``no head``: the same model and step with the loss ``mean(hidden ** 2)`` of the final hidden states, which
  skips the head: what a step costs without any loss over the vocabulary. It is the baseline of "the loss's share".

Memory is the step's peak resident memory above the resident memory before it (``VmHWM`` after resetting it
through ``/proc/self/clear_refs``, and after ``malloc_trim`` returned the heap's free pages: the kernel's count,
so every allocation is in it, whoever made it). The
loss's share is a loss's peak minus the no-head step's peak. Time is the median step. Rounds alternate the three
losses, so the machine's noise falls on all alike; read the ratios. Last line:
``loss memory ratio X, step time ratio Y`` (plain / chunked share; chunked / plain time).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path

import torch

from lightning_peft import LoRA, apply_peft
from lightning_peft.core.transformers_compat import enable_checkpointing
from lightning_peft.operations.causal_lm_loss import causal_lm_loss, output_head
from lightning_peft.recipes.data import TextFileDataModule

REPO = Path(__file__).resolve().parent.parent


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":")) / 1024


def _reset_peak() -> None:
    # Hand the heap's free memory back first (glibc keeps it resident after the previous step's frees), so that
    # the resident memory before the step is what is live and the peak above it is what the step touches.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # "5": reset the peak resident set size (VmHWM) to the current one


def _no_head_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    head = output_head(model)
    head.forward = lambda x: x  # the model returns its final hidden states as "logits"
    try:
        hidden = model(input_ids=batch["input_ids"], use_cache=False).logits
    finally:
        del head.forward
    return hidden.pow(2).mean()


LOSSES = {
    "plain": lambda model, batch: model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss,
    "chunked": lambda model, batch: causal_lm_loss(model, {"input_ids": batch["input_ids"]}, batch["labels"]),
    "no head": _no_head_loss,
}


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, loss_name: str) -> tuple[float, float, float]:
    """One training step; (peak MiB above the start, seconds, loss value)."""
    optimizer.zero_grad(set_to_none=True)
    _reset_peak()
    before = _status_mib("VmRSS")
    start = time.perf_counter()
    loss = LOSSES[loss_name](model, batch)
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    return _status_mib("VmHWM") - before, seconds, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "assets/smollm2-135m-instruct"))
    parser.add_argument("--text", default=str(REPO / "assets/data/hamlet.txt"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
    if args.gradient_checkpointing:
        enable_checkpointing(model, use_reentrant=False)
    apply_peft(model, LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    data = TextFileDataModule(args.model, args.text, block_size=args.seq, batch_size=args.batch)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    vocab = output_head(model).weight.shape[0]
    print(f"{Path(args.model).name}: vocab {vocab:,}, batch {args.batch} x {args.seq}, threads {torch.get_num_threads()}, "
          f"gradient checkpointing {args.gradient_checkpointing}; float32 logits of the batch: {args.batch * args.seq * vocab * 4 / 2**20:,.0f} MiB")

    step(model, optimizer, batch, "plain")  # warm-up: first-touch allocations, AdamW's state, thread pools
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in LOSSES}
    for round_ in range(args.rounds):
        order = list(LOSSES) if round_ % 2 == 0 else list(reversed(LOSSES))
        for name in order:
            results[name].append(step(model, optimizer, batch, name))
            peak, seconds, value = results[name][-1]
            print(f"round {round_}: {name:8s} peak +{peak:7,.0f} MiB  {seconds:6.2f} s  loss {value:.4f}")

    peak = {name: statistics.median(r[0] for r in runs) for name, runs in results.items()}
    seconds = {name: statistics.median(r[1] for r in runs) for name, runs in results.items()}
    share = {name: peak[name] - peak["no head"] for name in ("plain", "chunked")}
    print("\n| loss | step peak above start (MiB) | loss's share (MiB) | step time (s) |")
    print("|---|---:|---:|---:|")
    for name in LOSSES:
        print(f"| {name} | {peak[name]:,.0f} | {share.get(name, 0.0):,.0f} | {seconds[name]:.2f} |")
    print(f"whole-step peak ratio plain / chunked: {peak['plain'] / peak['chunked']:.2f}")
    print(f"loss memory ratio {share['plain'] / max(share['chunked'], 1.0):.2f}, step time ratio {seconds['chunked'] / seconds['plain']:.3f}")


if __name__ == "__main__":
    main()

"""Sparse fine-tuning against LoRA at the same number of trained values, on real data: accuracy, memory, step time.

    python benchmarks/bench_sparse_ft.py                       # 5 methods x 3 seeds (~20 min on 2 idle CPU cores)
    python benchmarks/bench_sparse_ft.py --seeds 0 --steps 10  # a quick look

all-MiniLM-L6-v2 with a new 2-way head on Rotten Tomatoes, with the budget and data of
``bench_adapters_classification.py`` (whose helpers this script uses): ``--steps`` AdamW steps of 16 sentences,
warm-up then constant rate, scored on the first 500 held-out sentences. Every method adapts the attention query
and value projections of the 6 layers, and trains the same number of values there:

- LoRA r=8 (alpha 16): 8 x (384 + 384) per matrix, 73,728 in all;
- SparseFT at density 1/24 (6,144 of the 147,456 entries per matrix: the same 73,728), selected by the empirical
  Fisher (Sung et al. 2021), by the magnitude of the summed gradient (LT-SFT's criterion without its dense phase,
  Ansell et al. 2022), or at random; the data-driven selections read the first 8 training batches;
- dense fine-tuning of the same 12 matrices (1,769,472 values): the reference the sparse delta approximates.

Memory is the training state a step holds at its peak, counted exactly rather than read from a noisy process
size: the tensors autograd saves for the backward pass (unique storages, the frozen weights left out: every method
holds those), the gradients of the trained tensors, and the AdamW state (two moments per trained value) plus, for
SparseFT, its index buffers. Step time is the median of the
timed steps (forward, backward, optimizer step) of each run; runs alternate methods within a seed, so read ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapters_classification import HEAD, accuracy, encode, read_csv  # noqa: E402

from lightning_peft import LoRA, PEFTMethod, SparseFT, apply_peft  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TARGETS = ["query", "value"]
DENSITY = 1 / 24  # 8 * (384 + 384) / (384 * 384): LoRA r=8's count per matrix

# name -> (method or None for dense fine-tuning of the targets, learning rate of the method's tensors)
METHODS: dict[str, tuple[Callable[[], PEFTMethod | None], float]] = {
    "LoRA r=8": (lambda: LoRA(r=8, alpha=16, target_modules=TARGETS, modules_to_save=HEAD), 2e-3),
    "SparseFT fisher": (lambda: SparseFT(density=DENSITY, selection="fisher", target_modules=TARGETS, modules_to_save=HEAD), 1e-3),
    "SparseFT magnitude": (lambda: SparseFT(density=DENSITY, selection="magnitude", target_modules=TARGETS, modules_to_save=HEAD), 1e-3),
    "SparseFT random": (lambda: SparseFT(density=DENSITY, selection="random", target_modules=TARGETS, modules_to_save=HEAD), 1e-3),
    "dense query/value": (lambda: None, 2e-4),
}


def build(model_dir: Path, method: PEFTMethod | None, seed: int) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)  # the head's init (the same for every method of a seed), then the method's
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, dtype=torch.float32)
    if method is not None:
        apply_peft(model, method)
    else:  # dense fine-tuning of exactly the targeted matrices (and the head)
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("classifier.") or any(f".{t}." in name for t in TARGETS))
    return model


def bytes_of(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, count: bool) -> int:
    """One training step; with ``count``, the method-specific training state at its peak, in bytes."""
    saved: list[torch.Tensor] = []
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters() if not p.requires_grad}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if count and tensor.untyped_storage().data_ptr() not in frozen:  # a frozen weight is not training state
            saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    activations = bytes_of(saved)
    saved.clear()
    loss.backward()
    optimizer.step()
    trained = [p for p in model.parameters() if p.requires_grad]
    grads = bytes_of(p.grad for p in trained if p.grad is not None)
    state = bytes_of(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1)
    indices = bytes_of(b for n, b in model.named_buffers() if n.endswith("indices"))
    optimizer.zero_grad(set_to_none=True)
    return activations + grads + state + indices


def run(name: str, args: argparse.Namespace, seed: int, tokenizer, train, val_batches) -> dict[str, float]:
    make, lr = METHODS[name]
    method = make()
    model = build(args.model, method, seed)
    order = torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(seed))[: args.steps * args.batch_size]
    batches = []
    for i in range(args.steps):
        index = order[i * args.batch_size : (i + 1) * args.batch_size].tolist()
        batches.append(encode(tokenizer, [train[0][j] for j in index], [train[1][j] for j in index], args.max_length))
    model.train()
    if method is not None and method.needs_data:  # what PEFTCallback does at on_fit_start, from the same batches
        method.initialise_from_data(model, batches[: method.init_batches], lambda b: model(**b).loss, lambda t: t)
    head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("classifier.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("classifier.")]
    trained = sum(p.numel() for p in rest)
    optimizer = torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": head, "lr": args.head_lr}], weight_decay=0.01)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    times, peak = [], 0
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        peak = max(peak, step(model, batch, optimizer, count=i == 1))  # step 1: the optimizer state exists
        times.append(time.perf_counter() - start)
        schedule.step()
    return {"accuracy": accuracy(model, val_batches), "trained": trained, "memory": peak, "step": statistics.median(times[2:] or times)}


def main() -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "assets" / "minilm-l6")
    parser.add_argument("--data", type=Path, default=REPO / "assets" / "data" / "rotten_tomatoes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--val-samples", type=int, default=500)
    parser.add_argument("--head-lr", type=float, default=2e-3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(2)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train = read_csv(args.data / "train.csv")
    val_texts, val_labels = read_csv(args.data / "validation.csv")
    val_texts, val_labels = val_texts[: args.val_samples], val_labels[: args.val_samples]
    val_batches = [encode(tokenizer, val_texts[i : i + 100], val_labels[i : i + 100], args.max_length) for i in range(0, len(val_texts), 100)]
    majority = max(val_labels.count(0), val_labels.count(1)) / len(val_labels)
    print(f"{len(val_texts)} held-out sentences, majority class {majority:.3f}; budget {args.steps} steps x {args.batch_size} sentences")

    results: dict[str, list[dict[str, float]]] = {name: [] for name in args.methods}
    for seed in args.seeds:
        for name in args.methods:
            start = time.perf_counter()
            results[name].append(run(name, args, seed, tokenizer, train, val_batches))
            print(f"seed {seed}  {name:20s} accuracy {results[name][-1]['accuracy']:.4f}  ({time.perf_counter() - start:.0f} s)", flush=True)

    reference = results[args.methods[0]]
    print(f"\n| method | trained values (without the head) | held-out accuracy (mean +- std, {len(args.seeds)} seeds) "
          f"| training state at peak (MiB) | vs {args.methods[0]} | step time vs {args.methods[0]} |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.methods:
        runs = results[name]
        accuracies = [r["accuracy"] for r in runs]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        memory = statistics.mean(r["memory"] for r in runs)
        memory_ratio = memory / statistics.mean(r["memory"] for r in reference)
        time_ratio = statistics.mean(r["step"] / ref["step"] for r, ref in zip(runs, reference))
        print(f"| {name} | {int(runs[0]['trained']):,} | {statistics.mean(accuracies):.3f} +- {spread:.3f} | {memory / 2**20:.1f} | "
              f"{memory_ratio:.2f}x | {time_ratio:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()

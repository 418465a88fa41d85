"""InCA's parallel adapters against one LoRA run and against separate single-adapter runs, on real data: the
memory and time one training step costs, and what each adapter learns.

    python benchmarks/bench_inca.py                 # 80 steps of 16 (~5 min on 2 idle CPU cores)
    python benchmarks/bench_inca.py --steps 10      # a quick look

all-MiniLM-L6-v2 on Rotten Tomatoes (the budget and data of ``bench_adapters_classification.py``, whose helpers
this script uses), three set-ups on the same batches:

- **InCA x6**: one cross-attention adapter per encoder layer (1 query, 4 heads), all six trained together from one
  backbone pass per batch, the backbone without gradient;
- **6 separate InCA runs**: the same six adapters, each trained alone (six backbone passes per batch in all);
- **LoRA r=8** on query/value + a new head: one fine-tuning run, backpropagating through the backbone.

Memory is the training state a step holds at its peak, counted exactly (see ``bench_sparse_ft.py``): the tensors
autograd saves for backward (frozen weights left out), the gradients and the AdamW moments. Step time is the median
of the timed steps; the separate runs' figure is the sum of the six. Held-out accuracy on 500 sentences.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapters_classification import HEAD, accuracy, encode, read_csv  # noqa: E402
from bench_sparse_ft import step  # noqa: E402  (the same exact count of a step's training state)

from lightning_peft import InCA, LoRA, PEFTMethod, apply_peft  # noqa: E402
from lightning_peft.methods.inca import inca_adapters  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def build(model_dir: Path, method: PEFTMethod) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, dtype=torch.float32)
    apply_peft(model, method)
    return model


def run(model: nn.Module, batches, val_batches, lr: float) -> dict:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    model.train()
    times, peak = [], 0
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        peak = max(peak, step(model, batch, optimizer, count=i == 1))
        times.append(time.perf_counter() - start)
    result = {"memory": peak, "step": statistics.median(times[2:] or times), "trained": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if hasattr(model, "lightning_peft_inca"):
        model.eval()
        with torch.no_grad():
            correct = sum((model(**{k: v for k, v in b.items()})["inca_logits"].argmax(-1) == b["labels"]).sum(-1) for b in val_batches)
        total = sum(len(b["labels"]) for b in val_batches)
        result["accuracies"] = dict(zip(inca_adapters(model).layers, (correct.double() / total).tolist()))
    else:
        result["accuracy"] = accuracy(model, val_batches)
    return result


def main() -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "assets" / "minilm-l6")
    parser.add_argument("--data", type=Path, default=REPO / "assets" / "data" / "rotten_tomatoes")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--val-samples", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts, labels = read_csv(args.data / "train.csv")
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))[: args.steps * args.batch_size].tolist()
    batches = [encode(tokenizer, [texts[j] for j in order[i : i + args.batch_size]], [labels[j] for j in order[i : i + args.batch_size]], 64)
               for i in range(0, len(order), args.batch_size)]  # fmt: skip
    val_texts, val_labels = read_csv(args.data / "validation.csv")
    val = [encode(tokenizer, val_texts[i : i + 100], val_labels[i : i + 100], 64) for i in range(0, args.val_samples, 100)]

    parallel = run(build(args.model, InCA(layers="all", heads=4)), batches, val, 2e-3)
    print(f"InCA x6 together: {parallel['step']:.3f} s/step, accuracies {parallel['accuracies']}", flush=True)
    separate = [run(build(args.model, InCA(layers=[layer], heads=4)), batches, val, 2e-3) for layer in range(6)]
    accuracies = {layer: r["accuracies"][layer] for layer, r in enumerate(separate)}
    print(f"6 separate runs: {sum(r['step'] for r in separate):.3f} s/step in all, accuracies {accuracies}", flush=True)
    lora = run(build(args.model, LoRA(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=HEAD)), batches, val, 2e-3)
    print(f"LoRA r=8: {lora['step']:.3f} s/step, accuracy {lora['accuracy']:.3f}", flush=True)

    gap = max(abs(parallel["accuracies"][layer] - accuracies[layer]) for layer in range(6))
    print(f"\nlargest accuracy difference between an adapter trained together and alone: {gap:.4f}")
    print("\n| set-up | trained values | training state at peak (MiB) | vs InCA x6 | step time (s) | vs InCA x6 | held-out accuracy |")
    print("|---|---:|---:|---:|---:|---:|---|")
    base_memory, base_step = parallel["memory"], parallel["step"]
    best = max(parallel["accuracies"].items(), key=lambda kv: kv[1])
    rows = [
        ("InCA x6, one pass", parallel["trained"], parallel["memory"], parallel["step"], f"best layer {best[0]}: {best[1]:.3f}"),
        ("6 separate InCA runs", sum(r["trained"] for r in separate), max(r["memory"] for r in separate), sum(r["step"] for r in separate),
         f"best layer {max(accuracies, key=accuracies.get)}: {max(accuracies.values()):.3f}"),
        ("LoRA r=8 (q, v) + head", lora["trained"], lora["memory"], lora["step"], f"{lora['accuracy']:.3f}"),
    ]  # fmt: skip
    for name, trained, memory, step, acc in rows:
        print(f"| {name} | {trained:,} | {memory / 2**20:.1f} | {memory / base_memory:.2f}x | {step:.3f} | {step / base_step:.2f}x | {acc} |")
    print("\n(the separate runs' memory is the largest single run's: they run one after another; their time is the sum)")


if __name__ == "__main__":
    main()

"""Do the LoRA initialisations learn faster? Steps to reach vanilla LoRA's final held-out loss, on real data.

    python benchmarks/bench_lora_inits.py                       # SmolLM2-135M on Hamlet, 3 seeds (~30 min, 2 CPU cores)
    python benchmarks/bench_lora_inits.py --seeds 0 --steps 10  # a quick look

The LoRA-GA paper (Wang et al., 2024, arXiv:2407.05000) reports 2-4x faster convergence than vanilla LoRA;
PiSSA claims faster convergence too, and DoRA better quality at equal steps. Each variant here trains
LoRA r=8 (alpha 16) on q_proj/v_proj of SmolLM2-135M-Instruct with AdamW lr 5e-4, batch 4 x 128 tokens
of Hamlet, exactly like ``configs/lora.yaml``, and evaluates the token-weighted held-out loss every
``--eval-every`` steps on the first ``--val-blocks`` held-out blocks. Per seed (which sets the data
order and the random inits), every variant sees the same batches.

Variants: ``kaiming`` (vanilla LoRA, peft's default), ``gaussian``, ``pissa`` (exact SVD), ``lora_ga``
(gradient over 8 training batches, through the same functions PEFTCallback uses), and ``dora``.
Reported per variant: the held-out loss at the end (mean over seeds) and the first evaluated step at
which it reaches vanilla LoRA's final loss of the same seed ("-" if never within the run).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from lightning_peft import DoRA, LoRA, apply_peft
from lightning_peft.core.adapter_layer import adapter_layers
from lightning_peft.methods.lora import LoRALayer
from lightning_peft.methods.lora_ga import estimate_weight_gradients, initialise_from_gradients
from lightning_peft.recipes.data import TextFileDataModule

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {
    "kaiming": lambda: LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
    "gaussian": lambda: LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"], init="gaussian"),
    "pissa": lambda: LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"], init="pissa"),
    "lora_ga": lambda: LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"], init="lora_ga", init_batches=8),
    "dora": lambda: DoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
}


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


@torch.no_grad()
def held_out_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(lm_loss(model, batch)) * n
        tokens += n
    model.train()
    return total / tokens


def run(base: nn.Module, variant: str, train: list, val: list, eval_every: int) -> dict[int, float]:
    torch.manual_seed(len(variant))  # random inits differ per variant but repeat across reruns
    model = copy.deepcopy(base)
    method = VARIANTS[variant]()
    apply_peft(model, method)
    if getattr(method, "needs_data", False):
        layers = {n: layer for n, layer in adapter_layers(model) if isinstance(layer, LoRALayer)}
        gradients = estimate_weight_gradients(model, layers, train[: method.init_batches], lambda b: lm_loss(model, b))
        initialise_from_gradients(layers, gradients, method.r, method.lora_ga_gamma, method.svd_niter)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.0)
    model.train()
    curve = {0: held_out_loss(model, val)}
    for step, batch in enumerate(train, start=1):
        lm_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % eval_every == 0 or step == len(train):
            curve[step] = held_out_loss(model, val)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "assets" / "smollm2-135m-instruct"))
    parser.add_argument("--text", default=str(REPO / "assets" / "data" / "hamlet.txt"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--val-blocks", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data = TextFileDataModule(args.model, args.text, block_size=128, batch_size=4, max_val_blocks=args.val_blocks)
    data.setup("fit")
    val = list(data.val_dataloader())
    curves: dict[str, list[dict[int, float]]] = {v: [] for v in args.variants}
    for seed in args.seeds:
        torch.manual_seed(seed)
        # The data module shuffles from its own shuffle_seed, not the global generator: without this line every
        # seed saw the same batches (the figures in RESULTS.md of 2026-11-23 were taken so: init varied, order not).
        data.shuffle_seed = seed
        train = [batch for batch, _ in zip(data.train_dataloader(), range(args.steps))]
        for variant in args.variants:
            start = time.perf_counter()
            curve = run(base, variant, train, val, args.eval_every)
            curves[variant].append(curve)
            print(f"seed {seed} {variant:>8}: held-out loss {curve[0]:.4f} -> {curve[args.steps]:.4f} ({time.perf_counter() - start:.0f} s) "
                  + " ".join(f"{s}:{v:.3f}" for s, v in curve.items()), flush=True)  # fmt: skip

    print(f"\nSmolLM2-135M-Instruct, Hamlet, LoRA r=8 q/v, {args.steps} steps, seeds {args.seeds}, eval every {args.eval_every} steps on {len(val)} batches")
    print(f"{'variant':>8} | final held-out loss (mean +- sd) | steps to reach kaiming's final loss, per seed | speed-up")
    for variant in args.variants:
        finals = [c[args.steps] for c in curves[variant]]
        reached = []
        for curve, reference in zip(curves[variant], curves.get("kaiming", curves[variant])):
            target = reference[args.steps]
            reached.append(next((s for s in sorted(curve) if s > 0 and curve[s] <= target), None))
        spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
        speedups = [args.steps / s for s in reached if s]
        speedup = f"{statistics.mean(speedups):.2f}x" if len(speedups) == len(reached) else "-"
        steps = ", ".join(str(s) if s else "-" for s in reached)
        print(f"{variant:>8} | {statistics.mean(finals):.4f} +- {spread:.4f} | {steps} | {speedup}")


if __name__ == "__main__":
    main()

"""LayerDrop at fine-tuning time: does it make a pruned model better, and what does it cost per step?

    python benchmarks/bench_layerdrop.py            # SmolLM2-135M-Instruct on Hamlet, 40 steps per run (~15 min, 2 CPU cores)
    python benchmarks/bench_layerdrop.py --quick    # 2 steps, 2 held-out blocks: a smoke run

Fan et al. (2019, arXiv:1909.11556) train with LayerDrop so that whole layers can be removed at inference
("depth on demand"); their main results apply it during pre-training. Here it is applied during a short LoRA
fine-tune only, which is what this package offers, so this measures rather than promises. Two runs, same seed,
same batches (batch 4 x 128 tokens of Hamlet): LoRA r=8 on q_proj and v_proj with AdamW, as ``configs/lora.yaml``,
lr 5e-4, without LayerDrop and with LayerDrop p=0.2 (the paper's value). For each, the token-weighted held-out
perplexity of the full 30-layer model and of pruned copies (``prune_layers``): every other layer (15 left, the
paper's inference pruning) and every sixth layer removed (25 left).

Step time: on the trained model, training steps at p=0.2 and at p=0 alternate (``--timing-steps`` of each), so
both see the same machine load; the ratio of the medians is reported (these machines are noisy: read the ratio,
not the seconds). The draw of each step is the one ``PEFTCallback`` would make, ``(seed, step, batch)``.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from lightning_peft import Composition, LayerDrop, LoRA, apply_peft
from lightning_peft.methods.layerdrop import ATTRIBUTE
from lightning_peft.operations.pruning import prune_layers
from lightning_peft.recipes.data import TextFileDataModule

REPO = Path(__file__).resolve().parent.parent


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


@torch.no_grad()
def perplexity(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(lm_loss(model, batch)) * n
        tokens += n
    model.train()
    return math.exp(total / tokens)


def train(base: nn.Module, p: float, batches: list[dict[str, torch.Tensor]]) -> nn.Module:
    torch.manual_seed(0)  # the same LoRA init in both runs
    model = copy.deepcopy(base)
    lora = LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    apply_peft(model, Composition([lora, LayerDrop(p=p)]) if p > 0 else lora)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=5e-4, weight_decay=0.0)
    model.train()
    for step, batch in enumerate(batches):
        controller = getattr(model, ATTRIBUTE, None)
        if controller is not None:
            controller.draw_key = (step, 0)  # what PEFTCallback sets before each batch
        lm_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def step_times(model: nn.Module, batches: list[dict[str, torch.Tensor]], steps: int) -> tuple[float, float]:
    """Median seconds of a forward + backward at p=0.2 and at p=0, alternating, on the same model."""
    timed = copy.deepcopy(model)
    if not hasattr(timed, ATTRIBUTE):
        return math.nan, math.nan
    controller = getattr(timed, ATTRIBUTE)
    times: dict[float, list[float]] = {0.2: [], 0.0: []}
    for step in range(steps):
        for p in (0.2, 0.0):
            controller.p = p
            controller.draw_key = (1000 + step, 0)
            batch = batches[step % len(batches)]
            start = time.perf_counter()
            lm_loss(timed, batch).backward()
            times[p].append(time.perf_counter() - start)
            timed.zero_grad(set_to_none=True)
    return statistics.median(times[0.2]), statistics.median(times[0.0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--val-blocks", type=int, default=24)
    parser.add_argument("--timing-steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 steps, 2 held-out blocks, 1 timing step")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.val_blocks, args.timing_steps = 2, 2, 1
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    assets = REPO / "assets"
    data = TextFileDataModule(tokenizer=str(assets / "smollm2-135m-instruct"), train_file=str(assets / "data" / "hamlet.txt"),
                              val_fraction=0.1, block_size=128, batch_size=4, max_val_blocks=args.val_blocks)  # fmt: skip
    data.setup("fit")
    train_batches = [b for _, b in zip(range(args.steps), data.train_dataloader())]
    val_batches = list(data.val_dataloader())
    base = AutoModelForCausalLM.from_pretrained(assets / "smollm2-135m-instruct", dtype=torch.float32)
    layers = base.config.num_hidden_layers
    keeps = {"every other": "every_other", "every 6th removed": [i for i in range(layers) if i % 6 != 5]}
    print(f"SmolLM2-135M-Instruct ({layers} layers), LoRA r=8 q_proj/v_proj, {args.steps} steps of 4 x 128 tokens, "
          f"{len(val_batches)} held-out batches", flush=True)  # fmt: skip
    print(f"base model: full {perplexity(base, val_batches):.2f}, "
          + ", ".join(f"{name} {perplexity(prune_layers(base, keep), val_batches):.2f}" for name, keep in keeps.items()), flush=True)
    rows = []
    for p in (0.0, 0.2):
        start = time.perf_counter()
        model = train(base, p, train_batches)
        seconds = time.perf_counter() - start
        pruned = {name: perplexity(prune_layers(model, keep), val_batches) for name, keep in keeps.items()}
        rows.append((p, perplexity(model, val_batches), pruned, seconds))
        print(f"p={p}: trained in {seconds:.0f} s; full {rows[-1][1]:.2f}, " + ", ".join(f"{k} {v:.2f}" for k, v in pruned.items()), flush=True)
    dropped_time, full_time = step_times(model, train_batches, args.timing_steps)

    print()
    print(f"| LayerDrop p | full ({layers} layers) | " + " | ".join(f"{name} ({len(prune_layers(base, keep).model.layers)} layers)" for name, keep in keeps.items()) + " |")
    print("|---|---|" + "---|" * len(keeps))
    for p, full, pruned, _ in rows:
        print(f"| {p} | {full:.2f} | " + " | ".join(f"{v:.2f}" for v in pruned.values()) + " |")
    print()
    print(f"step time ratio p=0.2 / p=0: {dropped_time / full_time:.3f} (medians {dropped_time:.2f} s / {full_time:.2f} s, "
          f"{args.timing_steps} alternating steps each)")  # fmt: skip


if __name__ == "__main__":
    main()

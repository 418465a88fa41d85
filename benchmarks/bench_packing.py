"""Sequence packing against padded batches on the chat data: real (non-padding) tokens per second, side by side.

    python benchmarks/bench_packing.py               # SmolLM2, LoRA r=8 (q, v), 10 steps of each, alternating
    python benchmarks/bench_packing.py --steps 4     # a quick look

SmolLM2-135M-Instruct in float32 with LoRA r=8 on q_proj/v_proj trains on the offline chat conversations
(assistant replies scored, :class:`~lightning_peft.recipes.data.ChatDataModule`), with the same loss (the
chunked causal-LM loss) and the same optimizer, fed two ways from the same shuffled training split:

- ``padded``: batches of ``--batch`` conversations, each padded to the batch's longest (``pack=False``);
- ``packed``: batches of ``--rows`` rows of ``--max-length`` tokens filled with whole conversations
  (``pack=True``: position ids restart per conversation, no attention across them, sdpa).

The two alternate step by step so the machine's noise falls on both; each counts the real tokens it trained on
and its seconds (forward, backward, AdamW step). Last line: ``packing speedup X`` (packed real tokens/s over
padded real tokens/s). The padding fractions the data module reports are printed too.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lightning_peft import LoRA, apply_peft
from lightning_peft.operations.causal_lm_loss import causal_lm_loss
from lightning_peft.recipes.data import ChatDataModule

REPO = Path(__file__).resolve().parent.parent


def _batches(data: ChatDataModule):
    """The training loader's batches, each with its number of real tokens (what the rows hold before padding)."""
    loader = data.train_dataloader()
    for indices in loader.batch_sampler:
        features = [data.train_dataset[i] for i in indices]
        yield loader.collate_fn(features), sum(len(f["input_ids"]) for f in features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "assets/smollm2-135m-instruct"))
    parser.add_argument("--chat", default=str(REPO / "assets/data/chat/train.jsonl"))
    parser.add_argument("--batch", type=int, default=8, help="conversations per padded batch")
    parser.add_argument("--rows", type=int, default=1, help="packed rows per packed batch")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").train()
    apply_peft(model, LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    feeds = {}
    for name, pack, batch_size in (("padded", False, args.batch), ("packed", True, args.rows)):
        data = ChatDataModule(args.model, args.chat, args.chat, max_length=args.max_length, batch_size=batch_size, pack=pack)
        data.shuffle_seed = 0
        data.setup("fit")
        if pack:
            stats = data.packing_stats["train_file"]
            print(f"packed {stats['examples']} conversations into {stats['rows']} rows of <= {args.max_length} tokens")
        feeds[name] = _batches(data)

    totals = {name: [0, 0.0] for name in feeds}  # real tokens, seconds
    for step in range(args.steps + 1):
        for name in (("padded", "packed") if step % 2 == 0 else ("packed", "padded")):
            batch, real = next(feeds[name])
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            start = time.perf_counter()
            loss = causal_lm_loss(model, inputs, batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - start
            if step == 0:
                continue  # warm-up
            totals[name][0] += real
            totals[name][1] += seconds
            print(f"step {step} {name}: {tuple(batch['input_ids'].shape)}, {real} real tokens ({real / batch['input_ids'].numel():.0%}), {seconds:.2f} s")
    rate = {name: tokens / seconds for name, (tokens, seconds) in totals.items()}
    print("\n| batches | real tokens | seconds | real tokens/s |\n|---|---:|---:|---:|")
    for name, (tokens, seconds) in totals.items():
        print(f"| {name} | {tokens:,} | {seconds:.1f} | {rate[name]:,.0f} |")
    print(f"packing speedup {rate['packed'] / rate['padded']:.2f}")


if __name__ == "__main__":
    main()

"""Steering SmolLM2-135M-Instruct's movie reviews with inference-time intervention: sentiment and perplexity
against alpha (Li et al. 2023's trade-off curve, at our scale).

    python benchmarks/bench_iti_steering.py            # ~10 min on 2 idle CPU cores; writes benchmarks/iti_steering.png
    python benchmarks/bench_iti_steering.py --quick    # a smoke run: 2 prompts, 1 seed, 3 alphas

1. A sentiment judge, trained by this package: all-MiniLM-L6-v2 + LoRA r=8 on query/value + a new head, on
   Rotten Tomatoes (``--judge-steps`` AdamW steps of 16 sentences), scored on 500 held-out sentences.
2. ITI fitted once on SmolLM2-135M-Instruct from ``--fit-sentences`` Rotten Tomatoes training sentences (label
   1 = fresh/positive): the top ``--heads`` of its 270 heads by held-out probe accuracy, mass-mean directions.
3. For each alpha (``steering_strength``, no refitting): the chat model is asked to review each of a fixed set
   of made-up films, once per seed (sampling at temperature 0.8, 40 new tokens); the judge labels every review;
   and the held-out perplexity of the last 10% of Hamlet (128-token blocks) measures what steering costs.
   alpha > 0 steers towards positive, alpha < 0 towards negative, 0 is the base model exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapters_classification import HEAD, accuracy, encode, read_csv  # noqa: E402

from lightning_peft import ITI, LoRA, apply_peft  # noqa: E402
from lightning_peft.methods.iti import steering_strength  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets"
FILMS = [
    "The Lighthouse Keeper's Daughter", "Midnight on Mercury Street", "A Winter in Lisbon", "The Last Algorithm",
    "Paper Tigers", "Harvest of Glass", "The Clockmaker's Apprentice", "Blue Horizon", "Sixteen Candles for Mara",
    "The Silent Orchard", "Neon Prairie", "Echoes of the Deep",
]


def train_judge(steps: int, seed: int = 0) -> tuple[nn.Module, object, float]:
    """MiniLM + LoRA sentiment classifier (this package's LoRA, a plain loop), and its held-out accuracy."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "minilm-l6")
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(ASSETS / "minilm-l6", num_labels=2, dtype=torch.float32)
    apply_peft(model, LoRA(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=HEAD))
    texts, labels = read_csv(ASSETS / "data" / "rotten_tomatoes" / "train.csv")
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.01)
    model.train()
    for i in range(steps):
        index = order[(i * 16) % len(texts) :][:16].tolist()
        loss = model(**encode(tokenizer, [texts[j] for j in index], [labels[j] for j in index], 64)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    val_texts, val_labels = read_csv(ASSETS / "data" / "rotten_tomatoes" / "validation.csv")
    val = [encode(tokenizer, val_texts[i : i + 100], val_labels[i : i + 100], 64) for i in range(0, 500, 100)]
    return model.eval(), tokenizer, accuracy(model, val)


@torch.no_grad()
def positive_share(judge: nn.Module, tokenizer, texts: list[str]) -> float:
    batch = tokenizer(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
    predictions = judge(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    return float(predictions.float().mean())


def fit_batches(tokenizer, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    texts, labels = read_csv(ASSETS / "data" / "rotten_tomatoes" / "train.csv")
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed + 1))[:count].tolist()
    batches = []
    for i in range(0, count, 16):
        chosen = order[i : i + 16]
        enc = tokenizer([texts[j] for j in chosen], truncation=True, max_length=64, padding=True, return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor([labels[j] for j in chosen])})
    return batches


@torch.no_grad()
def reviews(model: nn.Module, tokenizer, films: list[str], seed: int, new_tokens: int) -> list[str]:
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": f"Write a one-sentence review of the film \"{film}\"."}],
                                      tokenize=False, add_generation_prompt=True)
        for film in films
    ]
    tokenizer.padding_side = "left"  # generation continues every row from its last token
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    out = model.generate(**enc, do_sample=True, temperature=0.8, top_p=0.9, max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
    tokenizer.padding_side = "right"
    return [text.strip() for text in tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)]


@torch.no_grad()
def hamlet_perplexity(model: nn.Module, tokenizer, blocks: int) -> float:
    ids = tokenizer((ASSETS / "data" / "hamlet.txt").read_text(), return_tensors="pt")["input_ids"][0]
    held = ids[int(len(ids) * 0.9) :]
    total, count = 0.0, 0
    for i in range(min(blocks, len(held) // 128)):
        block = held[i * 128 : (i + 1) * 128][None]
        total += float(model(input_ids=block, labels=block).loss) * 127
        count += 127
    return math.exp(total / count)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [r["alpha"] for r in rows]
    fig, left = plt.subplots(figsize=(6.4, 4.0))
    left.plot(alphas, [r["positive"] for r in rows], "o-", color="tab:green", label="positive reviews (judge)")
    left.set_xlabel("alpha (standard deviations along each steered head's direction)")
    left.set_ylabel("share of reviews judged positive")
    left.set_ylim(0, 1)
    right = left.twinx()
    right.plot(alphas, [r["perplexity"] for r in rows], "s--", color="tab:red", label="Hamlet perplexity")
    right.set_ylabel("held-out Hamlet perplexity")
    left.set_title("ITI on SmolLM2-135M-Instruct: sentiment vs. cost")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[-10, -5, 0, 5, 10, 15, 20])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--fit-sentences", type=int, default=512)
    parser.add_argument("--judge-steps", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--hamlet-blocks", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="2 films, 1 seed, 3 alphas, a short judge and fit")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "iti_steering.png")
    args = parser.parse_args()
    films = FILMS
    if args.quick:
        args.alphas, args.seeds, films = [-10, 0, 10], [0], FILMS[:2]
        args.judge_steps, args.fit_sentences, args.new_tokens, args.hamlet_blocks = 20, 64, 16, 2
    torch.set_num_threads(2)

    start = time.perf_counter()
    judge, judge_tokenizer, judge_accuracy = train_judge(args.judge_steps)
    print(f"judge: MiniLM + LoRA r=8, {args.judge_steps} steps, held-out accuracy {judge_accuracy:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "smollm2-135m-instruct")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(ASSETS / "smollm2-135m-instruct", dtype=torch.float32).eval()
    method = ITI(num_heads=args.heads, alpha=0.0)
    start = time.perf_counter()
    method.fit(model, fit_batches(tokenizer, args.fit_sentences))
    print(f"ITI fitted on {args.fit_sentences} sentences ({time.perf_counter() - start:.0f} s)", flush=True)

    rows = []
    for alpha in args.alphas:
        start = time.perf_counter()
        with steering_strength(model, alpha):
            texts = [t for seed in args.seeds for t in reviews(model, tokenizer, films, seed, args.new_tokens)]
            perplexity = hamlet_perplexity(model, tokenizer, args.hamlet_blocks)
        rows.append({"alpha": alpha, "positive": positive_share(judge, judge_tokenizer, texts), "perplexity": perplexity, "example": texts[0]})
        print(f"alpha {alpha:+6.1f}: positive {rows[-1]['positive']:.3f} of {len(texts)}, Hamlet perplexity {perplexity:.2f} "
              f"({time.perf_counter() - start:.0f} s)  e.g. {texts[0][:90]!r}", flush=True)  # fmt: skip

    print(f"\n| alpha | reviews judged positive ({len(films)} films x {len(args.seeds)} seeds) | held-out Hamlet perplexity |")
    print("|---:|---:|---:|")
    for row in rows:
        print(f"| {row['alpha']:+.0f} | {row['positive']:.3f} | {row['perplexity']:.2f} |")
    plot(rows, args.out)
    args.out.with_suffix(".json").write_text(json.dumps({"judge_accuracy": judge_accuracy, "rows": rows}, indent=1))
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()

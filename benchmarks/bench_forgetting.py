"""Does LoRA learn less and forget less? The learning-forgetting trade-off of Biderman et al. (2024), offline.

    python benchmarks/bench_forgetting.py            # 6 methods x 3 seeds, 2 rates swept for 2 of them (CPU, ~1 h)
    python benchmarks/bench_forgetting.py --quick    # a smoke run (2 methods, 1 rate, 1 seed, 2 steps): what the tests run

"LoRA Learns Less and Forgets Less" (arXiv:2405.09673) fine-tunes Llama-2-7B on code and math and finds that,
against full fine-tuning, LoRA improves the target domain less and degrades the source domain less, and that
full fine-tuning's weight perturbations have 10-100x the rank of typical LoRA configurations.

The small version here: SmolLM2-135M-Instruct (the offline default model) is fine-tuned on Shakespeare
(Hamlet, 64-token blocks: the *target*, text an instruct model does not write) and measured, with
:class:`~lightning_peft.ForgettingMonitor` through a real Trainer, on chat conversations (the *source*: the
assistant replies of the chat data, what the instruct model was tuned to do). Every run of a seed sees the
same Hamlet batches; "learned" is the base's held-out Hamlet loss minus the run's, "forgot" is the run's chat
loss minus the base's (both token-weighted, nats per token). At the end, :func:`~lightning_peft.weight_spectrum`
gives each adapted matrix's perturbation spectrum and the rank holding 90% of its energy.

Methods (the paper's: LoRA at ranks 8/64/256 with alpha = 2r on every linear layer, and full fine-tuning;
plus DoRA and (IA)3; ``--methods "LoRA r=8 (q, v)"`` adds the configs' own LoRA) and their learning rates (the paper: LoRA needs a larger rate than
full fine-tuning; each method is compared at its own best rate). Full fine-tuning, LoRA r=8 and LoRA r=256 are swept over
two rates on the first seed, and the rate with the lower held-out Hamlet loss then runs on the other seeds; the
other methods run at one rate (compute: each run is 1.5-3 minutes on 2 cores). Writes
``forgetting.json`` (every run's curve and spectrum ranks) and ``forgetting_pareto.png`` (learning against
forgetting, a point per method and rate) into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_peft import IA3, DoRA, ForgettingMonitor, LoRA, PEFTCallback, PEFTMethod, weight_spectrum
from lightning_peft.recipes.data import ChatDataModule, TextFileDataModule

REPO = Path(__file__).resolve().parent.parent
ALL = "all-linear"

# name -> (the method, or None for full fine-tuning; its learning rates). A method with two rates is swept on the
# first seed and its better rate (lower held-out target loss) runs on the others; the rest run at one rate, set
# from the paper's guidance (LoRA wants about 10x full fine-tuning's rate) to keep the whole within ~1 h of 2 cores.
METHODS: dict[str, tuple[Callable[[], PEFTMethod | None], list[float]]] = {
    "full fine-tuning": (lambda: None, [2e-5, 1e-4]),
    "LoRA r=8 (all linear)": (lambda: LoRA(r=8, alpha=16, target_modules=ALL), [3e-4, 1e-3]),
    "LoRA r=64 (all linear)": (lambda: LoRA(r=64, alpha=128, target_modules=ALL), [1e-3]),
    # Swept: at 1e-3 this rank's update (alpha/r = 2 on 256 directions) overshoots, learning less and forgetting most.
    "LoRA r=256 (all linear)": (lambda: LoRA(r=256, alpha=512, target_modules=ALL), [2e-4, 1e-3]),
    "DoRA r=8 (all linear)": (lambda: DoRA(r=8, alpha=16, target_modules=ALL), [1e-3]),
    "(IA)3": (lambda: IA3(), [3e-2]),
    # Not in the default run (the paper's claims are about all-linear LoRA); the configs' own LoRA, for comparison.
    "LoRA r=8 (q, v)": (lambda: LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"]), [2e-3]),
}
DEFAULT_METHODS = [name for name in METHODS if name != "LoRA r=8 (q, v)"]
QUICK_METHODS = ["full fine-tuning", "LoRA r=8 (all linear)"]


class LitLM(L.LightningModule):
    """The plainest causal-LM module: AdamW (no weight decay, constant rate) on whatever is trainable."""

    def __init__(self, model: nn.Module, lr: float) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.0)


def run(base: nn.Module, name: str, lr: float, seed: int, train: list, source: list, target: list, args) -> dict:
    make, _ = METHODS[name]
    torch.manual_seed(1000 + seed)  # adapter inits: the same for every rate of a seed
    model = copy.deepcopy(base)
    method = make()
    monitor = ForgettingMonitor(source=source, target=target, every_n_steps=args.eval_every, target_metric=None)
    callbacks = [monitor] if method is None else [PEFTCallback(method), monitor]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=len(train), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(LitLM(model, lr), train_dataloaders=DataLoader(train, batch_size=None))
    seconds = time.perf_counter() - start
    spectra = weight_spectrum(model) if method is not None else weight_spectrum(model, base=base)
    # Full fine-tuning changes the embedding too; the paper's comparison is over the transformer's matrices.
    ranks = [s.rank_90 for n, s in spectra.items() if "embed" not in n and "lm_head" not in n]
    first, last = monitor.history[0], [h for h in monitor.history if "source_loss" in h][-1]
    return {
        "method": name, "lr": lr, "seed": seed, "steps": len(train), "seconds": seconds,
        "learned": first["target_loss"] - last["target_loss"], "forgot": last["source_loss"] - first["source_loss"],
        "target_loss": last["target_loss"], "source_loss": last["source_loss"],
        "base_target_loss": first["target_loss"], "base_source_loss": first["source_loss"],
        "rank_90_mean": statistics.mean(ranks), "rank_90_max": max(ranks), "matrices": len(ranks),
        "curve": [{k: h[k] for k in ("step", "source_loss", "target_loss")} for h in monitor.history],
    }


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def best_rates(runs: list[dict], first_seed: int) -> dict[str, float]:
    """Per method, the swept rate with the lowest held-out target loss on the first seed."""
    best: dict[str, dict] = {}
    for r in runs:
        if r["seed"] == first_seed and (r["method"] not in best or r["target_loss"] < best[r["method"]]["target_loss"]):
            best[r["method"]] = r
    return {name: r["lr"] for name, r in best.items()}


def table(runs: list[dict], rates: dict[str, float]) -> list[str]:
    lines = [
        "| method | lr | seeds | learned (target loss drop) | forgot (source loss rise) | rank for 90% energy (mean, max) | s per run |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, lr in rates.items():
        chosen = [r for r in runs if r["method"] == name and r["lr"] == lr]
        learned, forgot = mean_sd([r["learned"] for r in chosen]), mean_sd([r["forgot"] for r in chosen])
        rank = statistics.mean(r["rank_90_mean"] for r in chosen)
        lines.append(
            f"| {name} | {lr:g} | {len(chosen)} | {learned[0]:.4f} ± {learned[1]:.4f} | {forgot[0]:+.4f} ± {forgot[1]:.4f} | "
            f"{rank:.1f}, {max(r['rank_90_max'] for r in chosen)} | {statistics.mean(r['seconds'] for r in chosen):.0f} |"
        )
    return lines


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def pareto_plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name in dict.fromkeys(r["method"] for r in runs):
        for lr in sorted({r["lr"] for r in runs if r["method"] == name}):
            chosen = [r for r in runs if r["method"] == name and r["lr"] == lr]
            learned, forgot = mean_sd([r["learned"] for r in chosen]), mean_sd([r["forgot"] for r in chosen])
            ax.errorbar(learned[0], forgot[0], xerr=learned[1], yerr=forgot[1], fmt="o", capsize=3,
                        label=f"{name}, lr {lr:g} ({len(chosen)} seeds)")  # fmt: skip
    ax.set_xlabel("learned: drop of held-out Hamlet loss (nats/token)")
    ax.set_ylabel("forgot: rise of chat-reply loss (nats/token)")
    ax.set_title("SmolLM2-135M-Instruct fine-tuned on Hamlet: learning vs forgetting")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "assets" / "smollm2-135m-instruct"))
    parser.add_argument("--text", default=str(REPO / "assets" / "data" / "hamlet.txt"))
    parser.add_argument("--chat", default=str(REPO / "assets" / "data" / "chat" / "validation.jsonl"))
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--eval-every", type=int, default=12)
    # 4 x 64-token blocks per step: a full fine-tuning step of the 135M model is ~3 s on 2 cores, so the 20 runs fit
    # in about an hour (at 4 x 128 a run took 5-11 minutes).
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--target-blocks", type=int, default=16, help="held-out Hamlet blocks")
    parser.add_argument("--source-conversations", type=int, default=96)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    parser.add_argument("--quick", action="store_true", help="2 methods, their first rate, seed 0, 2 steps, 1 batch each")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out/forgetting.json and run only the missing ones")
    args = parser.parse_args()
    if args.quick:
        args.methods, args.seeds, args.steps, args.eval_every = QUICK_METHODS, [0], 2, 1
        args.target_blocks, args.source_conversations = 2, 4
    if not args.quick and not have_matplotlib():
        # Checked before an hour of training, not after it.
        parser.error("the plot needs matplotlib: pip install -e '.[bench]' (or run --quick, which skips the plot without it)")
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    hamlet = TextFileDataModule(args.model, args.text, block_size=args.block_size, batch_size=4, max_val_blocks=args.target_blocks)
    hamlet.setup("fit")
    target = list(hamlet.val_dataloader())
    chat = ChatDataModule(args.model, args.chat, args.chat, max_length=256, batch_size=8, max_val_samples=args.source_conversations)
    chat.setup("validate")
    source = list(chat.val_dataloader())
    print(f"target: {len(target)} held-out Hamlet batches; source: {len(source)} batches of chat replies; {args.steps} steps x 4 x {args.block_size} tokens")

    def batches(seed: int) -> list:
        # The data module shuffles from its own shuffle_seed (so that a resumed run replays its order), not from
        # the global generator: the seed must be set there, or every seed would see the same batches.
        hamlet.shuffle_seed = seed
        return [batch for batch, _ in zip(hamlet.train_dataloader(), range(args.steps))]

    results = args.out / "forgetting.json"
    runs: list[dict] = json.loads(results.read_text())["runs"] if args.resume and results.exists() else []
    args.out.mkdir(parents=True, exist_ok=True)

    def record(name: str, lr: float, seed: int, train: list) -> None:
        if any((r["method"], r["lr"], r["seed"]) == (name, lr, seed) for r in runs):
            return  # --resume: measured already
        result = run(base, name, lr, seed, train, source, target, args)
        runs.append(result)
        # Written after every run, so an interrupted benchmark resumes with --resume.
        results.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=1))
        print(f"seed {seed} {name:24s} lr {lr:<7g} learned {result['learned']:+.4f} forgot {result['forgot']:+.4f} "
              f"rank90 {result['rank_90_mean']:.1f} ({result['seconds']:.0f} s)", flush=True)  # fmt: skip

    first, *others = args.seeds
    train = batches(first)
    for name in args.methods:
        for lr in METHODS[name][1][: 1 if args.quick else None]:
            record(name, lr, first, train)
    rates = best_rates(runs, first)
    for seed in others:
        train = batches(seed)
        for name, lr in rates.items():
            record(name, lr, seed, train)

    if have_matplotlib():
        pareto_plot(runs, args.out / "forgetting_pareto.png")
    else:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
    print("\n" + "\n".join(table(runs, rates)))
    full = [r for r in runs if r["method"] == "full fine-tuning" and r["lr"] == rates.get("full fine-tuning")]
    lora = [r for r in runs if r["method"].startswith("LoRA") and r["lr"] == rates.get(r["method"])]
    if full and lora:
        print(f"\nlearned: full {mean_sd([r['learned'] for r in full])[0]:.4f}, best LoRA {max(r['learned'] for r in lora):.4f}; "
              f"forgot: full {mean_sd([r['forgot'] for r in full])[0]:+.4f}, LoRA mean {mean_sd([r['forgot'] for r in lora])[0]:+.4f}")  # fmt: skip


if __name__ == "__main__":
    main()

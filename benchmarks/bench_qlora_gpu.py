"""QLoRA training of Llama-architecture models of 8B and 70B shape on one GPU: peak memory and tokens/s, ours
against peft + transformers on the same quantized base, side by side.

    python benchmarks/bench_qlora_gpu.py                           # 8B shape, seq 2048, batch 1: ours vs peft
    python benchmarks/bench_qlora_gpu.py --shape 70b --impl ours   # 70B shape on one GPU (floor ~47 GB)
    python benchmarks/bench_qlora_gpu.py --impl ours --loss plain  # ours with transformers' loss (the logits' cost)
    python benchmarks/bench_qlora_gpu.py --layers 4 --steps 3      # a quick look
    python benchmarks/bench_qlora_gpu.py --device cpu --shape tiny --steps 2   # a CPU smoke run of the script

The weights are random (no checkpoint is needed, or reachable offline) and are made directly on the device one
tensor at a time and quantized to NF4 + double quantization as they are made, through the same streaming path
that loads checkpoints (:func:`lightning_peft.quantization.loading.load_streaming`): the bf16 model never exists,
on the host or on the GPU. Both implementations then train that base with LoRA r=16 (alpha 32) on every linear
layer, non-reentrant gradient checkpointing and bitsandbytes' PagedAdamW8bit (AdamW8bit on the CPU), each with its
own recipe:

- ``ours``: :func:`~lightning_peft.quantization.prepare_model_for_kbit_training` (norms in float32),
  :func:`~lightning_peft.apply_peft`, and the chunked loss (``CausalLMTask``'s default; ``--loss plain`` for
  transformers' own);
- ``peft``: what a transformers + peft user runs after ``from_pretrained(..., quantization_config=
  BitsAndBytesConfig(nf4, double quant))``: ``peft.prepare_model_for_kbit_training`` (which casts every
  non-quantized weight, embedding and head included, to float32), ``get_peft_model(LoraConfig(...))`` and
  ``model(..., labels=...).loss``. The base layers are the same bitsandbytes ``Linear4bit`` modules
  transformers' loader makes, so the comparison is of the two libraries' training steps, not their loaders.

With ``--impl both`` (the default) each runs in its own subprocess (a clean peak-memory count) and the last line
is ``ours / peft: tokens/s ratio X, peak memory ratio Y``. Reported per run: the device, the quantized weights'
memory, the peak memory of the training steps (``torch.cuda.max_memory_allocated``; ``VmHWM`` on the CPU),
tokens/s over the timed steps (after warm-up), and the model FLOP utilisation implied by ~6N FLOPs per token
(frozen-base forward 2N + input-gradient backward 2N + recompute 2N) against ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from lightning_peft import LoRA, Quantization, apply_peft, parameter_summary
from lightning_peft.operations.causal_lm_loss import causal_lm_loss
from lightning_peft.quantization import prepare_model_for_kbit_training
from lightning_peft.quantization.loading import empty_model, load_streaming

# name -> LlamaConfig fields (Llama-3 8B and 70B: 8.03B and 70.6B parameters with the 128K vocabulary).
SHAPES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}


def llama_config(shape: str, layers: int | None):
    from transformers import LlamaConfig

    fields = dict(SHAPES[shape])
    if layers is not None:
        fields["num_hidden_layers"] = layers
    return LlamaConfig(
        **fields, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="sdpa"
    )


def random_weights(model: torch.nn.Module, device: torch.device, std: float = 0.02):
    """``(name, tensor)`` for every parameter, made on ``device`` one at a time (norms start at 1)."""
    generator = torch.Generator(device=device).manual_seed(0)
    shapes = [(name, param.shape) for name, param in model.named_parameters()]  # before the loader swaps layers
    for name, shape in shapes:
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=torch.bfloat16, device=device)
        else:
            yield name, torch.randn(shape, generator=generator, dtype=torch.bfloat16, device=device) * std


def host_peak_mb() -> float:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:")) / 1024


def _adapt(model: torch.nn.Module, impl: str, rank: int, loss: str):
    """The implementation's recipe on the quantized base; returns (model, loss function of the token ids)."""
    if impl == "ours":
        prepare_model_for_kbit_training(model, gradient_checkpointing=True)  # norms fp32, non-reentrant
        apply_peft(model, LoRA(r=rank, alpha=2 * rank, target_modules="all-linear"))
        if loss == "chunked":
            return model, lambda ids: causal_lm_loss(model, {"input_ids": ids}, ids)
        return model, lambda ids: model(input_ids=ids, labels=ids, use_cache=False).loss
    from peft import LoraConfig, get_peft_model
    from peft import prepare_model_for_kbit_training as peft_prepare

    model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=BitsAndBytesConfig(4 bit)) sets
    model = peft_prepare(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    return model, lambda ids: model(input_ids=ids, labels=ids, use_cache=False).loss


def run_one(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: use --device cpu --shape tiny for a smoke run")
    import bitsandbytes as bnb
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cuda = device.type == "cuda"
    start = time.perf_counter()
    config = llama_config(args.shape, args.layers)
    model = empty_model(config, LlamaForCausalLM, torch.bfloat16)
    quantization = Quantization(bits=4, quant_type="nf4", double_quant=True, compute_dtype="bfloat16")
    report = load_streaming(model, random_weights(model, device), quantization, device=device, dtype=torch.bfloat16)
    if cuda:
        torch.cuda.synchronize()
    weights_gb = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")
    build_s = time.perf_counter() - start
    model, loss_of = _adapt(model, args.impl, args.rank, args.loss)
    model.train()
    summary = parameter_summary(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW8bit(trainable, lr=1e-4) if cuda else bnb.optim.AdamW8bit(trainable, lr=1e-4)
    # Its own generator: the two recipes draw different amounts from the global one (adapter inits).
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(device)

    def step() -> float:
        loss = loss_of(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    begin = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - begin
    tokens_per_s = args.batch * args.seq * args.steps / seconds
    n_params = summary.total - summary.trainable
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if cuda else host_peak_mb() / 1024
    result = {
        "impl": args.impl, "loss": args.loss if args.impl == "ours" else "plain", "shape": args.shape,
        "layers": config.num_hidden_layers, "base_params_b": n_params / 1e9, "quantized_linears": len(report.quantized),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__, "bitsandbytes": bnb.__version__,
        "build_s": build_s, "weights_gib": weights_gb, "peak_gib": peak_gb, "host_peak_mib": host_peak_mb(),
        "tokens_per_s": tokens_per_s, "s_per_step": seconds / args.steps, "mfu": 6 * n_params * tokens_per_s / (args.peak_tflops * 1e12),
        "last_loss": loss, "trainable": summary.trainable,
    }  # fmt: skip
    print(f"device: {result['device']}; torch {torch.__version__}; bitsandbytes {bnb.__version__}; impl {args.impl} (loss {result['loss']})")
    print(f"model: Llama {args.shape} shape, {config.num_hidden_layers} layers, {n_params / 1e9:.2f}B base params; {len(report.quantized)} linears in NF4+DQ")
    print(f"built in {build_s:.1f} s; quantized weights: {weights_gb:.2f} GiB; host peak RSS {host_peak_mb():.0f} MiB")
    print(f"LoRA r={args.rank} all-linear: {summary.trainable:,} trainable")
    print(f"seq {args.seq} x batch {args.batch}: peak memory {peak_gb:.2f} GiB (training steps)")
    print(f"{tokens_per_s:,.0f} tokens/s over {args.steps} steps ({seconds / args.steps:.3f} s/step); ~{result['mfu']:.1%} MFU; last loss {loss:.3f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's own)")
    parser.add_argument("--impl", choices=["both", "ours", "peft"], default="both")
    parser.add_argument("--loss", choices=["chunked", "plain"], default="chunked", help="ours only; peft always uses transformers' loss")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak for the MFU line (H100 SXM measured ~790)")
    parser.add_argument("--json", default=None, help="also write the result (one run) or results (both) to this file")
    args = parser.parse_args()
    if args.impl != "both":
        result = run_one(args)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(result, handle, indent=1)
        return
    results = {}
    for impl in ("ours", "peft"):
        out = f"{args.json or '/tmp/bench_qlora_gpu'}.{impl}.json"
        command = [sys.executable, __file__, "--impl", impl, "--json", out]
        for key in ("shape", "loss", "device", "seq", "batch", "rank", "warmup", "steps", "peak_tflops"):
            command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        if args.layers is not None:
            command += ["--layers", str(args.layers)]
        subprocess.run(command, check=True)  # its own process: a clean peak-memory count
        with open(out) as handle:
            results[impl] = json.load(handle)
    print("\n| impl | loss | peak memory (GiB) | tokens/s | MFU |\n|---|---|---:|---:|---:|")
    for impl, r in results.items():
        print(f"| {impl} | {r['loss']} | {r['peak_gib']:.2f} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    ours, peft = results["ours"], results["peft"]
    print(f"ours / peft: tokens/s ratio {ours['tokens_per_s'] / peft['tokens_per_s']:.2f}, peak memory ratio {ours['peak_gib'] / peft['peak_gib']:.2f}")


if __name__ == "__main__":
    main()

"""QLoRA training of a Llama-architecture model of 8B shape on one GPU: peak GPU memory and tokens/s.

    python benchmarks/bench_qlora_8b_gpu.py                      # Llama-3-8B shape, seq 2048, batch 1
    python benchmarks/bench_qlora_8b_gpu.py --layers 4 --steps 3 # a quick smoke run

The weights are random (no checkpoint is needed, or reachable offline) and are made directly on the
GPU one tensor at a time and quantized to NF4 as they are made, through the same streaming path that
loads checkpoints (:func:`lightning_peft.quantization.loading.load_streaming`): the 16 GB bf16 model
never exists, on the host or on the GPU. Then LoRA r=16 on every linear layer, norms in float32,
non-reentrant gradient checkpointing, and bitsandbytes' PagedAdamW8bit -- the QLoRA recipe.

Reported: the device, the GPU memory of the quantized weights, the peak GPU memory of a training step
(``torch.cuda.max_memory_allocated``), tokens/s over the timed steps (CUDA events, after warm-up), the
model FLOP utilisation implied by ~6N FLOPs per token (frozen-base forward 2N + input-gradient backward
2N + recompute 2N) against a given peak, and the host's peak resident memory.
Reference points (shared/notes/performance.md): memory floor ~7.6 GB; torchtune 7.4 GiB peak and
2,413 tok/s on an RTX 4090 (batch 2, packed, compiled).
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_peft import LoRA, Quantization, apply_peft, parameter_summary
from lightning_peft.quantization import prepare_model_for_kbit_training
from lightning_peft.quantization.loading import empty_model, load_streaming


def llama_8b_config(layers: int):
    from transformers import LlamaConfig

    # Llama-3-8B: 8.03B parameters with its 128K vocabulary.
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = the full 8B shape)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak for the MFU line (H100 SXM measured ~790)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)

    start = time.perf_counter()
    config = llama_8b_config(args.layers)
    model = empty_model(config, LlamaForCausalLM, torch.bfloat16)
    quantization = Quantization(bits=4, quant_type="nf4", double_quant=True, compute_dtype="bfloat16")
    report = load_streaming(model, random_weights(model, device), quantization, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    weights_gb = torch.cuda.memory_allocated() / 2**30
    build_s = time.perf_counter() - start
    prepare_model_for_kbit_training(model, gradient_checkpointing=True)  # norms fp32, non-reentrant
    apply_peft(model, LoRA(r=args.rank, alpha=2 * args.rank, target_modules="all-linear"))
    model.train()
    summary = parameter_summary(model)
    import bitsandbytes as bnb

    optimizer = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(args.steps):
        loss = step()
    end.record()
    torch.cuda.synchronize()
    seconds = begin.elapsed_time(end) / 1000
    tokens_per_s = args.batch * args.seq * args.steps / seconds
    n_params = summary.total - summary.trainable
    mfu = 6 * n_params * tokens_per_s / (args.peak_tflops * 1e12)

    print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; bitsandbytes {bnb.__version__}")
    print(f"model: Llama 8B shape, {args.layers} layers, {n_params / 1e9:.2f}B base params; {len(report.quantized)} linears in NF4+DQ")
    print(f"built in {build_s:.1f} s; quantized weights on GPU: {weights_gb:.2f} GiB; host peak RSS {host_peak_mb():.0f} MiB")
    print(f"LoRA r={args.rank} all-linear: {summary}")
    print(f"seq {args.seq} x batch {args.batch}: peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (training steps)")
    print(f"{tokens_per_s:,.0f} tokens/s over {args.steps} steps ({seconds / args.steps:.3f} s/step); ~{mfu:.1%} MFU at {args.peak_tflops:g} TFLOP/s; last loss {loss:.3f}")


if __name__ == "__main__":
    main()

"""QLoRA on a CPU: the exact 4-bit kernel against bitsandbytes' packed AVX512-BF16 one, on SmolLM2-135M.

    python benchmarks/bench_qlora_cpu_kernel.py                  # assets/smollm2-135m-instruct, 1 thread
    python benchmarks/bench_qlora_cpu_kernel.py --threads 2 --repeats 5

One model, NF4 + double quantization with QLoRA's bf16 compute, LoRA r=8 on q/v (random B, so the
adapters take part), Hamlet in 128-token chunks. In the same process, alternating kernels per repeat
(these machines are noisy: the figures are ratios to the exact kernel, medians of the repeats):

- **logit error**: max |logit - reference| over the batch, where the reference is the same layers with
  float32 compute (x @ dequantize(W).T, what QLoRA means). The exact kernel's error is bf16 rounding
  alone; the fast kernel adds bf16 scales and its own accumulation.
- **scoring**: one eval forward of a 4 x 128 batch (validation loss, perplexity);
- **generation**: 32 greedy tokens for one prompt (the decode steps are 1-token matmuls, the packed
  kernel's best case);
- **train step**: forward + backward in train mode (both kernels take the same exact path there: a
  check that "fast" costs training nothing).

Where the CPU has no AVX512-BF16, "fast" is the exact kernel (the script says so).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "assets" / "smollm2-135m-instruct"))
    parser.add_argument("--text", default=str(REPO / "assets" / "data" / "hamlet.txt"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_peft import LoRA, Quantization, apply_peft
    from lightning_peft.core.adapter_layer import adapter_layers
    from lightning_peft.core.kbit_cpu_kernel import cpu_has_packed_kernel, four_bit_layers, select_cpu_kernel
    from lightning_peft.quantization import quantize_model

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "unknown CPU")
    print(f"CPU: {cpu}; AVX512-BF16 packed kernel: {'yes' if cpu_has_packed_kernel() else 'no (fast = exact here)'}; threads {args.threads}")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    quantize_model(model, Quantization(bits=4, compute_dtype="bfloat16"))
    apply_peft(model, LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for _, layer in adapter_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    ids = tokenizer(Path(args.text).read_text()[:20000], return_tensors="pt").input_ids[0]
    batch = ids[: 4 * 128].view(4, 128)
    prompt = ids[:16].view(1, 16)
    layers = four_bit_layers(model)

    def scoring() -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return model(input_ids=batch).logits.float()

    def generation() -> None:
        model.eval()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=tokenizer.eos_token_id)

    def train_step() -> None:
        model.train()
        loss = model(input_ids=batch[:2], labels=batch[:2]).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    select_cpu_kernel(model, "exact")
    for layer in layers:
        layer.compute_dtype = torch.float32
    reference = scoring()
    for layer in layers:
        layer.compute_dtype = torch.bfloat16

    results = {kernel: {"error": 0.0, "scoring": [], "generation": [], "train step": []} for kernel in ("exact", "fast")}
    for _ in range(args.repeats):
        for kernel in ("exact", "fast"):
            select_cpu_kernel(model, kernel)
            scoring()  # warm-up: the fast kernel repacks on its first eval call
            logits = None

            def score(kernel=kernel) -> None:
                nonlocal logits
                logits = scoring()

            results[kernel]["scoring"].append(timed(score))
            results[kernel]["error"] = max(results[kernel]["error"], float((logits - reference).abs().max()))
            results[kernel]["generation"].append(timed(generation))
            results[kernel]["train step"].append(timed(train_step))
    scale = float(reference.abs().max())
    print(f"reference: float32 compute, max |logit| {scale:.2f}")
    print(f"| kernel | max logit error | scoring 4x128 | generation 32 tokens | train step 2x128 |")
    print(f"|---|---|---|---|---|")
    base = {what: statistics.median(results["exact"][what]) for what in ("scoring", "generation", "train step")}
    for kernel, figures in results.items():
        cells = []
        for what in ("scoring", "generation", "train step"):
            median = statistics.median(figures[what])
            cells.append(f"{median:.2f} s ({base[what] / median:.2f}x)")
        print(f"| {kernel} | {figures['error']:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

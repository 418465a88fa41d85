"""QLoRA storage and loading: bits per weight, SmolLM2's weight bytes, and peak host memory of loading.

    python benchmarks/bench_quantization.py                      # everything, on assets/smollm2-135m-instruct
    python benchmarks/bench_quantization.py --model DIR --skip-rss

1. Bits per weight of one 4096x4096 linear layer in each bitsandbytes format, counting the packed
   codes, the block scales, the double-quantization scales and the code books (QLoRA's figure for
   NF4 + double quantization: 4 + 8/64 + 32/(64*256) = 4.127).
2. SmolLM2-135M's total weight bytes in bf16 and after 4-bit quantization (embeddings, norms and the
   tied output head stay bf16).
3. Peak host memory (VmHWM) of three ways to get a 4-bit SmolLM2, each in its own subprocess so they
   cannot contaminate each other: lightning_peft's streaming loader, transformers'
   ``from_pretrained(quantization_config=BitsAndBytesConfig(...))``, and ``from_pretrained`` in bf16
   followed by in-place quantization. The interpreter with torch and transformers imported is
   reported too (it is in every figure).

A child run prints one JSON line; ``tests/test_quantized_loading.py`` uses the same children.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "assets" / "smollm2-135m-instruct"
LOADERS = ("ours", "transformers", "in_place")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(loader: str, model: str) -> dict:
    """Load ``model`` into 4 bits with ``loader``; report peak resident memory (kB) and time."""
    import torch
    import transformers  # noqa: F401 - imported before the baseline so that it is part of it
    from transformers import AutoModelForCausalLM

    from lightning_peft import Quantization
    from lightning_peft.quantization import load_quantized, model_weight_bytes, quantize_model

    torch.set_num_threads(1)
    quantization = Quantization(bits=4, quant_type="nf4", double_quant=True, compute_dtype="bfloat16")
    baseline = _status_kb("VmHWM")
    start = time.perf_counter()
    if loader == "ours":
        loaded = load_quantized(model, quantization, dtype=torch.bfloat16, device="cpu")
    elif loader == "transformers":
        loaded = AutoModelForCausalLM.from_pretrained(model, quantization_config=quantization.to_transformers(), dtype=torch.bfloat16, device_map="cpu")
    elif loader == "in_place":
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
        quantize_model(loaded, quantization)
    else:
        raise ValueError(f"unknown loader {loader!r}; choose one of {LOADERS}")
    seconds = time.perf_counter() - start
    return {
        "loader": loader,
        "peak_rss_mb": _status_kb("VmHWM") / 1024,
        "rss_after_imports_mb": baseline / 1024,
        "seconds": seconds,
        "weight_mb": model_weight_bytes(loaded) / 2**20,
    }


def run_child(loader: str, model: str | Path) -> dict:
    """Run :func:`child` in a fresh interpreter and return its report."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", loader, "--model", str(model)],
        check=True, capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def bits_table() -> list[tuple[str, float]]:
    import torch

    from lightning_peft import Quantization
    from lightning_peft.quantization import bits_per_parameter
    from lightning_peft.quantization.layers import quantized_linear

    torch.manual_seed(0)
    weight = torch.randn(4096, 4096) * 0.02
    formats = {
        "nf4 + double quant (QLoRA)": Quantization(),
        "nf4": Quantization(double_quant=False),
        "fp4 + double quant": Quantization(quant_type="fp4"),
        "int8 (LLM.int8)": Quantization(bits=8),
    }
    return [(name, bits_per_parameter(quantized_linear(weight, None, q, "cpu"))) for name, q in formats.items()]


def smollm2_bytes(model: Path) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from lightning_peft import Quantization
    from lightning_peft.quantization import load_quantized, model_weight_bytes

    before = model_weight_bytes(AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16))
    after = model_weight_bytes(load_quantized(model, Quantization(), dtype=torch.bfloat16))
    return before / 2**20, after / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="safetensors directory (default: the SmolLM2 asset)")
    parser.add_argument("--child", choices=LOADERS, help=argparse.SUPPRESS)
    parser.add_argument("--skip-rss", action="store_true", help="skip the three loading subprocesses")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model)), flush=True)
        return

    print("bits per weight, one 4096x4096 linear layer (codes + scales + scales of scales + code books):")
    for name, bits in bits_table():
        note = f"  ({100 * (bits / 4.127 - 1):+.2f}% vs the paper's 4.127)" if name.endswith("(QLoRA)") else ""
        print(f"  {name:28s} {bits:.4f}{note}")

    before, after = smollm2_bytes(Path(args.model))
    print(f"\nweight bytes of {Path(args.model).name}: bf16 {before:.1f} MiB -> 4-bit nf4+dq {after:.1f} MiB ({after / before:.1%})")

    if args.skip_rss:
        return
    print("\npeak host memory (VmHWM) loading into 4-bit, each loader in its own subprocess:")
    reports = [run_child(loader, args.model) for loader in LOADERS]
    for report in reports:
        print(
            f"  {report['loader']:13s} peak {report['peak_rss_mb']:7.1f} MiB (imports alone {report['rss_after_imports_mb']:.1f} MiB, "
            f"so {report['peak_rss_mb'] - report['rss_after_imports_mb']:6.1f} MiB for loading), {report['seconds']:5.1f} s, "
            f"weights {report['weight_mb']:.1f} MiB"
        )
    ours, theirs = reports[0], reports[1]
    print(f"  ours / transformers peak: {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()

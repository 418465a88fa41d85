"""Loading the real SmolLM2-135M (a bf16 safetensors directory) straight into 4 bits.

- Peak host memory of the streaming loader is no higher than transformers' own quantized loader
  (``from_pretrained(quantization_config=BitsAndBytesConfig(...))``) on the same model, each measured
  in its own subprocess (VmHWM) in the same test run.
- The streamed model's logits equal in-place quantization of the same weights, bit for bit, and those
  of transformers' quantized loader (the same bitsandbytes call on the same bf16 weights).
- The weight bytes shrink as the 4.127 bits per weight predict.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_peft import Quantization
from lightning_peft.quantization import load_quantized, model_weight_bytes, quantize_model, select_cpu_kernel

pytestmark = pytest.mark.assets

REPO = Path(__file__).resolve().parent.parent
QLORA = Quantization(bits=4, quant_type="nf4", double_quant=True, compute_dtype="bfloat16")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quantization", REPO / "benchmarks" / "bench_quantization.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smollm2(assets_dir: Path) -> Path:
    return assets_dir / "smollm2-135m-instruct"


def test_streaming_loader_peaks_no_higher_than_transformers(smollm2):
    bench = _bench()
    ours = bench.run_child("ours", smollm2)
    theirs = bench.run_child("transformers", smollm2)
    print(f"peak RSS: ours {ours['peak_rss_mb']:.0f} MiB, transformers {theirs['peak_rss_mb']:.0f} MiB")
    assert ours["peak_rss_mb"] <= theirs["peak_rss_mb"], (ours, theirs)
    # Both hold the same 4-bit model at the end.
    assert ours["weight_mb"] == pytest.approx(theirs["weight_mb"], rel=0.01)


def test_streamed_logits_equal_in_place_and_transformers_quantization(smollm2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ids = tokenizer("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    streamed = load_quantized(smollm2, QLORA, dtype=torch.bfloat16)
    with torch.no_grad():
        ours = streamed(input_ids=ids).logits
    del streamed
    in_place = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16)
    before = model_weight_bytes(in_place)
    quantize_model(in_place, QLORA)
    after = model_weight_bytes(in_place)
    with torch.no_grad():
        assert torch.equal(ours, in_place(input_ids=ids).logits)
    del in_place
    print(f"SmolLM2 weight bytes: bf16 {before / 2**20:.1f} MiB -> nf4+dq {after / 2**20:.1f} MiB")
    # 106.2M of the 134.5M weights are quantized linears (2 bytes -> 4.127 bits); the 28.3M-weight embedding
    # (tied to the head) and the norms stay bf16: (28.3 * 2 + 106.2 * 0.516) / (134.5 * 2) = 0.414.
    assert 0.40 < after / before < 0.43
    transformers_4bit = AutoModelForCausalLM.from_pretrained(
        smollm2, quantization_config=QLORA.to_transformers(), dtype=torch.bfloat16, device_map="cpu"
    )
    # transformers leaves bitsandbytes' packed CPU kernel on (bf16 scales: close, not equal); same codes, same kernel.
    select_cpu_kernel(transformers_4bit, "exact")
    with torch.no_grad():
        assert torch.equal(ours, transformers_4bit(input_ids=ids).logits)

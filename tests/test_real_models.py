"""The LoRA core on the real offline SmolLM2-135M: peft interoperability and checkpoint size.

Tiny random models prove the math; this file proves it on the checkpoint users actually load (tied
embeddings, GQA, a 49k vocabulary), where key naming and config fields have to be right for peft.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from lightning_peft import LoRA, apply_peft, load_adapter, save_adapter

pytestmark = [pytest.mark.assets, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2(assets_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(assets_dir / "smollm2-135m-instruct", dtype=torch.float32).eval()


def _randomize_adapters(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 49152, (2, 24), generator=generator)


def test_our_adapter_loads_in_peft_with_same_logits(smollm2, batch, tmp_path):
    from peft import PeftModel

    ours = copy.deepcopy(smollm2)
    apply_peft(ours, LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    _randomize_adapters(ours, seed=1)
    save_adapter(ours, tmp_path / "adapter")

    theirs = PeftModel.from_pretrained(copy.deepcopy(smollm2), tmp_path / "adapter").eval()
    with torch.no_grad():
        expected, got = ours(batch).logits, theirs(batch).logits
        base = smollm2(batch).logits
    assert (expected - base).abs().max() > 1e-2  # the adapters really change the output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_peft_adapter_loads_here_with_same_logits(smollm2, batch, tmp_path):
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(copy.deepcopy(smollm2), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    _randomize_adapters(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "peft_adapter")

    ours = load_adapter(copy.deepcopy(smollm2), tmp_path / "peft_adapter")
    with torch.no_grad():
        torch.testing.assert_close(ours(batch).logits, theirs(batch).logits, atol=1e-5, rtol=0)


def test_adapter_only_checkpoint_is_under_two_percent(smollm2):
    def size(state: dict) -> int:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.tell()

    model = copy.deepcopy(smollm2)
    apply_peft(model, LoRA(r=8, target_modules=["q_proj", "v_proj"]))
    adapter_state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # 30 layers x (r*(576+576) + r*(576+192)) = 460,800 float32 parameters
    assert sum(p.numel() for p in adapter_state.values()) == 30 * 8 * ((576 + 576) + (576 + 192))
    assert size(adapter_state) < 0.02 * size(smollm2.state_dict())

"""LLaMA-Adapter: identity at init, HF peft's adaption prompt as the oracle for the scalar gate (and the
paper's per-head tanh gate set to the same value), files both ways, cached generation, and the errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import AdaptionPromptConfig, PeftModel, get_peft_model
from torch import nn

from lightning_peft import LlamaAdapter, apply_peft, disable_adapters, load_adapter, merge_adapters, parameter_summary, save_adapter
from lightning_peft.core.adapter_layer import adapter_layers
from tiny_models import input_ids, llama_config, tiny_gpt2, tiny_llama

LEN = 3


def _tiny(model_type: str, seed: int = 0) -> nn.Module:
    """Tiny decoders of the supported families (grouped-query attention: 4 query heads, 2 key/value heads)."""
    if model_type == "llama":
        return tiny_llama(seed)
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    classes = {"mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    config_class, model_class = classes[model_type]
    torch.manual_seed(seed)
    return model_class(config_class(**llama_config().to_diff_dict())).float().eval()


def _logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = input_ids() if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _set(model: nn.Module, gate: float | torch.Tensor, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.adaption_prompt.copy_(torch.randn(layer.adaption_prompt.shape, generator=generator))
            layer.adaption_gate.copy_(torch.as_tensor(gate).expand_as(layer.adaption_gate))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_identity_at_init_and_the_prompt_acts_once_gated(model_type):
    model = _tiny(model_type)
    before = _logits(model)
    apply_peft(model, LlamaAdapter(adapter_len=LEN, adapter_layers=2))
    torch.testing.assert_close(_logits(model), before, atol=1e-6, rtol=0)
    _set(model, gate=0.5)
    assert (_logits(model) - before).abs().max() > 1e-3


def _peft_adapted(model: nn.Module, layers: int) -> nn.Module:
    """peft's adaption prompt on the same base, holding our prompt and (scalar) gate values."""
    theirs = get_peft_model(tiny_llama(0), AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=LEN, adapter_layers=layers)).eval()
    with torch.no_grad():
        for name, layer in adapter_layers(model):
            target = theirs.base_model.model.get_submodule(name)
            target.adaption_prompt.copy_(layer.adaption_prompt[None])
            target.adaption_gate.copy_(torch.tanh(layer.adaption_gate[:1]) if layer.gate == "per_head" else layer.adaption_gate)
    return theirs


@pytest.mark.parametrize("gate", ["scalar", "per_head"])
def test_matches_peft_when_every_head_has_peft_gate(gate):
    """peft's gate g multiplies the prompt's attention directly; the paper's per-head gate is tanh(a_h).
    With a_h = atanh(g) in every head the two are the same function."""
    model = tiny_llama(0)
    apply_peft(model, LlamaAdapter(adapter_len=LEN, adapter_layers=2, gate=gate))
    _set(model, gate=0.7 if gate == "scalar" else math.atanh(0.7))
    theirs = _peft_adapted(model, layers=2)
    torch.testing.assert_close(_logits(model), _logits(theirs), atol=1e-5, rtol=0)


def test_per_head_gates_differ_from_a_scalar_gate():
    model = tiny_llama(0)
    apply_peft(model, LlamaAdapter(adapter_len=LEN, adapter_layers=1))
    assert [layer.adaption_gate.shape for _, layer in adapter_layers(model)] == [(4,)]  # one per query head
    _set(model, gate=torch.tensor([2.0, -1.0, 0.0, 0.3]))
    with torch.no_grad():
        layer = next(layer for _, layer in adapter_layers(model))
        closed = _logits(model)
        layer.adaption_gate[2] = 1.0  # opening one more head changes the output
    assert not torch.allclose(_logits(model), closed)


def test_scalar_gate_file_is_peft_format_both_ways(tmp_path):
    model = tiny_llama(0)
    apply_peft(model, LlamaAdapter(adapter_len=LEN, adapter_layers=1, gate="scalar"))
    _set(model, gate=-0.4)
    save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["target_modules"], config["adapter_len"], config["adapter_layers"]) == ("ADAPTION_PROMPT", "self_attn", LEN, 1)
    loaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-5, rtol=0)
    loaded.save_pretrained(tmp_path / "peft")
    again = load_adapter(tiny_llama(0), tmp_path / "peft")
    torch.testing.assert_close(_logits(again), _logits(model), atol=1e-5, rtol=0)


def test_per_head_gate_file_is_ours_and_round_trips(tmp_path):
    model = tiny_llama(0)
    apply_peft(model, LlamaAdapter(adapter_len=LEN, adapter_layers=2))
    _set(model, gate=torch.tensor([0.3, -0.2, 0.9, 0.1]))
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["format"] == "lightning_peft"
    again = load_adapter(tiny_llama(0), tmp_path / "adapter")
    torch.testing.assert_close(_logits(again), _logits(model), atol=0, rtol=0)


def test_cached_generate_equals_full_recomputation():
    model = _tiny("qwen2")
    apply_peft(model, LlamaAdapter(adapter_len=LEN, adapter_layers=2))
    _set(model, gate=1.5, seed=2)
    ids = input_ids(2, 5, seed=4)
    generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, use_cache=True)
    sequence = ids
    for _ in range(6):
        with torch.no_grad():
            logits = model(input_ids=sequence, use_cache=False).logits
        sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, sequence)
    with disable_adapters(model):
        torch.testing.assert_close(_logits(model, ids), _logits(_tiny("qwen2"), ids), atol=0, rtol=0)
    assert not torch.allclose(_logits(model, ids), _logits(_tiny("qwen2"), ids), atol=1e-3)


def test_trainable_parameters_and_frozen_base():
    model = tiny_llama(0)
    apply_peft(model, LlamaAdapter(adapter_len=LEN, adapter_layers=2))
    assert parameter_summary(model).trainable == 2 * (LEN * 32 + 4)  # layers x (len x hidden + one gate per head)
    with pytest.raises(ValueError, match=r"cannot be merged into their base weights"):
        merge_adapters(model)


# -- bad input ------------------------------------------------------------------------------------
def test_architecture_without_the_projections_is_refused():
    with pytest.raises(ValueError, match=r"LlamaAdapter needs attention modules with q_proj, k_proj, v_proj, o_proj.*GPT2Attention \(c_attn, c_proj"):
        apply_peft(tiny_gpt2(0), LlamaAdapter(adapter_len=LEN, adapter_layers=1))


def test_bad_sizes_name_the_value():
    with pytest.raises(ValueError, match=r"adapter_len must be a positive integer \(e.g. 10\), got adapter_len=0"):
        LlamaAdapter(adapter_len=0)
    with pytest.raises(ValueError, match=r"unknown LlamaAdapter gate 'vector'"):
        LlamaAdapter(gate="vector")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"adapter_layers=3 but LlamaForCausalLM has 2 decoder layers; use at most 2"):
        apply_peft(tiny_llama(0), LlamaAdapter(adapter_layers=3))

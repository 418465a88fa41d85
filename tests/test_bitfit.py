"""BitFit: exactly the biases train (all, or a named subset), the update is the bias's own gradient,
merging gives a plain model with the trained biases, and the file holds only the changed biases."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft import BitFit, apply_peft, disable_adapters, load_adapter, merge_adapters, parameter_summary, save_adapter
from lightning_peft.core.adapter_layer import adapter_layers
from lightning_peft.core.fingerprint import BaseModelMismatchError
from lightning_peft.operations.merging import merged_state_dict
from tiny_models import input_ids, tiny_bert, tiny_gpt2, tiny_llama


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        output = model(input_ids=input_ids(), output_hidden_states=True)
    return torch.cat([output.logits.flatten(), output.hidden_states[-1].flatten()])


def _biased_layers(model: nn.Module, skip: tuple[str, ...] = ("classifier", "lm_head")) -> dict[str, int]:
    return {
        name: module.bias.numel()
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D, nn.LayerNorm)) and module.bias is not None and name.split(".")[-1] not in skip
    }


def _shift(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.bias_delta.copy_(0.3 * torch.randn(layer.bias_delta.shape, generator=generator))


@pytest.mark.parametrize("builder", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_every_bias_but_the_heads_trains_and_nothing_else(builder):
    model = builder()
    before = _out(model)
    targets = apply_peft(model, BitFit())
    expected = _biased_layers(builder())
    assert targets == list(expected)  # every Linear/Conv1D/LayerNorm with a bias, in model order
    assert parameter_summary(model).trainable == sum(expected.values())
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"bias_delta"}
    torch.testing.assert_close(_out(model), before, atol=1e-6, rtol=0)  # identity at init


def test_named_subset_of_biases():
    """The paper's subset: query biases and the feed-forward's first layer (BERT's intermediate.dense)."""
    model = tiny_bert()
    targets = apply_peft(model, BitFit(target_modules=["query", "intermediate.dense"], modules_to_save=["classifier"]))
    assert targets == [f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in ("attention.self.query", "intermediate.dense")]
    assert parameter_summary(model).trainable == 2 * (32 + 64) + (3 * 32 + 3)  # biases + the new classifier head


def test_the_update_is_the_gradient_of_the_bias():
    """d loss / d bias_delta equals d loss / d bias of the plain model: the same optimisation problem."""
    plain, adapted = tiny_bert(), tiny_bert()
    apply_peft(adapted, BitFit())
    labels = torch.tensor([0, 2])
    plain(input_ids=input_ids(), labels=labels).loss.backward()
    adapted(input_ids=input_ids(), labels=labels).loss.backward()
    grads = {name: layer.bias_delta.grad for name, layer in adapter_layers(adapted)}
    for name in grads:
        torch.testing.assert_close(grads[name], plain.get_submodule(name).bias.grad, atol=1e-7, rtol=1e-5, msg=name)


def test_merge_gives_a_plain_model_with_the_trained_biases():
    model = tiny_gpt2()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_peft(model, BitFit())
    _shift(model)
    deltas = {name: layer.bias_delta.detach().clone() for name, layer in adapter_layers(model)}
    unmerged = _out(model)
    with disable_adapters(model):
        torch.testing.assert_close(_out(model), _out(tiny_gpt2()), atol=1e-6, rtol=0)
    state = merged_state_dict(model)
    merge_adapters(model)
    torch.testing.assert_close(_out(model), unmerged, atol=1e-6, rtol=0)
    assert set(model.state_dict()) == set(tiny_gpt2().state_dict()) == set(state)
    for name, param in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        expected = original[name] + deltas[module] if name.endswith(".bias") and module in deltas else original[name]
        torch.testing.assert_close(param, expected, atol=1e-7, rtol=0, msg=name)
        torch.testing.assert_close(state[name], expected, atol=1e-7, rtol=0, msg=name)


def test_file_holds_only_the_changed_biases_and_reloads(tmp_path):
    model = tiny_bert()
    apply_peft(model, BitFit(target_modules=["query", "intermediate.dense"], modules_to_save=["classifier"]))
    _shift(model, seed=1)
    save_adapter(model, tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    layers = [name for name, _ in adapter_layers(model)]
    assert set(tensors) == {f"{n}.bias_delta" for n in layers} | {"classifier.weight", "classifier.bias"}
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["format"] == "lightning_peft"

    fresh = load_adapter(tiny_bert(), tmp_path / "adapter")
    torch.testing.assert_close(_out(fresh), _out(model), atol=0, rtol=0)
    with pytest.raises(BaseModelMismatchError):
        load_adapter(tiny_bert(seed=1), tmp_path / "adapter")


def test_bias_free_model_is_a_clear_error_and_biased_llama_works():
    with pytest.raises(ValueError, match=r"BitFit found no bias to train in LlamaForCausalLM.*bias-free.*IA3\(\) or LoRA\(\)"):
        apply_peft(tiny_llama(), BitFit())
    model = tiny_llama(attention_bias=True, mlp_bias=True)
    targets = apply_peft(model, BitFit())
    assert len(targets) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers


def test_named_layer_without_a_bias_is_refused():
    with pytest.raises(ValueError, match=r"BitFit cannot wrap .*q_proj.*layers that have a bias"):
        apply_peft(tiny_llama(), BitFit(target_modules=["q_proj"]))

"""Bottleneck adapters (Houlsby, Pfeiffer): placement found from the architecture on post-LN and pre-LN
blocks, identity at init, the closed-form parameter count, the own file format, and the errors."""

from __future__ import annotations

import re

import json

import pytest
import torch
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM

from lightning_peft import Adapter, apply_peft, load_adapter, merge_adapters, parameter_summary, save_adapter
from lightning_peft.core.adapter_layer import adapter_layers
from lightning_peft.core.blocks import BlockDiscoveryError
from lightning_peft.core.fingerprint import BaseModelMismatchError
from lightning_peft.operations.merging import merged_state_dict
from tiny_models import BUILDERS, input_ids, logits, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama

# The projections whose outputs go back into the residual stream, per block: (after attention, after FFN).
WRITERS = {
    "llama": ("model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"),
    "gpt2": ("transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj"),
    "bert": ("bert.encoder.layer.{i}.attention.output.dense", "bert.encoder.layer.{i}.output.dense"),
}
LAYERS, HIDDEN = 2, 32


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return logits(model)


@pytest.mark.parametrize("arch", sorted(WRITERS))
@pytest.mark.parametrize("style", ["houlsby", "pfeiffer"])
def test_placement_is_found_from_the_architecture(arch, style):
    model = BUILDERS[arch]()
    targets = apply_peft(model, Adapter(style=style))
    per_block = WRITERS[arch] if style == "houlsby" else WRITERS[arch][1:]
    assert targets == [pattern.format(i=i) for i in range(LAYERS) for pattern in per_block]


@pytest.mark.parametrize("arch", sorted(WRITERS))
def test_identity_at_init(arch):
    model = BUILDERS[arch]()
    before = _out(model)
    apply_peft(model, Adapter(style="houlsby", reduction_factor=4))
    torch.testing.assert_close(_out(model), before, atol=1e-6, rtol=0)
    for _, layer in adapter_layers(model):
        assert torch.count_nonzero(layer.adapter_down.weight) > 0  # the down projection carries signal
        assert torch.count_nonzero(layer.adapter_up.weight) == 0


def test_near_identity_init_is_houlsbys_truncated_normal():
    model = tiny_bert()
    before = _out(model)
    apply_peft(model, Adapter(init="near_identity", reduction_factor=1))
    weights = torch.cat([p.detach().flatten() for _, layer in adapter_layers(model) for p in (layer.adapter_down.weight, layer.adapter_up.weight)])
    assert weights.abs().max() <= 2e-2  # truncated at two standard deviations of 0.01
    assert 0.6e-2 < float(weights.std()) < 1e-2  # a N(0, 0.01^2) truncated at 2 sigma has std 0.0088
    change = (_out(model) - before).abs().max()
    assert 0 < change < 1e-2, change  # near, not exactly, the identity


@pytest.mark.parametrize("style, adapters_per_block", [("houlsby", 2), ("pfeiffer", 1)])
@pytest.mark.parametrize("reduction_factor", [4, 16])
def test_trainable_parameters_follow_the_closed_form(style, adapters_per_block, reduction_factor):
    model = tiny_llama()
    apply_peft(model, Adapter(style=style, reduction_factor=reduction_factor))
    d, m = HIDDEN, HIDDEN // reduction_factor
    assert parameter_summary(model).trainable == LAYERS * adapters_per_block * (2 * d * m + d + m)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_down." in name or ".adapter_up." in name for name in trainable)


def _cancel_sublayers(model: nn.Module) -> None:
    """Make every adapter output ``h - h = 0``: down = I, up = -I, no activation (reduction_factor 1)."""
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.adapter_act = nn.Identity()
            layer.adapter_down.weight.copy_(torch.eye(HIDDEN))
            layer.adapter_up.weight.copy_(-torch.eye(HIDDEN))


def _block_io(model: nn.Module, blocks: nn.ModuleList) -> list[tuple[torch.Tensor, torch.Tensor]]:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((hidden, output[0] if isinstance(output, tuple) else output))

    handles = [block.register_forward_hook(hook, with_kwargs=True) for block in blocks]
    _out(model)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pre_ln_adapter_sits_before_the_residual_add(arch):
    """Pre-LN: h = x + adapter(sublayer(LN(x))). An adapter that cancels its sub-layer leaves x + 0: every
    block becomes the identity, which holds only if the adapter acts before the skip connection."""
    model = BUILDERS[arch]()
    apply_peft(model, Adapter(style="houlsby", reduction_factor=1))
    _cancel_sublayers(model)
    blocks = model.model.layers if arch == "llama" else model.transformer.h
    for hidden_in, hidden_out in _block_io(model, blocks):
        torch.testing.assert_close(hidden_out, hidden_in, atol=1e-6, rtol=0)


def test_post_ln_adapter_sits_before_the_layer_norm():
    """Post-LN (BERT): h = LN(x + adapter(sublayer(x))). Cancelling both sub-layers leaves the two
    LayerNorms alone: LN_ffn(LN_attn(x)), so each adapter's output goes through its block's LayerNorm."""
    model = tiny_bert()
    apply_peft(model, Adapter(style="houlsby", reduction_factor=1))
    _cancel_sublayers(model)
    blocks = model.bert.encoder.layer
    for block, (hidden_in, hidden_out) in zip(blocks, _block_io(model, blocks)):
        expected = block.output.LayerNorm(block.attention.output.LayerNorm(hidden_in))
        torch.testing.assert_close(hidden_out, expected, atol=1e-6, rtol=0)


def test_only_the_adapters_train():
    model = tiny_gpt2()
    apply_peft(model, Adapter(reduction_factor=4))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(input_ids=input_ids(), labels=input_ids()).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    assert all(torch.count_nonzero(layer.adapter_up.weight) for _, layer in adapter_layers(model))


def test_adapters_cannot_be_merged_and_say_how_to_serve():
    model = tiny_llama()
    apply_peft(model, Adapter())
    with pytest.raises(ValueError, match=r"BottleneckAdapterLayer.*cannot be merged.*add modules.*load_adapter"):
        merge_adapters(model)
    with pytest.raises(ValueError, match=r"cannot be merged"):
        merged_state_dict(model)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_own_format_round_trip_into_a_fresh_model(arch, tmp_path):
    model = BUILDERS[arch]()
    method = Adapter(style="pfeiffer", reduction_factor=4, activation="gelu")
    apply_peft(model, method)
    randomize_adapters(model, seed=3)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["format"] == "lightning_peft" and config["method"] == method.to_dict()
    assert config["adapted_modules"] == [name for name, _ in adapter_layers(model)]

    fresh = BUILDERS[arch]()
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(_out(fresh), _out(model), atol=0, rtol=0)
    with pytest.raises(BaseModelMismatchError):
        load_adapter(BUILDERS[arch](seed=1), tmp_path / "adapter")


def test_other_block_layouts_use_the_same_rule():
    """A mixture-of-experts feed-forward has no single output projection: refused, with the way out."""
    torch.manual_seed(0)
    moe = MixtralForCausalLM(
        MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    )
    # transformers 5 calls the expert block ``mlp``, 4.x ``block_sparse_moe``: the error names whichever it is.
    experts = next(name for name, module in moe.named_modules() if name.endswith(("mlp", "block_sparse_moe")))
    with pytest.raises(BlockDiscoveryError, match=rf"{re.escape(experts)} holds .*mixture of experts.*target_modules=\["):
        apply_peft(moe, Adapter())
    apply_peft(moe, Adapter(target_modules=["o_proj"]))  # naming the modules works


# -- bad input ------------------------------------------------------------------------------------
class _NoBlocks(nn.Module):
    """Has a hidden size but its layers are plain attributes, not a list of blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("Config", (), {"hidden_size": 8})()
        self.first = nn.Linear(8, 8)
        self.second = nn.Linear(8, 8)


def test_architecture_without_blocks_is_a_clear_error():
    with pytest.raises(BlockDiscoveryError, match=r"found no transformer blocks in _NoBlocks.*hidden size \(8\).*target_modules=\["):
        apply_peft(_NoBlocks(), Adapter())
    model = _NoBlocks()
    assert apply_peft(model, Adapter(target_modules=["second"], reduction_factor=2)) == ["second"]


def test_zero_width_bottleneck_names_the_value_and_the_limit():
    with pytest.raises(ValueError, match=r"reduction_factor=64 leaves a zero-width bottleneck at 'model\.layers\.0\.self_attn\.o_proj' \(32 // 64 = 0\); use a reduction_factor of at most 32"):
        apply_peft(tiny_llama(), Adapter(reduction_factor=64))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(reduction_factor=0), r"reduction_factor must be a positive number.*reduction_factor=0"),
        (dict(reduction_factor=float("nan")), r"reduction_factor must be a positive number"),
        (dict(style="parallel"), r"unknown adapter style 'parallel'; choose one of 'houlsby', 'pfeiffer'"),
        (dict(activation="swish"), r"unknown activation 'swish'; choose one of 'relu', 'gelu', 'silu', 'tanh'"),
        (dict(init="zeros"), r"unknown Adapter init 'zeros'; choose one of 'identity', 'near_identity'"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Adapter(**kwargs)


def test_target_that_is_not_a_linear_layer_is_refused():
    with pytest.raises(ValueError, match=r"Adapter cannot wrap .* of type LlamaMLP"):
        apply_peft(tiny_llama(), Adapter(target_modules=["mlp"]))

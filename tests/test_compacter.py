"""Compacter: PHM weights are sums of Kronecker products with low-rank factors, the rule matrices are
shared by every layer, the parameter count is the paper's formula, identity at init, own-format round
trip, and the divisibility errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lightning_peft import Compacter, apply_peft, load_adapter, parameter_summary, save_adapter
from lightning_peft.core.adapter_layer import adapter_layers
from lightning_peft.methods.compacter import PHMLinear
from tiny_models import BUILDERS, input_ids, logits, randomize_adapters, tiny_bert, tiny_llama

LAYERS, HIDDEN = 2, 32


def _phm_layers(model: torch.nn.Module) -> list[PHMLinear]:
    return [m for m in model.modules() if isinstance(m, PHMLinear)]


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return logits(model)


@pytest.mark.parametrize("rank", [1, 2])
def test_phm_weight_is_a_sum_of_kronecker_products_of_low_rank_factors(rank):
    model = tiny_llama()
    apply_peft(model, Compacter(phm_dim=4, phm_rank=rank, reduction_factor=4))
    randomize_adapters(model, seed=1, std=1.0)
    for layer in _phm_layers(model):
        rules = layer.rules.matrices
        blocks = layer.left @ layer.right  # B_i = s_i t_i
        assert all(int(torch.linalg.matrix_rank(b)) <= rank for b in blocks)
        expected = sum(torch.kron(rules[i], blocks[i]) for i in range(4))
        torch.testing.assert_close(layer.weight(), expected, atol=1e-5, rtol=1e-5)
        x = torch.randn(3, layer.in_features)
        torch.testing.assert_close(layer(x), x @ expected.T + layer.bias, atol=1e-5, rtol=1e-5)


def test_rule_matrices_are_shared_by_every_layer_and_get_every_layers_gradient():
    model = tiny_llama()
    apply_peft(model, Compacter(phm_dim=4, reduction_factor=4))
    layers = _phm_layers(model)
    assert len(layers) == LAYERS * 2 * 2  # 2 adapters per block, 2 projections per adapter
    assert len({id(layer.rules.matrices) for layer in layers}) == 1
    names = [n for n, _ in model.named_parameters() if n.endswith("rules.matrices")]
    assert names == ["model.layers.0.self_attn.o_proj.adapter_down.rules.matrices"]  # listed once
    # The shared gradient is the sum of what each layer contributes.
    randomize_adapters(model, seed=2)
    model(input_ids=input_ids(), labels=input_ids()).loss.backward()
    assert layers[0].rules.matrices.grad is not None and torch.count_nonzero(layers[0].rules.matrices.grad) > 0


@pytest.mark.parametrize("style, adapters_per_block", [("houlsby", 2), ("pfeiffer", 1)])
@pytest.mark.parametrize("phm_dim, rank, reduction_factor", [(4, 1, 4), (2, 1, 2), (4, 3, 4)])
def test_trainable_parameters_follow_the_papers_formula(style, adapters_per_block, phm_dim, rank, reduction_factor):
    model = tiny_llama()
    apply_peft(model, Compacter(phm_dim=phm_dim, phm_rank=rank, reduction_factor=reduction_factor, style=style))
    n, d, m, L = phm_dim, HIDDEN, HIDDEN // reduction_factor, LAYERS
    weights = sum(p.numel() for n_, p in model.named_parameters() if p.requires_grad and not n_.endswith(".bias"))
    if rank == 1 and style == "houlsby":
        assert weights == n**3 + 4 * L * (d + m)  # Karimi Mahabadi et al., 2021, section 3
    assert weights == n**3 + adapters_per_block * L * 2 * rank * (d + m)
    biases = adapters_per_block * L * (d + m)
    assert parameter_summary(model).trainable == weights + biases


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_identity_at_init(arch):
    model = BUILDERS[arch]()
    before = _out(model)
    apply_peft(model, Compacter(phm_dim=4, reduction_factor=4))
    torch.testing.assert_close(_out(model), before, atol=1e-6, rtol=0)
    for _, layer in adapter_layers(model):
        assert torch.count_nonzero(layer.adapter_down.weight()) > 0  # the down projection carries signal
        assert torch.count_nonzero(layer.adapter_up.weight()) == 0


def test_compacter_plus_plus_is_pfeiffer_placement():
    model = tiny_bert()
    targets = apply_peft(model, Compacter(phm_dim=4, reduction_factor=4, style="pfeiffer"))
    assert targets == [f"bert.encoder.layer.{i}.output.dense" for i in range(LAYERS)]


def test_own_format_round_trip_keeps_the_rules_shared(tmp_path):
    model = tiny_bert()
    apply_peft(model, Compacter(phm_dim=4, phm_rank=2, reduction_factor=4))
    randomize_adapters(model, seed=4)
    save_adapter(model, tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert [k for k in tensors if k.endswith("rules.matrices")] == ["bert.encoder.layer.0.attention.output.dense.adapter_down.rules.matrices"]
    assert sum(t.numel() for t in tensors.values()) == parameter_summary(model).trainable

    fresh = tiny_bert()
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(_out(fresh), _out(model), atol=0, rtol=0)
    assert len({id(layer.rules.matrices) for layer in _phm_layers(fresh)}) == 1


def test_models_do_not_share_rules():
    first, second = tiny_llama(), tiny_llama()
    method = Compacter(phm_dim=4, reduction_factor=4)
    apply_peft(first, method)
    apply_peft(second, method)
    assert _phm_layers(first)[0].rules is not _phm_layers(second)[0].rules


# -- bad input ------------------------------------------------------------------------------------
def test_phm_dim_that_does_not_divide_the_hidden_size_names_both_and_the_divisors():
    with pytest.raises(ValueError, match=r"phm_dim=5 does not divide the hidden size 32 at 'model\.layers\.0\.self_attn\.o_proj'.*e\.g\. 2, 4, 8, 16"):
        apply_peft(tiny_llama(), Compacter(phm_dim=5, reduction_factor=4))


def test_phm_dim_larger_than_the_bottleneck_is_refused():
    with pytest.raises(ValueError, match=r"phm_dim=8 is larger than the bottleneck width 4 \(= 32 // reduction_factor=8\).*reduction_factor of at most 4 or a phm_dim of at most 4"):
        apply_peft(tiny_llama(), Compacter(phm_dim=8, reduction_factor=8))


def test_zero_width_bottleneck_is_refused():
    with pytest.raises(ValueError, match=r"reduction_factor=64 leaves a zero-width bottleneck"):
        apply_peft(tiny_llama(), Compacter(phm_dim=4, reduction_factor=64))


@pytest.mark.parametrize("kwargs, message", [(dict(phm_dim=0), r"phm_dim must be a positive integer, got phm_dim=0"), (dict(phm_rank=1.5), r"phm_rank must be a positive integer, got phm_rank=1\.5")])
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Compacter(**kwargs)


@pytest.mark.parametrize(
    "build, width, bottleneck",
    [
        # SmolLM2-135M's width (9 heads of 64): 576 // 32 = 18, not a multiple of phm_dim=4, rounds down to 16.
        (lambda: tiny_llama(hidden=576, num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3), 576, 16),
        # all-MiniLM-L6-v2's width: 384 // 32 = 12 already is one.
        (lambda: tiny_bert(hidden=384), 384, 12),
    ],
    ids=["smollm2_width", "minilm_width"],
)
def test_defaults_work_on_the_configs_model_widths(build, width, bottleneck, caplog):
    model = build()
    before = logits(model)
    with caplog.at_level("INFO"):
        apply_peft(model, Compacter())
    layers = _phm_layers(model)
    assert layers and {layer.out_features for layer in layers if layer.in_features == width} == {bottleneck}
    assert {layer.in_features for layer in layers if layer.out_features == width} == {bottleneck}
    # The default init leaves the model unchanged, whatever width was chosen.
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-6)
    rounded = [r.getMessage() for r in caplog.records if "rounded down" in r.getMessage()]
    assert rounded == (["lightning_peft: Compacter bottleneck 16 after the 576-wide layers (576 // reduction_factor=32 = 18, rounded down to a multiple of phm_dim=4)"] if width == 576 else [])

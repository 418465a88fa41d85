"""The 4-bit CPU kernels (lightning_peft/core/kbit_cpu_kernel.py) against a float64 reference computed
from the stored codes (tests/nf4_reference.py), on both kinds of CPU.

On CPUs without AVX512-BF16 the "fast" tests that need bitsandbytes' packed kernel skip; the exact ones
run everywhere, and on AVX512 CPUs they are the ones that catch bitsandbytes' misaligned dequantize.
"""

from __future__ import annotations

import logging

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from torch import nn

from lightning_peft import LoRA, Quantization, apply_peft
from lightning_peft.core.kbit_cpu_kernel import (
    cpu_has_packed_kernel,
    dequantize_4bit_exact,
    exact_linear4bit_class,
    is_packed,
    packed_kernel_fits,
    select_cpu_kernel,
)
from lightning_peft.quantization.layers import quantized_linear

from nf4_reference import reference_dequantize



@pytest.fixture()
def packed_kernel(monkeypatch):
    """bitsandbytes' packed path, forced on where the CPU lacks AVX512-BF16 (the repacking is plain torch);
    the tests skip only where the kernel itself then cannot run, or runs but computes something else."""
    if not cpu_has_packed_kernel():
        monkeypatch.setattr("lightning_peft.core.kbit_cpu_kernel.cpu_has_packed_kernel", lambda: True)
        probe = layer_of((64, 128), cpu_kernel="fast").eval()
        x = torch.randn(2, 128)
        exact = x.double() @ reference_dequantize(probe).T
        try:
            with torch.no_grad():
                out = probe(x)
        except Exception as err:  # noqa: BLE001 - whatever bitsandbytes raises without its kernel
            pytest.skip(f"bitsandbytes' packed kernel cannot run on this CPU (no AVX512-BF16): {type(err).__name__}: {err}")
        if not is_packed(probe) or float((out.double() - exact).norm() / exact.norm()) > 0.05:
            pytest.skip("bitsandbytes' packed kernel does not compute the product on this CPU (no AVX512-BF16)")
    return "fast"


# (out, in): rows narrower than a block, rows not a multiple of it, aligned ones, and sizes not a multiple of 64.
SHAPES = [(64, 48), (96, 96), (32, 32), (64, 16), (128, 64), (64, 192), (10, 6), (7, 100)]


def layer_of(shape, cpu_kernel="exact", double_quant=True, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return quantized_linear(torch.randn(shape), None, Quantization(compute_dtype="float32", double_quant=double_quant, cpu_kernel=cpu_kernel), "cpu")


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_exact_dequantize_equals_the_float64_definition(shape, double_quant):
    layer = layer_of(shape, double_quant=double_quant)
    expected = reference_dequantize(layer)
    got = dequantize_4bit_exact(layer.weight.data, layer.weight.quant_state)
    assert got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)
    torch.manual_seed(0)
    original = torch.randn(shape).double()  # what layer_of quantized
    # NF4 of a Gaussian is about 9% off (the reference is sane); bitsandbytes' AVX512 dequantize gave ~20% on misaligned rows.
    assert float((got.double() - original).norm() / original.norm()) < 0.12


@pytest.mark.parametrize("shape", SHAPES)
def test_exact_forward_and_input_gradient_equal_the_float64_product(shape):
    layer = layer_of(shape)
    assert type(layer) is exact_linear4bit_class()
    weight = reference_dequantize(layer)
    for train in (True, False):
        layer.train(train)
        x = torch.randn(3, 5, shape[1], requires_grad=True)
        out = layer(x)
        torch.testing.assert_close(out.double(), x.double() @ weight.T, rtol=1e-5, atol=1e-5)
        out.square().sum().backward()
        expected = (2 * (x.double() @ weight.T)) @ weight
        assert float((x.grad.double() - expected).norm() / expected.norm()) < 1e-6  # float32 sums of up to 192 terms
    with torch.no_grad():  # the call bitsandbytes would take its packed path for
        x = torch.randn(2, shape[1])
        torch.testing.assert_close(layer(x).double(), x.double() @ weight.T, rtol=1e-5, atol=1e-5)
    assert not is_packed(layer)


def test_exact_kernel_keeps_the_codes_and_the_state_dict_bitwise():
    layer = layer_of((64, 128)).eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        layer(torch.randn(4, 128))
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_apply_peft_gives_layers_quantized_elsewhere_the_exact_kernel():
    torch.manual_seed(0)
    foreign = bnb.nn.Linear4bit(32, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    foreign.weight = bnb.nn.Params4bit(torch.randn(64, 32), requires_grad=False, quant_type="nf4", module=foreign).to("cpu")
    model = nn.Sequential(foreign)
    apply_peft(model, LoRA(r=2, target_modules=["0"]))
    base = model[0].base_layer
    assert type(base) is exact_linear4bit_class() and base.support_avx512bf16_for_cpu is False
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(x).double(), x.double() @ reference_dequantize(base).T, rtol=1e-5, atol=1e-5)


def test_unknown_kernel_names_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"cpu_kernel='avx'.*'exact'.*'fast'"):
        Quantization(cpu_kernel="avx")
    with pytest.raises(ValueError, match=r"cpu_kernel='avx'"):
        select_cpu_kernel(nn.Sequential(layer_of((64, 64))), "avx")


def test_fast_kernel_is_close_and_puts_the_original_codes_back_bitwise(packed_kernel):
    layer = layer_of((64, 128), cpu_kernel="fast")
    assert type(layer) is bnb.nn.Linear4bit and packed_kernel_fits(layer)
    codes = layer.weight.data.clone()
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    weight = reference_dequantize(layer)
    x = torch.randn(4, 128)
    layer.eval()
    with torch.no_grad():
        fast = layer(x)
    assert is_packed(layer)  # bitsandbytes' kernel ran
    exact = x.double() @ weight.T
    error = float((fast.double() - exact).norm() / exact.norm())
    assert 0 < error < 2e-2  # bf16 scales and accumulation: close, not equal
    assert all(torch.equal(saved[k], v) for k, v in layer.state_dict().items())  # saving restores the originals
    assert not is_packed(layer) and torch.equal(layer.weight.data, codes)
    with torch.no_grad():
        layer(x)
    layer.train()
    x = torch.randn(4, 128, requires_grad=True)
    out = layer(x)  # a train-mode call on packed codes would have no autograd: the originals are back first
    assert not is_packed(layer) and torch.equal(layer.weight.data, codes)
    assert torch.equal(reference_dequantize(layer), weight)  # scales too: not bitsandbytes' bf16-rounded inverse
    out.sum().backward()
    torch.testing.assert_close(x.grad.double(), weight.sum(0).expand(4, -1), rtol=1e-5, atol=1e-5)


def test_fast_kernel_leaves_shapes_it_cannot_pack_on_the_exact_kernel(packed_kernel, caplog):
    with caplog.at_level(logging.INFO, logger="lightning_peft.core.kbit_cpu_kernel"):
        layer = layer_of((64, 48), cpu_kernel="fast")
    assert type(layer) is exact_linear4bit_class() and not packed_kernel_fits(layer)
    assert "cannot take" in caplog.text
    with torch.no_grad():
        x = torch.randn(2, 48)
        torch.testing.assert_close(layer.eval()(x).double(), x.double() @ reference_dequantize(layer).T, rtol=1e-5, atol=1e-5)


def test_a_layer_packed_before_we_saw_it_is_unpacked_with_a_warning(packed_kernel, caplog):
    layer = layer_of((64, 128), cpu_kernel="fast").eval()
    object.__setattr__(layer, "_lightning_peft_unpacked", None)  # as if bitsandbytes had packed it on its own
    layer.weight.data, layer.weight.quant_state = bnbF._convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    with caplog.at_level(logging.WARNING, logger="lightning_peft.core.kbit_cpu_kernel"):
        select_cpu_kernel(layer, "exact")
    assert not is_packed(layer) and "rounded to bfloat16" in caplog.text
    assert type(layer) is exact_linear4bit_class()


def test_after_the_fast_kernel_ran_merge_export_fingerprint_and_state_dict_read_the_original_codes(packed_kernel, tmp_path):
    from lightning_peft import load_adapter, merge_adapters, save_adapter
    from lightning_peft.core.fingerprint import base_fingerprint
    from lightning_peft.quantization import quantize_model
    from lightning_peft.quantization.layers import dequantized_weight

    from tiny_models import input_ids, randomize_adapters, tiny_llama

    def build(kernel):
        model = tiny_llama(0, hidden=64)
        quantize_model(model, Quantization(compute_dtype="float32", cpu_kernel=kernel))
        apply_peft(model, LoRA(r=2, target_modules=["q_proj", "o_proj"]))
        randomize_adapters(model, seed=3)
        return model

    fast, exact = build("fast"), build("exact")
    before = {k: v.clone() for k, v in fast.state_dict().items()}
    weights = {n: dequantized_weight(m) for n, m in fast.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    fingerprint = base_fingerprint(fast)
    fast.eval()
    with torch.no_grad():
        fast(input_ids=input_ids())
    assert any(is_packed(m) for m in fast.modules() if isinstance(m, bnb.nn.Linear4bit))  # the packed kernel ran
    assert base_fingerprint(fast) == fingerprint
    after = fast.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        fast(input_ids=input_ids())  # packed again
    for name, module in fast.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            assert torch.equal(dequantized_weight(module), weights[name]), name
    save_adapter(fast, tmp_path / "adapter")
    reloaded = load_adapter(build("exact"), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=input_ids()).logits, exact.eval()(input_ids=input_ids()).logits, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="requantizing"):
        merge_adapters(fast, requantize=True)  # reads the original codes, not bitsandbytes' bf16-rounded ones

"""DoRA numerics: parity with HF peft (forward, gradients of A, B and the magnitude, merged weights) on
Linear, Conv1D and Embedding; exact merge/unmerge; the costs we avoid (second base product, norm
recomputation); DoRA on a 4-bit base against the dequantized reference; the peft file round trip."""

from __future__ import annotations

import copy
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_peft import DoRA, LoRA, Quantization, apply_peft, load_adapter, merge_adapters, save_adapter, unmerge_adapters
from lightning_peft.core.adapter_layer import adapter_layers
from lightning_peft.operations.merging import merged_state_dict
from lightning_peft.methods.dora import DoRALayer
from lightning_peft.quantization import quantize_model
from nf4_reference import reference_dequantize
from tiny_models import LLAMA_ALL, input_ids, logits, peft_adapter_params, tiny_gpt2, tiny_llama


CASES = {
    "llama-linear": (tiny_llama, dict(r=4, alpha=8, target_modules=LLAMA_ALL)),
    "llama-embedding": (tiny_llama, dict(r=4, alpha=8, target_modules=["embed_tokens", "v_proj"])),
    "gpt2-conv1d": (tiny_gpt2, dict(r=4, alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])),
    "rslora-gaussian": (tiny_llama, dict(r=8, alpha=4, rslora=True, init="gaussian", target_modules=["k_proj", "up_proj"])),
    "dropout": (tiny_llama, dict(r=4, alpha=8, dropout=0.3, target_modules=LLAMA_ALL)),
}


def randomize(model: nn.Module, seed: int = 100) -> None:
    """Random A and B, and a magnitude moved off ||W|| (else m/n = 1 hides the rescaling)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) * 0.1)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
            m = layer.lora_magnitude_vector
            m.mul_(1 + 0.3 * torch.rand(m.shape, generator=generator).to(m.device))


def dora_pair(case: str) -> tuple[nn.Module, nn.Module]:
    builder, kwargs = CASES[case]
    ours = builder(0)
    apply_peft(ours, DoRA(**kwargs))
    randomize(ours)
    config = LoraConfig(
        r=kwargs["r"], lora_alpha=kwargs["alpha"], lora_dropout=kwargs.get("dropout", 0.0), target_modules=kwargs["target_modules"],
        use_rslora=kwargs.get("rslora", False), use_dora=True, fan_in_fan_out=builder is tiny_gpt2,
    )  # fmt: skip
    theirs = get_peft_model(builder(0), config)
    with torch.no_grad():
        for name, layer in adapter_layers(ours):
            a, b = peft_adapter_params(theirs, name)
            a.copy_(layer.lora_A)
            b.copy_(layer.lora_B)
            peft_magnitude(theirs, name).copy_(layer.lora_magnitude_vector)
    return ours, theirs


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest magnitude (float32 rounding of gradients of
    size ~5 is ~5e-7 in absolute terms, so an absolute 1e-6 would test the rounding)."""
    scale = reference.abs().max().clamp_min(1.0)
    return float((actual.double() - reference.double()).abs().max() / scale)


def assert_within(actual: torch.Tensor, reference: torch.Tensor, tol: float = 1e-6, msg: str = "") -> None:
    error = relative_error(actual, reference)
    assert error <= tol, f"{msg}: relative error {error:.2e} > {tol:g}"


def peft_magnitude(peft_model: nn.Module, name: str) -> torch.Tensor:
    return peft_model.base_model.model.get_submodule(name).lora_magnitude_vector["default"].weight


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_peft(case, train):
    """Ours in float32 against peft's math in float64, within 1e-6 relative or, where float32 rounding alone
    is larger than that, within 1.25x of peft's own float32 run's distance from the same float64 answer.

    Comparing two float32 roundings would test the rounding; a fixed 1e-6 does too on some CPUs: on one with
    AVX512-BF16, peft's float32 run is 1.04e-6 off the float64 answer on a GPT-2 Conv1D B gradient, ours 1.03e-6.
    """
    ours, theirs32 = dora_pair(case)
    theirs = copy.deepcopy(theirs32).double()
    models = (ours, theirs, theirs32)
    ids = input_ids()
    outs = []
    for model in models:
        model.train(train)
        torch.manual_seed(1234)  # the same dropout masks in all three
        outs.append(model(input_ids=ids).logits)

    def check(actual: torch.Tensor, reference: torch.Tensor, peft32: torch.Tensor, msg: str) -> None:
        assert_within(actual, reference, tol=max(1e-6, 1.25 * relative_error(peft32, reference)), msg=msg)

    check(outs[0], outs[1], outs[2], msg="logits")
    with torch.no_grad():
        base = logits(CASES[case][0](0), ids)
    assert (outs[0] - base).abs().max() > 1e-2  # the adapters really change the output

    weights = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(7))
    for out in outs:
        (out * weights.to(out.dtype)).sum().backward()
    for name, layer in adapter_layers(ours):
        ref_a, ref_b = peft_adapter_params(theirs, name)
        peft_a, peft_b = peft_adapter_params(theirs32, name)
        ref_m, peft_m = peft_magnitude(theirs, name), peft_magnitude(theirs32, name)
        assert layer.lora_magnitude_vector.grad.abs().sum() > 0, name
        check(layer.lora_A.grad, ref_a.grad, peft_a.grad, msg=f"A grad of {name}")
        check(layer.lora_B.grad, ref_b.grad, peft_b.grad, msg=f"B grad of {name}")
        check(layer.lora_magnitude_vector.grad, ref_m.grad, peft_m.grad, msg=f"m grad of {name}")


@pytest.mark.parametrize("case", ["llama-linear", "llama-embedding", "gpt2-conv1d"])
def test_merged_weights_match_peft_and_unmerge_is_exact(case):
    ours, theirs = dora_pair(case)
    original = {k: v.clone() for k, v in CASES[case][0](0).state_dict().items()}
    ours_merged = merged_state_dict(ours)
    theirs_merged = theirs.merge_and_unload().state_dict()
    for key, value in theirs_merged.items():
        assert_within(ours_merged[key], value, msg=key)
    changed = [k for k in original if not torch.equal(original[k], ours_merged[k])]
    assert changed  # DoRA moved the adapted weights

    before = logits(ours)
    merge_adapters(ours, unload=False)
    torch.testing.assert_close(logits(ours), before, rtol=0, atol=1e-5)
    unmerge_adapters(ours)
    for name, layer in adapter_layers(ours):
        torch.testing.assert_close(layer.base_layer.weight, original[f"{name}.weight"], rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(logits(ours), before, rtol=0, atol=1e-6)


def test_magnitude_starts_at_the_row_norm_and_step_zero_is_the_base():
    model = tiny_gpt2(0)
    apply_peft(model, DoRA(r=4, target_modules=["c_attn", "wte"]))
    for name, layer in adapter_layers(model):
        weight = layer.base_layer.weight.detach().double()
        linear = weight.T  # Conv1D stores (in, out); Embedding (num, dim): norms per output unit / dimension
        torch.testing.assert_close(layer.lora_magnitude_vector.double(), linear.norm(dim=1), rtol=1e-6, atol=0, msg=name)
    torch.testing.assert_close(logits(model), logits(tiny_gpt2(0)), rtol=1e-6, atol=1e-6)


class _CountLinear(TorchFunctionMode):
    """Counts F.linear calls whose weight has the given shape (the base weight's)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.calls = torch.Size(shape), 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear and args[1].shape == self.shape:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dropout,expected", [(0.0, 1), (0.2, 2)])
def test_second_base_product_only_with_dropout(dropout, expected):
    layer = DoRALayer(nn.Linear(24, 40), DoRA(r=4, dropout=dropout))
    layer.train()
    with _CountLinear((40, 24)) as counter:
        layer(torch.randn(3, 24)).sum().backward()
    assert counter.calls == expected


def test_norm_is_cached_until_a_factor_changes():
    layer = DoRALayer(nn.Linear(24, 40), DoRA(r=4))
    nn.init.normal_(layer.lora_B)
    layer.eval()
    first = layer.weight_norm()
    assert layer.weight_norm() is first  # no recomputation in eval
    optimizer = torch.optim.SGD([layer.lora_B], lr=0.1)
    layer.train()
    layer(torch.randn(3, 24)).sum().backward()
    optimizer.step()
    second = layer.weight_norm()
    assert second is not first and not torch.equal(second, first)
    exact = torch.linalg.norm(layer.base_layer.weight + layer.scaling * layer.lora_B @ layer.lora_A, dim=1)
    torch.testing.assert_close(second, exact.detach(), rtol=1e-6, atol=0)
    with torch.no_grad():
        layer.base_layer.weight.mul_(2)  # a base changed in place is noticed too
    torch.testing.assert_close(layer.weight_norm(), torch.linalg.norm(layer.base_layer.weight + layer.scaling * layer.lora_B @ layer.lora_A, dim=1).detach())


def test_norm_is_detached_as_in_the_paper():
    layer = DoRALayer(nn.Linear(16, 12), DoRA(r=4))
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 16)
    layer(x).sum().backward()
    # Reference with an explicitly constant norm: y = (m/n)(W x + s B A x) + b, n a constant.
    A, B = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    W, b, m = layer.base_layer.weight.detach(), layer.base_layer.bias.detach(), layer.lora_magnitude_vector.detach()
    n = torch.linalg.norm(W + layer.scaling * B.detach() @ A.detach(), dim=1)
    ((m / n) * (x @ W.T + layer.scaling * (x @ A.T) @ B.T) + b).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, A.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, rtol=1e-5, atol=1e-6)


def quantized_dora_and_twin(compute_dtype: str = "float32", device: str = "cpu") -> tuple[nn.Module, nn.Module]:
    """A tiny Llama with DoRA on an NF4 base, and its reference: the same DoRA tensors on plain layers
    holding ``dequantize_4bit`` of each 4-bit weight."""
    quantized = tiny_llama(0).to(device)
    quantize_model(quantized, Quantization(compute_dtype=compute_dtype), device=device)
    apply_peft(quantized, DoRA(r=4, alpha=8, target_modules="all-linear"))
    randomize(quantized)
    twin = tiny_llama(0)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if getattr(getattr(module, "weight", None), "quant_state", None) is not None:
                weight = reference_dequantize(module)
                twin.get_submodule(name.removesuffix(".base_layer")).weight.copy_(weight)
    twin = twin.to(device)
    apply_peft(twin, DoRA(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        layers = dict(adapter_layers(quantized))
        for name, layer in adapter_layers(twin):
            for attr in ("lora_A", "lora_B", "lora_magnitude_vector"):
                getattr(layer, attr).copy_(getattr(layers[name], attr))
    return quantized, twin


def test_dora_on_a_4bit_base_equals_dora_on_the_dequantized_weights():
    quantized, twin = quantized_dora_and_twin()
    ids = input_ids()
    out, ref = quantized(input_ids=ids, labels=ids), twin(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    trainable = [n for n, p in quantized.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ref_params = dict(twin.named_parameters())
    for name in trainable:
        torch.testing.assert_close(dict(quantized.named_parameters())[name].grad, ref_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_peft_file_round_trip(tmp_path):
    ours, _ = dora_pair("llama-linear")
    save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "adapter")
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=0, atol=1e-5)
    reloaded = load_adapter(tiny_llama(0), tmp_path / "adapter")
    assert all(isinstance(layer, DoRALayer) for _, layer in adapter_layers(reloaded))
    torch.testing.assert_close(logits(reloaded), logits(ours), rtol=0, atol=1e-6)


def test_bad_dora_input_is_named():
    with pytest.raises(ValueError, match=r"unknown DoRA init 'pissa'; choose one of 'kaiming', 'gaussian'"):
        DoRA(init="pissa")
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"Conv2d"):
        apply_peft(model, DoRA(target_modules=["0"]))
    assert isinstance(LoRA(), LoRA) and not isinstance(LoRA(), DoRA)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compute_dtype,tolerance", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_gpu_qdora_equals_dora_on_the_dequantized_weights(compute_dtype, tolerance):
    quantized, twin = quantized_dora_and_twin(compute_dtype, device="cuda")
    ids = input_ids().cuda()
    out, ref = quantized(input_ids=ids, labels=ids), twin(input_ids=ids, labels=ids)
    assert float((out.logits.float() - ref.logits.float()).norm() / ref.logits.float().norm()) < tolerance
    out.loss.backward()
    ref.loss.backward()
    ref_params = dict(twin.named_parameters())
    for name, param in quantized.named_parameters():
        if param.requires_grad:
            expected = ref_params[name].grad
            assert float((param.grad - expected).norm() / expected.norm()) < max(tolerance, 1e-4), name


def test_validation_under_inference_mode_then_training():
    # Lightning validates under torch.inference_mode; a norm cached there must not reach autograd.
    layer = DoRALayer(nn.Linear(24, 40), DoRA(r=4))
    nn.init.normal_(layer.lora_B)
    layer.eval()
    with torch.inference_mode():
        layer(torch.randn(3, 24))
    layer.train()
    layer(torch.randn(3, 24)).sum().backward()
    assert layer.lora_magnitude_vector.grad.abs().sum() > 0 and layer.lora_A.grad.abs().sum() > 0


def test_norm_graph_is_dropped_by_copies_and_unused_on_cpu():
    layer = DoRALayer(nn.Linear(24, 40), DoRA(r=4))
    nn.init.normal_(layer.lora_B)
    copied = copy.deepcopy(layer)
    assert copied._norm_graph is not layer._norm_graph and copied._norm_graph._graph is None
    direct = torch.linalg.norm(layer.base_layer.weight + layer.scaling * layer.lora_B @ layer.lora_A, dim=1)
    torch.testing.assert_close(copied.weight_norm(), direct.detach(), rtol=1e-6, atol=0)
    assert copied._norm_graph.captures == 0  # CPU: computed eagerly


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_graphed_norm_trains_exactly_like_the_eager_norm(dtype):
    """The CUDA-graph replay of the norm must follow every optimizer step (its inputs are updated in
    place) and give bit-identical training to the same model with graphs disabled."""
    graphed = tiny_llama(0).to("cuda", dtype)
    apply_peft(graphed, DoRA(r=4, target_modules=LLAMA_ALL))
    randomize(graphed)
    eager = copy.deepcopy(graphed)
    for _, layer in adapter_layers(eager):
        layer._norm_graph.enabled = False
    ids = input_ids().cuda()
    losses = {}
    for name, model in (("graphed", graphed), ("eager", eager)):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[name] = []
        for _ in range(4):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    assert losses["graphed"] == losses["eager"]
    assert losses["graphed"][-1] < losses["graphed"][0]  # the steps really moved A, B and m
    for (name, layer), (_, twin) in zip(adapter_layers(graphed), adapter_layers(eager)):
        assert layer._norm_graph.captures == 1, name  # captured once, then replayed after every step
        direct = torch.linalg.norm(layer.linear_weight() + layer.scaling * layer.lora_B @ layer.lora_A, dim=1)
        torch.testing.assert_close(layer.weight_norm(), direct.detach(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=0)
        assert torch.equal(layer.weight_norm(), twin.weight_norm()), name

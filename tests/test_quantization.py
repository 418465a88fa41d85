"""QLoRA: k-bit bases through bitsandbytes, LoRA on them, streaming loading, k-bit training prep,
merge/export from the original weights, optimizers and the errors for bad input.

Every numeric check compares against a reference computed independently: LoRA on the weights that
``bitsandbytes.functional.dequantize_4bit`` returns, HF peft on the same quantized layers, a model
loaded by transformers and quantized in place, or the original weights read back from disk. Tiny
random-init models keep the whole file well under two minutes on 2 loaded cores.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from lightning_peft import LoRA, PEFTCallback, Quantization, apply_peft, merge_adapters, parameter_summary
from lightning_peft.core.adapter_layer import adapter_layers
from lightning_peft.formats.from_source import QuantizedExportError
from lightning_peft.formats.merged import save_merged
from lightning_peft.operations.merging import merged_state_dict
from lightning_peft.quantization import (
    QuantizationBackendError,
    bits_per_parameter,
    check_backend,
    load_quantized,
    prepare_model_for_kbit_training,
    quantize_model,
)
from lightning_peft.quantization.backend import _probe
from lightning_peft.quantization.merge import QuantizedMergeError
from lightning_peft.integration.strategies import check_trainer_compatibility
from lightning_peft.quantization.record import quantization_record
from lightning_helpers import LitCausalLM, LitPEFTCausalLM, make_trainer, token_loader
from nf4_reference import reference_dequantize, reference_from_codes
from tiny_models import copy_adapters_to_peft, input_ids, randomize_adapters, tiny_gpt2, tiny_llama

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
F32 = Quantization(compute_dtype="float32")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def qlora_model(seed: int = 0, quantization: Quantization = F32, r: int = 4, targets=None) -> nn.Module:
    model = tiny_llama(seed)
    quantize_model(model, quantization)
    apply_peft(model, LoRA(r=r, alpha=2 * r, target_modules=targets or "all-linear"))
    randomize_adapters(model, seed=seed + 100, std=0.05)
    return model


def dequantized_twin(model: nn.Module, seed: int = 0, r: int = 4, targets=None) -> nn.Module:
    """The same tiny Llama with every 4-bit weight replaced by ``dequantize_4bit`` of it, in plain
    ``nn.Linear`` layers, with LoRA and the same adapter values: the reference QLoRA must equal."""
    twin = tiny_llama(seed)
    layers = dict(adapter_layers(model))
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                plain = twin.get_submodule(name.removesuffix(".base_layer"))
                plain.weight.copy_(reference_dequantize(module))
    apply_peft(twin, LoRA(r=r, alpha=2 * r, target_modules=targets or "all-linear"))
    with torch.no_grad():
        for name, layer in adapter_layers(twin):
            layer.lora_A.copy_(layers[name].lora_A)
            layer.lora_B.copy_(layers[name].lora_B)
    return twin


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture()
def bf16_dir(tmp_path: Path) -> Path:
    """A tiny Llama saved in bf16: the 'original 16-bit weights' of the export tests."""
    tiny_llama(0).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


# ------------------------------------------------------------------------------------------------
# Configuration and bad input: each error names the bad value
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(bits=3), "bits=3"),
        (dict(bits=16), "bits=16"),
        (dict(quant_type="int4"), "'int4'"),
        (dict(block_size=48), "block_size=48"),
        (dict(compute_dtype="float64"), "'float64'"),
        (dict(quant_storage="int8"), "'int8'"),
        (dict(int8_threshold=-1.0), "-1.0"),
    ],
)
def test_bad_config_is_an_error_naming_the_value(kwargs, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        Quantization(**kwargs)


def test_config_fields_map_to_bitsandbytes_layer():
    q = Quantization(bits=4, quant_type="fp4", double_quant=False, block_size=128, compute_dtype="float16", quant_storage="bfloat16")
    model = tiny_llama(0)
    quantize_model(model, q)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.compute_dtype == torch.float16 and layer.weight.dtype == torch.bfloat16  # quant_storage
    state = layer.weight.quant_state
    assert (state.quant_type, state.blocksize, state.nested) == ("fp4", 128, False)
    model8 = tiny_llama(0)
    quantize_model(model8, Quantization(bits=8, int8_threshold=4.0))
    layer8 = model8.model.layers[0].mlp.up_proj
    assert isinstance(layer8, bnb.nn.Linear8bitLt) and layer8.weight.dtype == torch.int8 and layer8.state.threshold == 4.0


def test_compute_dtype_the_device_cannot_use_is_a_clear_error(monkeypatch):
    # No pre-Ampere GPU here: simulate one (bf16 unsupported) and check the rule that guards it.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    with pytest.raises(QuantizationBackendError, match=r"compute_dtype='bfloat16'.*Tesla T4"):
        check_backend(Quantization(compute_dtype="bfloat16"), "cuda")


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    _probe.cache_clear()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    try:
        with pytest.raises(QuantizationBackendError, match=r"needs bitsandbytes.*pip install"):
            quantize_model(tiny_llama(0), Quantization())
    finally:
        _probe.cache_clear()


def test_missing_backend_for_the_device_is_a_clear_error(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise NotImplementedError("Could not run 'bitsandbytes::quantize_4bit' with arguments from the 'CPU' backend")

    _probe.cache_clear()
    monkeypatch.setattr(bnbF, "quantize_4bit", no_kernel)
    try:
        with pytest.raises(QuantizationBackendError, match=r"cannot run 4-bit nf4.*on device 'cpu'.*NotImplementedError"):
            quantize_model(tiny_llama(0), Quantization())
    finally:
        _probe.cache_clear()


def test_model_without_linear_layers_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Sequential has no nn.Linear layer to quantize.*Embedding"):
        quantize_model(nn.Sequential(nn.Embedding(10, 8), nn.ReLU()), Quantization())
    # GPT-2 has only Conv1D layers besides its (tied) output head, which is never quantized.
    with pytest.raises(ValueError, match=r"no nn.Linear layer to quantize besides the output head \['lm_head'\].*Conv1D"):
        quantize_model(tiny_gpt2(0), Quantization())


def test_skip_modules_that_match_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"skip_modules entries \['q_prj'\] matched no module"):
        quantize_model(tiny_llama(0), Quantization(skip_modules=["q_prj"]))


def test_quantizing_twice_with_another_config_or_after_injection_is_refused():
    model = tiny_llama(0)
    quantize_model(model, F32)
    assert quantize_model(model, F32)  # same config: idempotent (Lightning calls setup per stage)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, Quantization(quant_type="fp4"))
    adapted = tiny_llama(0)
    apply_peft(adapted, LoRA(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="before injecting adapters"):
        quantize_model(adapted, F32)


# ------------------------------------------------------------------------------------------------
# What gets quantized, and where the adapters go
# ------------------------------------------------------------------------------------------------
def test_every_linear_but_the_head_and_skip_modules_is_quantized():
    model = tiny_llama(0)
    names = quantize_model(model, Quantization(skip_modules=["down_proj"]))
    expected = [f"model.layers.{i}.{part}.{leaf}" for i in range(2) for part, leaf in
                [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
                 ("mlp", "gate_proj"), ("mlp", "up_proj")]]  # fmt: skip
    assert sorted(names) == sorted(expected)
    assert type(model.lm_head) is nn.Linear and type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert all(isinstance(model.get_submodule(n), bnb.nn.Linear4bit) for n in names)


@pytest.mark.parametrize("bits", [4, 8])
def test_only_adapters_train_float32_closed_form_count_base_unchanged(bits):
    model = tiny_llama(0)
    quantize_model(model, Quantization(bits=bits, compute_dtype="float32"))
    apply_peft(model, LoRA(r=4, target_modules="all-linear"))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # r * (in + out) per adapted linear: q,o 32x32; k,v 32->16 (GQA); gate,up 32->64; down 64->32.
    per_layer = 4 * ((32 + 32) * 2 + (32 + 16) * 2 + (32 + 64) * 3)
    assert sum(p.numel() for p in trainable.values()) == 2 * per_layer == parameter_summary(model).trainable
    assert all(re.search(r"\.lora_[AB]$", n) and p.dtype == torch.float32 for n, p in trainable.items())
    expected_type = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert all(isinstance(layer.base_layer, expected_type) for _, layer in adapter_layers(model))
    # The summary counts the weights a packed 4-bit tensor stands for, not its bytes.
    assert parameter_summary(model).total == sum(p.numel() for p in tiny_llama(0).parameters()) + 2 * per_layer

    packed = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    for _ in range(2):
        model(input_ids=input_ids(), labels=input_ids()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, packed[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(torch.count_nonzero(layer.lora_B) for _, layer in adapter_layers(model))


# ------------------------------------------------------------------------------------------------
# Parity: QLoRA == LoRA on the dequantized weights (forward and adapter gradients)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compute_dtype, check", [("float32", "abs"), ("bfloat16", "rel")])
def test_qlora_equals_lora_on_dequantized_weights(compute_dtype, check):
    model = qlora_model(quantization=Quantization(compute_dtype=compute_dtype))
    twin = dequantized_twin(model)
    ids = input_ids()
    out, ref = model(input_ids=ids, labels=ids), twin(input_ids=ids, labels=ids)
    out.loss.backward()
    ref.loss.backward()
    grads, ref_grads = adapter_grads(model), adapter_grads(twin)
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    if check == "abs":  # float32 compute: the same arithmetic up to summation order
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    else:  # bf16 matmuls: within 1e-2 relative (norm-wise)
        assert rel(out.logits, ref.logits) < 1e-2
        worst = max(rel(grads[n], ref_grads[n]) for n in grads)
        assert worst < 1e-2, worst


def test_qlora_matches_hf_peft_on_the_same_quantized_layers():
    base = tiny_llama(0)
    quantize_model(base, F32)
    twin_base = copy.deepcopy(base)
    apply_peft(base, LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_adapters(base, std=0.05)
    from peft import LoraConfig, get_peft_model

    twin = get_peft_model(twin_base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    copy_adapters_to_peft(base, twin)
    ids = input_ids()
    torch.testing.assert_close(base(input_ids=ids).logits, twin(input_ids=ids).logits, atol=1e-6, rtol=0)


def test_int8_base_is_close_to_full_precision():
    # LLM.int8 also quantizes the activations, so there is no exact dequantized reference: check closeness.
    full = tiny_llama(0)
    model = tiny_llama(0)
    quantize_model(model, Quantization(bits=8))
    with torch.no_grad():
        assert rel(model(input_ids=input_ids()).logits, full(input_ids=input_ids()).logits) < 5e-2


# ------------------------------------------------------------------------------------------------
# Weight memory
# ------------------------------------------------------------------------------------------------
def test_nf4_double_quant_costs_4_127_bits_per_weight():
    weight = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    from lightning_peft.quantization.layers import quantized_linear

    nf4_dq = bits_per_parameter(quantized_linear(weight, None, Quantization(), "cpu"))
    assert abs(nf4_dq - 4.127) / 4.127 < 0.02, nf4_dq
    assert abs(bits_per_parameter(quantized_linear(weight, None, Quantization(double_quant=False), "cpu")) - 4.5) < 0.02
    assert abs(bits_per_parameter(quantized_linear(weight, None, Quantization(bits=8), "cpu")) - 8.03) < 0.02


# ------------------------------------------------------------------------------------------------
# Streaming loader (tiny models; SmolLM2 in test_quantized_loading.py)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_streaming_load_equals_in_place_quantization(tmp_path, tie, bits):
    tiny_llama(0, tie_word_embeddings=tie).to(torch.bfloat16).save_pretrained(tmp_path)
    q = Quantization(bits=bits, compute_dtype="float32")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    quantize_model(reference, q)
    streamed = load_quantized(tmp_path, q, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(streamed(input_ids=input_ids()).logits, reference(input_ids=input_ids()).logits)
    assert streamed.state_dict().keys() == reference.state_dict().keys()
    assert (streamed.lm_head.weight is streamed.model.embed_tokens.weight) == tie
    assert quantization_record(streamed).source == str(tmp_path)
    assert not any(p.is_meta for p in streamed.parameters()) and not any(b.is_meta for b in streamed.buffers())


def test_streaming_load_of_a_classifier_initialises_the_new_head(tmp_path):
    tiny_llama(0).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"newly initialised: \['score.weight'\]"):
        model = load_quantized(tmp_path, F32, AutoModelForSequenceClassification, dtype=torch.float32, num_labels=3)
    reference = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32, num_labels=3)
    assert type(model.score) is nn.Linear and model.score.weight.shape == (3, 32)
    assert 0 < model.score.weight.std() < 1  # initialised by the model's _init_weights, not left empty
    torch.testing.assert_close(model.model.embed_tokens.weight, reference.model.embed_tokens.weight, atol=0, rtol=0)


def test_streaming_load_refuses_pickles(tmp_path):
    (tmp_path / "config.json").write_text(tiny_llama(0).config.to_json_string())
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no safetensors weights.*pytorch_model.bin.*pickles are not streamed"):
        load_quantized(tmp_path, F32)


# ------------------------------------------------------------------------------------------------
# Merge and export with a quantized base
# ------------------------------------------------------------------------------------------------
def adapted_pair(bf16_dir: Path) -> tuple[nn.Module, nn.Module]:
    """(QLoRA model streamed from ``bf16_dir``, LoRA on the 16-bit weights of ``bf16_dir``), same adapters."""
    model = load_quantized(bf16_dir, F32, dtype=torch.float32)
    apply_peft(model, LoRA(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(model, std=0.05)
    reference = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32)
    apply_peft(reference, LoRA(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(reference, std=0.05)
    return model, reference


def test_merged_export_of_a_4bit_base_uses_the_original_weights(bf16_dir, tmp_path):
    model, reference = adapted_pair(bf16_dir)
    ids = input_ids()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits  # unmerged adapters on the 16-bit weights, float32
    save_merged(model, tmp_path / "f32", dtype=torch.float32)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "f32", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, expected, atol=1e-4, rtol=0)

    # Default: 16-bit, exactly the rounding of the exact merged weights; a plain model (no quantization config).
    save_merged(model, tmp_path / "bf16")
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as bf16, safe_open(tmp_path / "f32" / "model.safetensors", "pt") as f32:
        with safe_open(bf16_dir / "model.safetensors", "pt") as source:
            assert set(bf16.keys()) == set(source.keys())  # exactly the base model's keys
        for key in bf16.keys():
            assert bf16.get_tensor(key).dtype == torch.bfloat16
            assert torch.equal(bf16.get_tensor(key), f32.get_tensor(key).to(torch.bfloat16)), key
    assert "quantization_config" not in (tmp_path / "bf16" / "config.json").read_text()
    # The 4-bit model itself is ~NF4 away from the 16-bit one; the export is not (nothing was requantized).
    with torch.no_grad():
        qlora = model(input_ids=ids).logits
        bf16_logits = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)(input_ids=ids).logits
    assert rel(bf16_logits, expected) < rel(qlora, expected) / 5


def test_in_place_quantized_model_remembers_its_checkpoint(bf16_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32)
    quantize_model(model, F32)
    apply_peft(model, LoRA(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, std=0.05)
    reference = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32)
    apply_peft(reference, LoRA(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(reference, std=0.05)
    save_merged(model, tmp_path / "merged", dtype=torch.float32)  # no source given: the recorded one
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=input_ids()).logits, reference(input_ids=input_ids()).logits, atol=1e-4, rtol=0)


def test_export_without_a_known_source_is_an_error_unless_dequantize(tmp_path):
    model = qlora_model()  # built from a config: no checkpoint to re-read
    with pytest.raises(QuantizedExportError, match=r"original weights is unknown.*source=.*dequantize=True"):
        save_merged(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    with pytest.raises(QuantizedMergeError, match="dequantize=True"):
        merged_state_dict(model)
    with pytest.warns(UserWarning, match="dequantized k-bit weights plus the adapters, not the original"):
        save_merged(model, tmp_path / "merged", dequantize=True)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():  # the dequantized export is the adapted 4-bit model, up to bf16 rounding
        assert rel(exported(input_ids=input_ids()).logits, model(input_ids=input_ids()).logits) < 2e-2


def test_export_from_a_source_with_other_weights_is_refused(bf16_dir, tmp_path):
    model, _ = adapted_pair(bf16_dir)
    tiny_llama(seed=1).to(torch.bfloat16).save_pretrained(tmp_path / "other")
    with pytest.raises(QuantizedExportError, match="different model.layers.0"):
        save_merged(model, tmp_path / "merged", source=tmp_path / "other")
    assert not (tmp_path / "merged").exists()


def test_merge_into_4bit_needs_opt_in_and_reports_its_error():
    model = qlora_model(targets=["q_proj"])
    with pytest.raises(QuantizedMergeError, match=r"'model.layers.0.self_attn.q_proj'.*requantize=True"):
        merge_adapters(model)
    layers = dict(adapter_layers(model))
    with torch.no_grad():  # independently: the exact merged weight and what a requantization of it gives back
        exact = {n: reference_dequantize(l.base_layer).float() + l.delta_weight() for n, l in layers.items()}
        expected = {n: rel(reference_from_codes(*bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")), w) for n, w in exact.items()}
        unmerged = model(input_ids=input_ids()).logits
    with pytest.warns(UserWarning, match="requantizing") as record:
        merge_adapters(model, requantize=True)
    message = str(record[0].message)
    reported = float(re.search(r"max (\d+\.\d+)%", message).group(1)) / 100
    assert reported == pytest.approx(max(expected.values()), abs=1e-5)
    assert 0.05 < reported < 0.15  # NF4 re-rounds the whole matrix
    assert not list(adapter_layers(model)) and isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    with torch.no_grad():
        assert rel(model(input_ids=input_ids()).logits, unmerged) < 0.1


# ------------------------------------------------------------------------------------------------
# k-bit training preparation
# ------------------------------------------------------------------------------------------------
def test_prepare_puts_norms_in_float32_and_keeps_16bit_head_working():
    model = tiny_llama(0).to(torch.bfloat16)
    quantize_model(model, Quantization(compute_dtype="bfloat16"))
    prepare_model_for_kbit_training(model)
    norms = [m for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")]
    assert len(norms) == 5 and all(m.weight.dtype == torch.float32 for m in norms)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    apply_peft(model, LoRA(r=4, target_modules="all-linear"))
    loss = model(input_ids=input_ids(), labels=input_ids()).loss  # float32 hidden states into a bf16 head
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_with_frozen_embeddings_gives_the_same_gradients(use_reentrant):
    model = qlora_model()
    ids = input_ids()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    reference = adapter_grads(model)
    model.zero_grad()
    prepare_model_for_kbit_training(model, gradient_checkpointing=True, use_reentrant=use_reentrant)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads = adapter_grads(model)
    assert grads.keys() == reference.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference[name], atol=1e-6, rtol=1e-5, msg=name)


def _fake_trainer(precision: str = "32-true", plugin=None, strategy=None):
    return SimpleNamespace(precision=precision, precision_plugin=plugin or object(), strategy=strategy or object())


def test_trainer_setups_known_to_fail_are_refused():
    from lightning.pytorch.plugins.precision import BitsandbytesPrecision
    from lightning.pytorch.strategies import FSDPStrategy

    bnb_plugin = BitsandbytesPrecision.__new__(BitsandbytesPrecision)  # CUDA-only to construct; the type is what counts
    with pytest.raises(ValueError, match="BitsandbytesPrecision"):
        check_trainer_compatibility(_fake_trainer(plugin=bnb_plugin), Quantization())
    with pytest.raises(ValueError, match=r"precision='16-true'.*quant_storage='bfloat16'"):
        check_trainer_compatibility(_fake_trainer("16-true"), Quantization(quant_storage="bfloat16"))
    with pytest.warns(UserWarning, match="casts the float32 LoRA adapters"):
        check_trainer_compatibility(_fake_trainer("bf16-true"), Quantization())
    with pytest.raises(ValueError, match=r"quant_storage='bfloat16'"):
        check_trainer_compatibility(_fake_trainer(strategy=FSDPStrategy()), Quantization())
    with pytest.raises(ValueError, match="LLM.int8"):
        check_trainer_compatibility(_fake_trainer(strategy=FSDPStrategy()), Quantization(bits=8))
    check_trainer_compatibility(_fake_trainer("bf16-mixed", strategy=FSDPStrategy()), Quantization(quant_storage="bfloat16"))
    # FSDP casts flat parameters to its param_dtype: 4-bit codes stored in another float dtype would be converted.
    with pytest.raises(ValueError, match=r"quant_storage='bfloat16'\) does not match FSDP's param_dtype float32 \(precision='32-true'\)"):
        check_trainer_compatibility(_fake_trainer(strategy=FSDPStrategy()), Quantization(quant_storage="bfloat16"))
    with pytest.raises(ValueError, match=r"does not match FSDP's param_dtype float16.*set quant_storage='float16'"):
        check_trainer_compatibility(_fake_trainer("16-mixed", strategy=FSDPStrategy()), Quantization(quant_storage="bfloat16"))


# ------------------------------------------------------------------------------------------------
# Lightning: PEFTCallback(quantization=...), the mixin, optimizers, exports
# ------------------------------------------------------------------------------------------------
def test_callback_quantizes_in_place_then_injects_and_trains(tmp_path):
    module = LitCausalLM()
    callback = PEFTCallback(LoRA(r=4, target_modules="all-linear"), quantization=F32)
    trainer = make_trainer(tmp_path, callbacks=[callback])
    trainer.fit(module, token_loader())
    layers = dict(adapter_layers(module.model))
    assert len(layers) == 14 and all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in layers.values())
    assert type(module.model.lm_head) is nn.Linear
    assert all(torch.count_nonzero(layer.lora_B) for layer in layers.values())
    # Checkpoints stay adapter-only: no packed weights, no quantization statistics.
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert state and all(re.search(r"\.lora_[AB]$", key) for key in state)
    # Resume into a fresh module: quantized and injected again at setup, adapters restored.
    resumed = LitCausalLM()
    make_trainer(tmp_path, max_steps=3, callbacks=[PEFTCallback(LoRA(r=4, target_modules="all-linear"), quantization=F32)]).fit(
        resumed, token_loader(), ckpt_path=tmp_path / "last.ckpt"
    )
    assert set(resumed.step_losses) == {3}


def test_mixin_module_is_quantized_in_configure_model_before_injection(tmp_path):
    module = LitPEFTCausalLM()
    trainer = make_trainer(tmp_path, callbacks=[PEFTCallback(LoRA(r=4, target_modules=["q_proj", "v_proj"]), quantization=F32)])
    trainer.fit(module, token_loader())
    assert isinstance(module.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert isinstance(module.model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)  # quantized, not adapted


def test_export_merged_without_a_source_fails_at_setup_not_after_training(tmp_path):
    callback = PEFTCallback(LoRA(r=4, target_modules=["q_proj"]), quantization=F32, export_dir=str(tmp_path / "out"), export_merged=True)
    module = LitCausalLM()
    with pytest.raises(QuantizedExportError, match="export_merged=True with a quantized base"):
        make_trainer(tmp_path, callbacks=[callback]).fit(module, token_loader())
    assert not module.step_losses


@pytest.mark.parametrize("optimizer", ["PagedAdamW", "PagedAdamW8bit", "AdamW8bit"])
def test_bitsandbytes_optimizers_train_and_paged_ones_warn_on_cpu(tmp_path, optimizer):
    class Module(LitCausalLM):
        def configure_optimizers(self):
            return getattr(bnb.optim, optimizer)([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    module = Module()
    trainer = make_trainer(tmp_path, callbacks=[PEFTCallback(LoRA(r=4, target_modules="all-linear"), quantization=F32)])
    if optimizer.startswith("Paged"):
        # The fallback must not be silent: bitsandbytes warns itself (checked here so a silent release is caught).
        with pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU"):
            trainer.fit(module, token_loader())
    else:
        trainer.fit(module, token_loader())
    assert all(torch.count_nonzero(layer.lora_B) for _, layer in adapter_layers(module.model))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny bf16 Llama with a word-level tokenizer, and a text it can learn, for the CLI."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny_cli")
    vocab = {token: i for i, token in enumerate(["[pad]", "[unk]", "[eos]", "[bos]"] + [f"w{i}" for i in range(60)])}
    tiny_llama(0, vocab_size=len(vocab), pad_token_id=0, eos_token_id=2, bos_token_id=3).to(torch.bfloat16).save_pretrained(root / "llama")
    backend = Tokenizer(WordLevel(vocab, unk_token="[unk]"))
    backend.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[pad]", unk_token="[unk]", eos_token="[eos]", bos_token="[bos]").save_pretrained(root / "llama")
    (root / "text.txt").write_text("\n".join([" ".join(f"w{i}" for i in range(12))] * 60))
    return root


@pytest.mark.parametrize("where", ["model", "peft"])
def test_yaml_qlora_with_a_bitsandbytes_optimizer_and_merged_export(tiny_dir, tmp_path, monkeypatch, where):
    """`model.init_args.quantization` streams the checkpoint into 4-bit; `peft.quantization` quantizes in place."""
    import yaml

    from lightning_peft.recipes.cli import run_cli

    monkeypatch.setattr("sys.argv", ["lightning-peft"])
    quantization = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "num_sanity_val_steps": 0, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path / "run")},
        "model": {"class_path": "lightning_peft.recipes.tasks.CausalLMTask", "init_args": {
            "model_name_or_path": str(tiny_dir / "llama"),
            "optimizer": {"class_path": "bitsandbytes.optim.AdamW8bit", "init_args": {"lr": 1e-2}}}},
        "data": {"class_path": "lightning_peft.recipes.data.TextFileDataModule", "init_args": {
            "tokenizer": str(tiny_dir / "llama"), "train_file": str(tiny_dir / "text.txt"), "block_size": 16, "batch_size": 4}},
        "peft": {"method": {"class_path": "lightning_peft.LoRA", "init_args": {"r": 4, "target_modules": "all-linear"}},
                 "export_dir": str(tmp_path / "export"), "export_merged": True},
    }  # fmt: skip
    (config["model"]["init_args"] if where == "model" else config["peft"])["quantization"] = quantization
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cli = run_cli(["fit", "--config", str(tmp_path / "config.yaml")])
    layers = dict(adapter_layers(cli.model.model))
    assert len(layers) == 14 and all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in layers.values())
    assert isinstance(cli.trainer.optimizers[0], bnb.optim.AdamW8bit)
    assert quantization_record(cli.model.model).source == str(tiny_dir / "llama")
    # The merged export is the original bf16 weights plus the trained deltas, in bf16.
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir / "llama", dtype=torch.float32)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged", dtype=torch.float32)
    name, layer = "model.layers.0.mlp.down_proj", layers["model.layers.0.mlp.down_proj"]
    expected = (reference.get_submodule(name).weight + layer.delta_weight()).to(torch.bfloat16).float()
    assert torch.equal(exported.get_submodule(name).weight, expected)
    assert (tmp_path / "export" / "merged" / "tokenizer.json").exists()


def test_task_checkpoint_reloads_into_4bit_with_its_adapters(tiny_dir, tmp_path):
    """`load_from_checkpoint` rebuilds the 4-bit base from the task's own `quantization` argument."""
    from lightning_peft.recipes.data import TextFileDataModule
    from lightning_peft.recipes.tasks import CausalLMTask

    task = CausalLMTask(str(tiny_dir / "llama"), quantization=F32, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = TextFileDataModule(str(tiny_dir / "llama"), str(tiny_dir / "text.txt"), block_size=16, batch_size=4)
    trainer = make_trainer(tmp_path, callbacks=[PEFTCallback(LoRA(r=4, target_modules="all-linear"))])
    trainer.fit(task, datamodule=data)
    trainer.save_checkpoint(tmp_path / "qlora.ckpt")
    reloaded = CausalLMTask.load_from_checkpoint(tmp_path / "qlora.ckpt")
    assert reloaded.quantization == F32
    trained, restored = dict(adapter_layers(task.model)), dict(adapter_layers(reloaded.model))
    assert restored.keys() == trained.keys() and len(restored) == 14
    for name, layer in restored.items():
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
        assert torch.equal(layer.lora_B, trained[name].lora_B) and torch.count_nonzero(layer.lora_B)


def test_yaml_bad_quantization_value_is_named(tiny_dir, tmp_path, monkeypatch, capsys):
    from lightning_peft.recipes.cli import main

    monkeypatch.setattr("sys.argv", ["lightning-peft"])
    args = ["fit", f"--model=lightning_peft.recipes.tasks.CausalLMTask", f"--model.model_name_or_path={tiny_dir / 'llama'}",
            "--data=lightning_peft.recipes.data.TextFileDataModule", f"--data.tokenizer={tiny_dir / 'llama'}",
            f"--data.train_file={tiny_dir / 'text.txt'}", "--model.quantization.bits=3"]  # fmt: skip
    assert main(args) == 2
    first = capsys.readouterr().err.strip().splitlines()[0]
    assert first.startswith("error: ") and "Got value: 3" in first


# ------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): run with `python -m pytest -q -m gpu tests/test_quantization.py`
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_gpu_qlora_equals_lora_on_dequantized_weights(compute_dtype):
    model = tiny_llama(0).cuda()
    quantize_model(model, Quantization(compute_dtype=compute_dtype), device="cuda")
    apply_peft(model, LoRA(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(model, seed=100, std=0.05)
    twin = dequantized_twin(model).cuda()
    ids = input_ids().cuda()
    out, ref = model(input_ids=ids, labels=ids), twin(input_ids=ids, labels=ids)
    out.loss.backward()
    ref.loss.backward()
    tolerance = 1e-5 if compute_dtype == "float32" else 1e-2
    assert rel(out.logits, ref.logits) < tolerance
    grads, ref_grads = adapter_grads(model), adapter_grads(twin)
    assert max(rel(grads[n], ref_grads[n]) for n in grads) < max(tolerance, 1e-4)


@pytest.mark.gpu
@needs_cuda
def test_gpu_streaming_load_and_paged_optimizer_step(tmp_path):
    import warnings

    tiny_llama(0).to(torch.bfloat16).save_pretrained(tmp_path)
    model = load_quantized(tmp_path, Quantization(), dtype=torch.bfloat16, device="cuda")
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "cuda"
    prepare_model_for_kbit_training(model, gradient_checkpointing=True)
    apply_peft(model, LoRA(r=4, target_modules="all-linear"))
    optimizer = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = input_ids().cuda()
    model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Paged optimizers are not supported")  # must really page on CUDA
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    assert all(torch.count_nonzero(layer.lora_B) for _, layer in adapter_layers(model))

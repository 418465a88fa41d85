"""weight_spectrum: a rank-r LoRA delta has rank exactly r and the singular values of the merged delta computed
independently; DoRA's non-additive merge; full fine-tuning against its base; a 4-bit base; the 90%-energy rank in
closed form; and bad input (a method that cannot merge, a missing or superfluous base)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import randomize_adapters, tiny_gpt2, tiny_llama

from lightning_peft import BitFit, DoRA, LoRA, PromptTuning, Quantization, apply_peft, merge_adapters, weight_spectrum
from lightning_peft.core.adapter_layer import adapter_layers
from lightning_peft.operations.spectrum import energy_rank
from lightning_peft.quantization import dequantized_weight, quantize_model

TARGETS = ["q_proj", "v_proj", "down_proj"]


def lora_deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Independent of the package's merge code: ``scaling * B @ A`` from each layer's own tensors, in float64."""
    return {name: layer.scaling * layer.lora_B.double() @ layer.lora_A.double() for name, layer in adapter_layers(model)}


def dora_deltas(model: torch.nn.Module, base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """DoRA's merged weight from its formula, ``m * (W + s B A) / ||W + s B A||_row``, minus ``W``, in float64."""
    deltas = {}
    base_modules = dict(base.named_modules())
    for name, layer in adapter_layers(model):
        weight = base_modules[name].weight.double()
        directed = weight + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
        merged = layer.lora_magnitude_vector.double()[:, None] * directed / directed.norm(dim=1, keepdim=True)
        deltas[name] = merged - weight
    return deltas


@pytest.mark.parametrize("r", [1, 3, 5])
def test_a_rank_r_lora_delta_has_rank_r_and_the_svd_of_the_merged_delta(r: int) -> None:
    base = tiny_llama(0)
    model = copy.deepcopy(base)
    apply_peft(model, LoRA(r=r, alpha=2 * r, target_modules=TARGETS))
    randomize_adapters(model, seed=r)
    spectra = weight_spectrum(model)
    reference = lora_deltas(model)
    assert set(spectra) == set(reference) and len(spectra) == 6
    for name, delta in reference.items():
        spectrum = spectra[name]
        assert spectrum.rank == r == int(torch.linalg.matrix_rank(delta))
        torch.testing.assert_close(spectrum.singular_values.double(), torch.linalg.svdvals(delta), rtol=1e-4, atol=1e-6)
        assert spectrum.shape == tuple(delta.shape)
        s2 = torch.linalg.svdvals(delta.double()) ** 2
        assert spectrum.rank_90 == int((torch.cumsum(s2, 0) / s2.sum() < 0.9).sum()) + 1


def test_an_untrained_lora_has_rank_zero() -> None:
    model = tiny_llama(0)
    apply_peft(model, LoRA(r=4, target_modules=TARGETS))  # B = 0: the delta is exactly zero
    assert {(s.rank, s.rank_90) for s in weight_spectrum(model).values()} == {(0, 0)}


def test_dora_is_measured_on_its_merged_weight_not_on_b_a() -> None:
    base = tiny_llama(0)
    model = copy.deepcopy(base)
    apply_peft(model, DoRA(r=2, alpha=4, target_modules=TARGETS))
    randomize_adapters(model, seed=4)
    spectra = weight_spectrum(model)
    for name, delta in dora_deltas(model, base).items():
        torch.testing.assert_close(spectra[name].singular_values.double(), torch.linalg.svdvals(delta), rtol=1e-4, atol=1e-5)
        # The magnitude rescales every row of W: the perturbation is no longer of rank r.
        assert spectra[name].rank > 2


def test_a_merged_model_gives_the_same_spectrum() -> None:
    model = tiny_llama(0)
    apply_peft(model, LoRA(r=3, target_modules=TARGETS))
    randomize_adapters(model, seed=2)
    unmerged = weight_spectrum(model)
    merge_adapters(model, unload=False)
    merged = weight_spectrum(model)
    for name in unmerged:
        torch.testing.assert_close(merged[name].singular_values, unmerged[name].singular_values, rtol=1e-4, atol=1e-6)
        assert merged[name].rank == 3


def test_full_fine_tuning_against_its_base() -> None:
    base = tiny_llama(0)
    finetuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(0)
    weight = finetuned.model.layers[1].mlp.up_proj.weight
    u, v = torch.randn(weight.shape[0], 4, generator=generator), torch.randn(4, weight.shape[1], generator=generator)
    with torch.no_grad():
        weight += u @ v  # a rank-4 change of one matrix
        finetuned.model.layers[0].self_attn.o_proj.weight.mul_(1.5)  # a full-rank change of another
    spectra = weight_spectrum(finetuned, base=base)
    assert spectra["model.layers.1.mlp.up_proj"].rank == 4
    torch.testing.assert_close(spectra["model.layers.1.mlp.up_proj"].singular_values, torch.linalg.svdvals(u @ v), rtol=1e-4, atol=1e-5)
    o_proj = base.model.layers[0].self_attn.o_proj.weight
    assert spectra["model.layers.0.self_attn.o_proj"].rank == int(torch.linalg.matrix_rank(o_proj.detach().double()))
    assert spectra["model.layers.0.mlp.gate_proj"].rank == 0  # untouched


def test_a_four_bit_base_is_dequantized_for_the_delta() -> None:
    model = tiny_llama(0)
    quantize_model(model, Quantization(bits=4, compute_dtype="float32"))
    apply_peft(model, LoRA(r=2, alpha=4, target_modules=TARGETS))
    randomize_adapters(model, seed=1)
    spectra = weight_spectrum(model)
    for name, layer in adapter_layers(model):
        expected = layer.merged_weight(dequantized_weight(layer.base_layer)) - dequantized_weight(layer.base_layer)
        assert spectra[name].rank == 2
        torch.testing.assert_close(spectra[name].singular_values, torch.linalg.svdvals(expected), rtol=1e-4, atol=1e-6)


def test_a_method_that_changes_only_biases_has_zero_spectra_and_norms_are_left_out() -> None:
    model = tiny_gpt2(0)
    apply_peft(model, BitFit())
    randomize_adapters(model, seed=1)
    wrapped = [name for name, _ in adapter_layers(model)]
    assert any(".ln_" in name for name in wrapped)
    spectra = weight_spectrum(model)
    assert set(spectra) == {name for name in wrapped if ".ln_" not in name}  # a LayerNorm's 1-D weight has no spectrum
    assert spectra and {(s.rank, s.rank_90) for s in spectra.values()} == {(0, 0)}


def test_energy_rank_closed_form() -> None:
    values = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14: 9/14 < 0.9 <= 13/14
    assert energy_rank(values, 0.9) == 2
    assert energy_rank(values, 0.5) == 1
    assert energy_rank(values, 1.0) == 3
    assert energy_rank(torch.zeros(3), 0.9) == 0
    with pytest.raises(ValueError, match=r"the energy fraction must be in \(0, 1\], got 1.5"):
        energy_rank(values, 1.5)


# -- bad input --------------------------------------------------------------------------------------------
def test_a_method_that_cannot_merge_is_refused() -> None:
    model = tiny_llama(0)
    apply_peft(model, PromptTuning(num_virtual_tokens=4))
    with pytest.raises(ValueError, match="weight_spectrum needs a method whose update merges into the weights .*cannot merge"):
        weight_spectrum(model)


def test_a_model_without_adapters_needs_its_base() -> None:
    with pytest.raises(ValueError, match="has no adapters, so its perturbation is W_finetuned - W_base: pass the model the fine-tune started from as base="):
        weight_spectrum(tiny_llama(0))


def test_a_base_beside_adapters_is_refused() -> None:
    model = tiny_llama(0)
    apply_peft(model, LoRA(r=2, target_modules=TARGETS))
    with pytest.raises(ValueError, match="base= is for a fully fine-tuned model; this model has adapters"):
        weight_spectrum(model, base=tiny_llama(0))


def test_a_base_of_another_shape_is_named() -> None:
    with pytest.raises(ValueError, match=r"'model.embed_tokens.weight' is \(128, 32\) in the fine-tuned model but \(128, 48\) in the base"):
        weight_spectrum(tiny_llama(0), base=tiny_llama(0, hidden=48))

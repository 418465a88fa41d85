"""(IA)3 against HF peft as the oracle: same default targets, same outputs adapted and merged, files that
load both ways; plus identity at init, the vector sizes, merge/unmerge and the errors."""

from __future__ import annotations

import json

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from peft.tuners.ia3 import IA3Layer as PeftIA3Layer
from safetensors.torch import load_file
from torch import nn

from lightning_peft import IA3, apply_peft, load_adapter, merge_adapters, parameter_summary, save_adapter, unmerge_adapters
from lightning_peft.core.adapter_layer import adapter_layers
from lightning_peft.formats.merged import save_merged
from lightning_peft.operations.merging import merged_state_dict
from tiny_models import BUILDERS, input_ids, tiny_bert, tiny_gpt2, tiny_llama

ARCHS = sorted(BUILDERS)


def _out(model: nn.Module) -> torch.Tensor:
    """Logits and the last hidden state: a random BERT head's logits are ~0.03, the hidden states O(1)."""
    with torch.no_grad():
        output = model(input_ids=input_ids(), output_hidden_states=True)
    return torch.cat([output.logits.flatten(), output.hidden_states[-1].flatten()])


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Scales around 1 (the trained regime), some well away from it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.ia3_l.copy_(1 + 0.5 * torch.randn(layer.ia3_l.shape, generator=generator))


def _peft_layers(peft_model: nn.Module) -> dict[str, PeftIA3Layer]:
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if isinstance(m, PeftIA3Layer)}


def ours_and_peft(arch: str) -> tuple[nn.Module, nn.Module]:
    """Ours with random scales, and peft's with its defaults and the same scales copied in."""
    # A classifier's file carries its new head, as peft expects of a SEQ_CLS adapter.
    head = ["classifier"] if arch == "bert" else None
    ours = BUILDERS[arch](0)
    apply_peft(ours, IA3(modules_to_save=head))
    _randomize(ours)
    theirs = get_peft_model(BUILDERS[arch](0), IA3Config(modules_to_save=list(head) if head else None))
    peft_layers = _peft_layers(theirs)
    layers = dict(adapter_layers(ours))
    assert sorted(layers) == sorted(peft_layers), "ours and peft scale different modules by default"
    with torch.no_grad():
        for name, layer in layers.items():
            assert layer.feedforward == peft_layers[name].is_feedforward, name
            target = peft_layers[name].ia3_l["default"]
            target.copy_(layer.peft_state_dict()["ia3_l"].reshape(target.shape))
    return ours, theirs


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init(arch):
    model = BUILDERS[arch]()
    before = _out(model)
    apply_peft(model, IA3())
    torch.testing.assert_close(_out(model), before, atol=1e-6, rtol=0)
    assert all(torch.equal(layer.ia3_l, torch.ones_like(layer.ia3_l)) for _, layer in adapter_layers(model))


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_peft(arch):
    ours, theirs = ours_and_peft(arch)
    assert (_out(ours) - _out(BUILDERS[arch](0))).abs().max() > 1e-2  # the scales really change the output
    torch.testing.assert_close(_out(ours), _out(theirs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_model_matches_peft_merged_and_unmerged(arch):
    ours, theirs = ours_and_peft(arch)
    unmerged = _out(ours)
    merged_state = merged_state_dict(ours)
    merge_adapters(ours)
    theirs = theirs.merge_and_unload()
    torch.testing.assert_close(_out(ours), unmerged, atol=1e-6, rtol=0)
    torch.testing.assert_close(_out(ours), _out(theirs), atol=1e-6, rtol=0)
    reference = theirs.state_dict()
    assert set(ours.state_dict()) == set(reference) == set(merged_state)  # exactly the base model's keys
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, reference[key], atol=1e-6, rtol=0, msg=key)
        torch.testing.assert_close(merged_state[key], value, atol=1e-6, rtol=0, msg=key)


def test_merge_scales_rows_or_columns_and_unmerge_restores():
    model = tiny_gpt2()  # Conv1D: (in, out) storage, so rows and columns swap
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_peft(model, IA3())
    _randomize(model, seed=1)
    c_attn = model.transformer.h[0].attn.c_attn
    c_proj = model.transformer.h[0].mlp.c_proj
    merge_adapters(model, unload=False)
    w, b = original["transformer.h.0.attn.c_attn.weight"], original["transformer.h.0.attn.c_attn.bias"]
    torch.testing.assert_close(c_attn.base_layer.weight, w * c_attn.ia3_l[None, :])  # output scaling: columns of (in, out)
    torch.testing.assert_close(c_attn.base_layer.bias, b * c_attn.ia3_l)
    w = original["transformer.h.0.mlp.c_proj.weight"]
    torch.testing.assert_close(c_proj.base_layer.weight, w * c_proj.ia3_l[:, None])  # input scaling: rows of (in, out)
    torch.testing.assert_close(c_proj.base_layer.bias, original["transformer.h.0.mlp.c_proj.bias"])  # untouched
    unmerge_adapters(model)
    for name, param in model.named_parameters():
        plain = name.replace(".base_layer.", ".")
        if plain in original:
            torch.testing.assert_close(param, original[plain], atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize(
    "arch, sizes",
    [
        # Llama (hidden 32, 2 kv heads of 8, intermediate 64): k_proj and v_proj outputs, down_proj input.
        ("llama", [16, 16, 64]),
        # GPT-2 (hidden 32): c_attn output (3 x 32), mlp.c_proj input (4 x 32).
        ("gpt2", [96, 128]),
        # BERT (hidden 32, intermediate 64): key, value outputs; attention.output.dense and output.dense inputs.
        ("bert", [32, 32, 32, 64]),
    ],
)
def test_trainable_parameters_are_the_vector_sizes(arch, sizes):
    model = BUILDERS[arch]()
    apply_peft(model, IA3())
    assert parameter_summary(model).trainable == 2 * sum(sizes)  # 2 layers
    assert [layer.ia3_l.numel() for _, layer in adapter_layers(model)] == sizes * 2


@pytest.mark.parametrize("arch", ARCHS)
def test_our_file_loads_in_peft(arch, tmp_path):
    ours, _ = ours_and_peft(arch)
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["fan_in_fan_out"] == (arch == "gpt2")
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    head = {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} if arch == "bert" else set()
    assert set(tensors) == {f"base_model.model.{name}.ia3_l" for name, _ in adapter_layers(ours)} | head
    loaded = PeftModel.from_pretrained(BUILDERS[arch](0), tmp_path / "adapter")
    torch.testing.assert_close(_out(loaded), _out(ours), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_file_loads_in_ours(arch, tmp_path):
    _, theirs = ours_and_peft(arch)
    theirs.save_pretrained(tmp_path / "peft")
    model = load_adapter(BUILDERS[arch](0), tmp_path / "peft")
    torch.testing.assert_close(_out(model), _out(theirs), atol=1e-6, rtol=0)
    assert sorted(n for n, _ in adapter_layers(model)) == sorted(_peft_layers(theirs))


def test_merged_export_is_a_plain_transformers_model(tmp_path):
    from transformers import GPT2LMHeadModel

    model = tiny_gpt2()
    apply_peft(model, IA3())
    _randomize(model, seed=2)
    # GPT-2 ties lm_head to wte, which IA3 does not touch: the merged export is allowed.
    save_merged(model, tmp_path / "merged")
    plain = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_out(plain), _out(model), atol=1e-6, rtol=0)


def test_explicit_targets_and_feedforward_modules():
    model = tiny_llama()
    targets = apply_peft(model, IA3(target_modules=["v_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"]))
    layers = dict(adapter_layers(model))
    assert [layers[t].feedforward for t in targets[:3]] == [False, False, True]
    assert layers[targets[1]].ia3_l.numel() == 64  # up_proj scales its output (intermediate size)


# -- bad input ------------------------------------------------------------------------------------
def test_unknown_architecture_asks_for_targets():
    from transformers import MixtralConfig, MixtralForCausalLM

    model = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match=r"IA3 has no default targets for model type 'mixtral'.*Pass target_modules.*feedforward_modules"):
        apply_peft(model, IA3())


def test_feedforward_entry_that_is_not_a_target_is_refused():
    with pytest.raises(ValueError, match=r"feedforward_modules entries \['down_proj'\] match none of the IA3 targets"):
        apply_peft(tiny_llama(), IA3(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"]))


def test_bad_feedforward_regex_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"feedforward_modules='\(' is not a valid regular expression"):
        IA3(feedforward_modules="(")


def test_unmerge_with_a_zero_scale_is_refused():
    model = tiny_bert()
    apply_peft(model, IA3())
    layer = next(layer for _, layer in adapter_layers(model))
    with torch.no_grad():
        layer.ia3_l[0] = 0.0
    merge_adapters(model, unload=False)
    with pytest.raises(ValueError, match=r"cannot unmerge this IA3 layer: a scale is exactly zero"):
        unmerge_adapters(model)

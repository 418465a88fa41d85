"""Which modules get an adapter: the target forms, per-architecture defaults, idempotent injection and
the errors for targets that cannot be right. HF peft's own selection is the reference where it has one."""

from __future__ import annotations

import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft import LoRA, apply_peft
from lightning_peft.core.adapter_layer import AdapterLayer, adapter_layers
from lightning_peft.methods.base import PEFTMethod
from tiny_models import peft_lora_names, tiny_bert, tiny_gpt2, tiny_llama, tiny_llama_classifier


def ours(model: nn.Module, **kwargs) -> list[str]:
    return sorted(apply_peft(model, LoRA(r=4, **kwargs)))


def reference(builder, task_type: str | None = None, **kwargs) -> list[str]:
    return peft_lora_names(get_peft_model(builder(), LoraConfig(r=4, task_type=task_type, **kwargs)))


def leaves(names: list[str]) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name in names}


# -- the target forms, checked against peft's own selection -------------------------------------------
@pytest.mark.parametrize(
    ("builder", "task_type", "target_modules", "exclude_modules"),
    [
        (tiny_llama, "CAUSAL_LM", ["q_proj", "v_proj"], None),
        (tiny_llama, "CAUSAL_LM", ["self_attn.q_proj", "mlp.down_proj"], None),
        (tiny_llama, "CAUSAL_LM", r"model\.layers\.1\.self_attn\.(q|k)_proj", None),
        (tiny_llama, "CAUSAL_LM", "all-linear", None),
        (tiny_llama, "CAUSAL_LM", "all-linear", ["down_proj"]),
        (tiny_llama, "CAUSAL_LM", ["q_proj", "k_proj", "embed_tokens"], r".*layers\.0\..*"),
        (tiny_gpt2, "CAUSAL_LM", ["c_attn", "c_proj"], None),
        (tiny_gpt2, "CAUSAL_LM", "all-linear", None),
        (tiny_bert, "SEQ_CLS", "all-linear", None),
        (tiny_bert, "SEQ_CLS", ["query", "value"], None),
        (tiny_llama_classifier, "SEQ_CLS", "all-linear", None),
    ],
)
def test_selection_matches_peft(builder, task_type, target_modules, exclude_modules):
    got = ours(builder(), target_modules=target_modules, exclude_modules=exclude_modules)
    want = reference(builder, task_type, target_modules=target_modules, exclude_modules=exclude_modules)
    assert got == want
    assert got  # a selection of nothing would make every other assertion vacuous


def test_suffix_list_matches_whole_segments_only():
    # "proj" is a suffix of "q_proj" as a string but not as a name segment: it must not match.
    with pytest.raises(ValueError, match=r"\['proj'\] matched no module"):
        apply_peft(tiny_llama(), LoRA(target_modules=["proj"]))
    got = ours(tiny_llama(), target_modules=["q_proj"])
    assert got == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]


def test_regex_is_full_match_not_search():
    # As a regex, "q_proj" only fullmatches a module literally named "q_proj": there is none.
    with pytest.raises(ValueError, match=r"regex 'q_proj' matched no module"):
        apply_peft(tiny_llama(), LoRA(target_modules="q_proj"))
    got = ours(tiny_llama(), target_modules=r".*\.q_proj")
    assert got == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert [n for n in got if re.search("q_proj", n)] == got


@pytest.mark.parametrize(
    ("builder", "heads"),
    [(tiny_llama, {"lm_head"}), (tiny_gpt2, {"lm_head"}), (tiny_bert, {"classifier"}), (tiny_llama_classifier, {"score"})],
)
def test_all_linear_is_every_linear_but_the_head(builder, heads):
    model = builder()
    linear = sorted(n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)))
    assert heads <= set(linear)  # the head is a linear layer, so leaving it out is a real decision
    got = ours(model, target_modules="all-linear")
    assert got == sorted(n for n in linear if n not in heads)


@pytest.mark.parametrize(
    ("builder", "expected"),
    [
        (tiny_llama, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        (tiny_gpt2, {"c_attn", "c_proj", "c_fc"}),
        (tiny_bert, {"query", "key", "value", "dense"}),
    ],
)
def test_per_architecture_defaults(builder, expected):
    model = builder()
    got = ours(model)
    assert leaves(got) == expected
    # Every module with one of those leaf names is adapted (both layers, attention and MLP).
    assert got == sorted(n for n, _ in builder().named_modules() if n.rsplit(".", 1)[-1] in expected)


def test_exclude_modules_list_and_regex():
    everything = ours(tiny_llama(), target_modules="all-linear")
    no_down = ours(tiny_llama(), target_modules="all-linear", exclude_modules=["down_proj"])
    assert no_down == [n for n in everything if not n.endswith(".down_proj")]
    no_layer0 = ours(tiny_llama(), target_modules="all-linear", exclude_modules=r"model\.layers\.0\..*")
    assert no_layer0 == [n for n in everything if not n.startswith("model.layers.0.")]
    assert len(no_down) == len(everything) - 2 and len(no_layer0) == len(everything) // 2


# -- idempotence and method conflicts ---------------------------------------------------------------
def test_injection_is_idempotent():
    model = tiny_llama()
    method = LoRA(r=4, target_modules=["q_proj", "v_proj"])
    first = apply_peft(model, method)
    layers_before = {name: layer for name, layer in adapter_layers(model)}
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    # An equal method (a separate but identical config, as a checkpoint restore would build) is a no-op.
    second = apply_peft(model, LoRA(r=4, target_modules=["q_proj", "v_proj"]))
    assert sorted(second) == sorted(first)
    layers_after = dict(adapter_layers(model))
    assert layers_after.keys() == layers_before.keys()
    assert all(layers_after[n] is layers_before[n] for n in layers_before)
    assert not any(isinstance(layer.base_layer, AdapterLayer) for layer in layers_after.values())  # no nesting
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())


def test_idempotent_apply_refreezes_the_base():
    model = tiny_llama()
    method = LoRA(r=4, target_modules=["q_proj"])
    apply_peft(model, method)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        p.requires_grad_(True)
    apply_peft(model, method)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_a_different_method_on_an_adapted_model_is_an_error():
    model = tiny_llama()
    apply_peft(model, LoRA(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"already has adapters from LoRA\(r=4.*refusing to also inject LoRA\(r=8"):
        apply_peft(model, LoRA(r=8, target_modules=["q_proj"]))
    # Nothing changed: still one rank-4 adapter per q_proj.
    assert [layer.r for _, layer in adapter_layers(model)] == [4, 4]


# -- errors that name the bad value -----------------------------------------------------------------
def test_target_matching_nothing_lists_candidates():
    with pytest.raises(ValueError, match=r"\['q_prj'\] matched no module of LlamaForCausalLM") as info:
        apply_peft(tiny_llama(), LoRA(target_modules=["q_proj", "q_prj"]))
    for candidate in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"):
        assert candidate in str(info.value)


def test_regex_matching_nothing_is_an_error():
    pattern = r".*\.qq_proj"
    with pytest.raises(ValueError, match=re.escape(f"regex {pattern!r} matched no module") + ".*q_proj"):
        apply_peft(tiny_llama(), LoRA(target_modules=pattern))


def test_invalid_regex_is_an_error():
    with pytest.raises(ValueError, match=r"target_modules='\(q_proj' is not a valid regular expression"):
        apply_peft(tiny_llama(), LoRA(target_modules="(q_proj"))


@pytest.mark.parametrize(
    ("target", "type_name"),
    [
        (["self_attn"], "LlamaAttention"),
        (["input_layernorm"], "LlamaRMSNorm"),
        (r"model\.layers\.0\.post_attention_layernorm", "LlamaRMSNorm"),
        (["mlp"], "LlamaMLP"),
    ],
)
def test_unsupported_layer_type_named_explicitly(target, type_name):
    model = tiny_llama()
    with pytest.raises(ValueError, match=rf"LoRA cannot wrap .*model\.layers\.0\.\w+.* of type {type_name}") as info:
        apply_peft(model, LoRA(target_modules=target))
    assert "Name the layers inside instead" in str(info.value)
    assert not any(True for _ in adapter_layers(model))  # nothing half-injected


def test_unsupported_type_on_gpt2_layernorm():
    with pytest.raises(ValueError, match=r"cannot wrap .*ln_1.* of type LayerNorm"):
        apply_peft(tiny_gpt2(), LoRA(target_modules=["c_attn", "ln_1"]))


def test_exclude_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"exclude_modules=\['nope_proj'\] matched none of the 4 selected targets"):
        apply_peft(tiny_llama(), LoRA(target_modules=["q_proj", "v_proj"], exclude_modules=["nope_proj"]))


def test_exclude_removing_everything_is_an_error():
    with pytest.raises(ValueError, match=r"exclude_modules=\['q_proj'\] removed every target"):
        apply_peft(tiny_llama(), LoRA(target_modules=["q_proj"], exclude_modules=["q_proj"]))


def test_empty_target_list_is_an_error():
    with pytest.raises(ValueError, match=r"target_modules=\[\] selects nothing"):
        LoRA(target_modules=[])


def test_no_default_for_unknown_architecture():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"no default for model type None.*defaults exist for: bert"):
        apply_peft(model, LoRA())
    # Plain torch models work once the targets are named (by their qualified names "0" and "2").
    assert sorted(apply_peft(model, LoRA(r=2, target_modules=["0", "2"]))) == ["0", "2"]


def test_all_linear_with_no_linear_layer():
    with pytest.raises(ValueError, match=r"'all-linear' found no linear layer in Sequential"):
        apply_peft(nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)), LoRA(target_modules="all-linear"))


def test_modules_to_save_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"modules_to_save entry 'clasifier' matched no module"):
        apply_peft(tiny_bert(), LoRA(target_modules=["query"], modules_to_save=["clasifier"]))


def test_method_base_class_is_abstract():
    # The shared machinery calls supports(); a method that forgot it cannot even be built (and the CLI's
    # --help does not offer it).
    with pytest.raises(TypeError, match="abstract method supports"):
        PEFTMethod(target_modules=["q_proj"])

    class Forgetful(PEFTMethod):
        pass

    with pytest.raises(TypeError, match="abstract method supports"):
        Forgetful()

"""LoRA numerics: parity with HF peft (outputs and gradients), init rules, the closed-form parameter
count, frozen base, merging, disabling, bf16 bases and config validation."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft import LoRA, apply_peft, disable_adapters, merge_adapters, parameter_summary, unmerge_adapters
from lightning_peft.core.adapter_layer import adapter_layers
from lightning_peft.operations.merging import merged_state_dict
from tiny_models import (
    LLAMA_ALL,
    copy_adapters_to_peft,
    input_ids,
    logits,
    peft_adapter_params,
    randomize_adapters,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_llama_classifier,
)

GPT2_ALL = ["c_attn", "c_proj", "c_fc"]


def adapted(builder, seed: int = 0, **lora_kwargs) -> nn.Module:
    model = builder(seed)
    apply_peft(model, LoRA(**lora_kwargs))
    randomize_adapters(model, seed=seed + 100)
    return model


def peft_twin(builder, ours: nn.Module, method: LoRA, **extra) -> nn.Module:
    """The same base and the same adapter tensors, in HF peft."""
    config = LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=method.target_modules,
        use_rslora=method.rslora,
        fan_in_fan_out=builder is tiny_gpt2,
        **extra,
    )
    twin = get_peft_model(builder(0), config)
    copy_adapters_to_peft(ours, twin)
    return twin


# -- parity with HF peft ------------------------------------------------------------------------------
PARITY_CASES = {
    "llama-linear-gqa": (tiny_llama, dict(r=4, alpha=8, target_modules=LLAMA_ALL)),
    "llama-embedding": (tiny_llama, dict(r=4, alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "gpt2-conv1d": (tiny_gpt2, dict(r=4, alpha=8, target_modules=GPT2_ALL)),
    "gpt2-wte": (tiny_gpt2, dict(r=4, alpha=16, target_modules=["wte", "c_attn"])),
    "rslora": (tiny_llama, dict(r=16, alpha=8, rslora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
    "gaussian": (tiny_llama, dict(r=4, alpha=4, init="gaussian", target_modules=["k_proj", "up_proj"])),
    "dropout": (tiny_llama, dict(r=4, alpha=8, dropout=0.3, target_modules=LLAMA_ALL)),
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_forward_and_gradients_match_peft(case, train):
    builder, kwargs = PARITY_CASES[case]
    method = LoRA(**kwargs)
    ours = adapted(builder, **kwargs)
    theirs = peft_twin(builder, ours, method)
    ours.train(train)
    theirs.train(train)
    ids = input_ids()
    # Embedding-targeted cases go through input_ids (the embedding adapter must be on the path); the
    # others through inputs_embeds so the input gradient can be compared as well.
    use_embeds = "embedding" not in case and "wte" not in case
    embeds = builder(0).get_input_embeddings()(ids).detach()
    outputs = []
    for model in (ours, theirs):
        torch.manual_seed(1234)  # the same dropout masks in both (same layers, same order)
        if use_embeds:
            x = embeds.clone().requires_grad_(True)
            out = model(inputs_embeds=x).logits
        else:
            x = None
            out = model(input_ids=ids).logits
        outputs.append((out, x))
    (ours_out, ours_x), (theirs_out, theirs_x) = outputs
    torch.testing.assert_close(ours_out, theirs_out, rtol=0, atol=1e-6)

    # The adapters must actually move the output, or the comparison above proves nothing.
    with torch.no_grad():
        base_out = builder(0)(inputs_embeds=embeds).logits if use_embeds else logits(builder(0), ids)
    assert (ours_out - base_out).abs().max() > 1e-2

    weights = torch.randn(ours_out.shape, generator=torch.Generator().manual_seed(7))
    (ours_out * weights).sum().backward()
    (theirs_out * weights).sum().backward()
    for name, layer in adapter_layers(ours):
        ref_a, ref_b = peft_adapter_params(theirs, name)
        assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0, name
        torch.testing.assert_close(layer.lora_A.grad, ref_a.grad, rtol=0, atol=1e-6, msg=f"A grad of {name}")
        torch.testing.assert_close(layer.lora_B.grad, ref_b.grad, rtol=0, atol=1e-6, msg=f"B grad of {name}")
    if use_embeds:
        torch.testing.assert_close(ours_x.grad, theirs_x.grad, rtol=0, atol=1e-6)


def test_dropout_is_active_in_train_mode_and_seeded():
    kwargs = dict(r=4, alpha=8, dropout=0.5, target_modules=LLAMA_ALL)
    model = adapted(tiny_llama, **kwargs)
    ids = input_ids()
    with torch.no_grad():
        eval_out = logits(model, ids)
        model.train()
        torch.manual_seed(0)
        train_a = logits(model, ids)
        torch.manual_seed(0)
        train_b = logits(model, ids)
        torch.manual_seed(1)
        train_c = logits(model, ids)
    torch.testing.assert_close(train_a, train_b, rtol=0, atol=0)
    assert (train_a - eval_out).abs().max() > 1e-3
    assert (train_a - train_c).abs().max() > 1e-3


def test_dropout_touches_only_the_adapter_branch():
    # With B = 0 the adapter branch is zero, so even heavy dropout must leave the output at the base's.
    model = tiny_llama()
    apply_peft(model, LoRA(r=4, dropout=0.9, target_modules=LLAMA_ALL))
    model.train()
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids), logits(tiny_llama(), ids), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("builder", "targets"),
    [(tiny_llama, LLAMA_ALL + ["embed_tokens"]), (tiny_gpt2, GPT2_ALL + ["wte"]), (tiny_bert, ["query", "key", "value", "dense"])],
)
def test_identity_at_init(builder, targets):
    model = builder()
    apply_peft(model, LoRA(r=4, target_modules=targets))
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids), logits(builder(), ids), rtol=0, atol=0)


# -- initialisation -----------------------------------------------------------------------------------
def _collect(model: nn.Module, kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    pairs = [(layer.lora_A.detach(), layer.lora_B.detach()) for _, layer in adapter_layers(model) if layer.kind == kind]
    return [a for a, _ in pairs], [b for _, b in pairs]


def test_kaiming_init_equals_torch_with_the_same_seed():
    model = tiny_llama()
    torch.manual_seed(321)
    apply_peft(model, LoRA(r=4, target_modules=r"model\.layers\.0\.mlp\.down_proj"))
    torch.manual_seed(321)
    expected = torch.empty(4, 64)  # (r, in): down_proj maps intermediate (64) -> hidden (32)
    nn.init.kaiming_uniform_(expected, a=math.sqrt(5))
    layer = model.model.layers[0].mlp.down_proj
    torch.testing.assert_close(layer.lora_A.detach(), expected, rtol=0, atol=0)
    assert torch.count_nonzero(layer.lora_B) == 0


def _peft_pairs(peft_model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach())
        for m in peft_model.modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    ]


def test_kaiming_init_distribution_matches_peft_rule():
    # peft: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with a=sqrt(5)), B = 0. Check both against it.
    ours = tiny_llama(hidden=64)
    apply_peft(ours, LoRA(r=8, target_modules=LLAMA_ALL))
    theirs = get_peft_model(tiny_llama(hidden=64), LoraConfig(r=8, target_modules=LLAMA_ALL))
    for who, pairs in (("ours", list(zip(*_collect(ours, "linear")))), ("peft", _peft_pairs(theirs))):
        assert len(pairs) == 14, who
        for a, b in pairs:
            bound = 1 / math.sqrt(a.shape[1])
            assert a.abs().max() <= bound + 1e-7, who
            assert a.abs().max() > 0.8 * bound, who  # fills the interval (r * in >= 512 draws)
            assert abs(a.std().item() - bound / math.sqrt(3)) < 0.15 * bound / math.sqrt(3), who
            assert torch.count_nonzero(b) == 0, who


def test_gaussian_init_has_std_one_over_r():
    r = 8
    model = tiny_llama(hidden=64)
    apply_peft(model, LoRA(r=r, init="gaussian", target_modules=LLAMA_ALL))
    a_all, b_all = _collect(model, "linear")
    draws = torch.cat([a.reshape(-1) for a in a_all])
    assert draws.numel() > 5000
    assert abs(draws.std().item() - 1 / r) < 0.05 / r  # 1/sqrt(r) (0.35) or 1 (kaiming-ish) fail this
    assert abs(draws.mean().item()) < 0.05 / r
    assert all(torch.count_nonzero(b) == 0 for b in b_all)
    # peft's rule, measured the same way.
    theirs = get_peft_model(tiny_llama(hidden=64), LoraConfig(r=r, init_lora_weights="gaussian", target_modules=LLAMA_ALL))
    ref = torch.cat([a.reshape(-1) for a, _ in _peft_pairs(theirs)])
    assert abs(draws.std().item() - ref.std().item()) < 0.05 / r


@pytest.mark.parametrize("builder,target", [(tiny_llama, "embed_tokens"), (tiny_gpt2, "wte")])
def test_embedding_init_is_zero_a_normal_b(builder, target):
    model = builder(hidden=64)
    apply_peft(model, LoRA(r=16, target_modules=[target]))
    (a,), (b,) = _collect(model, "embedding")
    assert a.shape == (16, 128) and b.shape == (64, 16)  # A: (r, num_embeddings), B: (dim, r)
    assert torch.count_nonzero(a) == 0
    assert abs(b.std().item() - 1.0) < 0.1 and abs(b.mean().item()) < 0.1  # 1024 draws of N(0, 1)
    # The same as peft's layout and rule (A zero, B ~ N(0, 1)).
    theirs = get_peft_model(builder(hidden=64), LoraConfig(r=16, target_modules=[target]))
    module = theirs.base_model.model.get_input_embeddings()
    assert module.lora_embedding_A["default"].shape == a.shape
    assert torch.count_nonzero(module.lora_embedding_A["default"]) == 0
    assert abs(module.lora_embedding_B["default"].std().item() - b.std().item()) < 0.15


# -- the trainable parameters ------------------------------------------------------------------------
def _closed_form(model: nn.Module, targets: list[str], r: int) -> int:
    total = 0
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding):
            fan_in, fan_out = module.num_embeddings, module.embedding_dim
        elif isinstance(module, Conv1D):
            fan_in, fan_out = module.nx, module.nf
        else:
            fan_in, fan_out = module.in_features, module.out_features
        total += r * (fan_in + fan_out)
    return total


@pytest.mark.parametrize(
    ("builder", "targets", "modules_to_save"),
    [
        (tiny_llama, LLAMA_ALL, None),
        (tiny_llama, LLAMA_ALL + ["embed_tokens"], None),
        (tiny_gpt2, GPT2_ALL + ["wte"], None),
        (tiny_bert, ["query", "value"], ["classifier"]),
        (tiny_llama_classifier, ["q_proj", "v_proj"], ["score"]),
    ],
)
def test_trainable_count_is_closed_form(builder, targets, modules_to_save):
    r = 4
    base = builder()
    base_total = sum(p.numel() for p in base.parameters())
    target_names = [n for n, _ in base.named_modules() if n.rsplit(".", 1)[-1] in targets]
    expected = _closed_form(base, target_names, r)
    if modules_to_save:
        expected += sum(p.numel() for n, p in base.named_parameters() if n.split(".")[0] in modules_to_save)

    model = builder()
    apply_peft(model, LoRA(r=r, target_modules=targets, modules_to_save=modules_to_save))
    summary = parameter_summary(model)
    assert summary.trainable == expected
    assert summary.total == base_total + _closed_form(base, target_names, r)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".base_layer." not in n for n in trainable)
    assert all(n.endswith((".lora_A", ".lora_B")) or n.split(".")[0] in (modules_to_save or []) for n in trainable)


def test_trainable_count_matches_peft():
    model = tiny_llama()
    apply_peft(model, LoRA(r=8, target_modules="all-linear"))
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules="all-linear"))
    trainable, total = theirs.get_nb_trainable_parameters()
    assert (parameter_summary(model).trainable, parameter_summary(model).total) == (trainable, total)


@pytest.mark.parametrize("optimize_all", [False, True], ids=["trainable-params", "all-params"])
def test_base_is_frozen_through_training(optimize_all):
    model = tiny_llama()
    apply_peft(model, LoRA(r=4, dropout=0.1, target_modules=LLAMA_ALL + ["embed_tokens"], modules_to_save=["lm_head"]))
    model.train()
    lora_and_head = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = list(model.parameters()) if optimize_all else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    ids = input_ids(batch=4, length=9)
    for step in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        if name in lora_and_head:
            assert changed, f"trainable {name} did not change"
        else:
            assert not changed, f"frozen {name} changed"
            assert param.grad is None, f"frozen {name} got a gradient"
    assert any(n.endswith("lora_A") for n in lora_and_head) and "lm_head.weight" in lora_and_head


# -- merging ----------------------------------------------------------------------------------------
MERGE_CASES = {
    "llama-linear": (tiny_llama, dict(target_modules=LLAMA_ALL)),
    "llama-embedding": (tiny_llama, dict(target_modules=["embed_tokens", "o_proj"])),
    "gpt2-conv1d": (tiny_gpt2, dict(target_modules=GPT2_ALL)),
    "bert": (tiny_bert, dict(target_modules=["query", "key", "value", "dense"])),
    "rslora": (tiny_llama, dict(target_modules=["v_proj", "up_proj"], rslora=True, r=16)),
}


def _merge_case(case):
    builder, kwargs = MERGE_CASES[case]
    kwargs = {"r": 4, "alpha": 8, **kwargs}
    return builder, adapted(builder, **kwargs), LoRA(**kwargs)


def _out(model, ids):
    with torch.no_grad():
        return logits(model, ids)


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merged_weights_equal_float64_recomputation_and_peft(case):
    builder, model, method = _merge_case(case)
    base = dict(builder(0).named_parameters())
    expected = {}
    for name, layer in adapter_layers(model):
        delta = (layer.lora_B.double() @ layer.lora_A.double()) * (method.alpha / (math.sqrt(method.r) if method.rslora else method.r))
        # nn.Linear keeps W as (out, in); Conv1D as (in, out); nn.Embedding as (num, dim) = delta^T.
        if isinstance(layer.base_layer, (Conv1D, nn.Embedding)):
            delta = delta.T
        expected[f"{name}.weight"] = base[f"{name}.weight"].double() + delta
    theirs = peft_twin(builder, model, method).merge_and_unload()
    merged = dict(merge_adapters(model, unload=True).named_parameters())
    for key, value in expected.items():
        torch.testing.assert_close(merged[key].double(), value, rtol=0, atol=1e-6, msg=key)
    torch.testing.assert_close(dict(theirs.named_parameters()), merged, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_unload_false_then_unmerge(case):
    builder, model, _ = _merge_case(case)
    ids = input_ids()
    adapted_out = _out(model, ids)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}
    merge_adapters(model, unload=False)
    assert all(layer.merged for _, layer in adapter_layers(model))
    changed = [n for n, w in base_weights.items() if n.endswith(".weight") and not torch.equal(model.get_parameter(n), w)]
    assert len(changed) == len(list(adapter_layers(model)))  # every adapted weight now holds W + s*BA
    torch.testing.assert_close(_out(model, ids), adapted_out, rtol=0, atol=1e-5)
    merge_adapters(model, unload=False)  # merging twice must not add the delta twice
    torch.testing.assert_close(_out(model, ids), adapted_out, rtol=0, atol=1e-5)
    unmerge_adapters(model)
    assert not any(layer.merged for _, layer in adapter_layers(model))
    for name, weight in base_weights.items():
        torch.testing.assert_close(model.get_parameter(name).detach(), weight, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(_out(model, ids), adapted_out, rtol=0, atol=1e-5)
    unmerge_adapters(model)  # and unmerging twice must not subtract it twice
    torch.testing.assert_close(_out(model, ids), adapted_out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_unload_true_gives_the_base_architecture(case):
    builder, model, _ = _merge_case(case)
    ids = input_ids()
    adapted_out = _out(model, ids)
    merged = merge_adapters(model, unload=True)
    assert merged is model
    assert not any(True for _ in adapter_layers(model))
    fresh = builder(0)
    assert list(model.state_dict()) == list(fresh.state_dict())
    assert {type(m) for m in model.modules()} == {type(m) for m in fresh.modules()}
    torch.testing.assert_close(_out(model, ids), adapted_out, rtol=0, atol=1e-5)
    # A fresh base loaded with the merged weights is the adapted model.
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(_out(fresh, ids), adapted_out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merged_state_dict(case):
    builder, model, _ = _merge_case(case)
    ids = input_ids()
    adapted_out = _out(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = merged_state_dict(model)
    fresh = builder(0)
    assert list(state) == list(fresh.state_dict())
    # The model itself is untouched (still adapted, still unmerged).
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(layer.merged for _, layer in adapter_layers(model))
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(_out(fresh, ids), adapted_out, rtol=0, atol=1e-5)
    # A bf16 export casts every floating tensor.
    assert {t.dtype for t in merged_state_dict(model, dtype=torch.bfloat16).values() if t.is_floating_point()} == {torch.bfloat16}


def test_merged_state_dict_of_a_merged_model_does_not_add_the_delta_twice():
    builder, model, _ = _merge_case("llama-linear")
    ids = input_ids()
    adapted_out = _out(model, ids)
    merge_adapters(model, unload=False)
    fresh = builder(0)
    fresh.load_state_dict(merged_state_dict(model))
    torch.testing.assert_close(_out(fresh, ids), adapted_out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("how", ["merge", "merged_state_dict"])
def test_merging_a_tied_embedding_is_refused(how):
    # GPT-2 ties lm_head.weight to wte.weight: folding the wte adapter into the shared matrix would change
    # the output head too, so no merged model equals the adapted one. It must fail, not return garbage.
    model = adapted(tiny_gpt2, r=4, target_modules=["wte", "c_attn"])
    assert model.lm_head.weight is model.transformer.wte.base_layer.weight
    ids = input_ids()
    adapted_out = _out(model, ids)
    with pytest.raises(ValueError, match=r"transformer\.wte.*lm_head\.weight"):
        merge_adapters(model) if how == "merge" else merged_state_dict(model)
    # Refused before anything was changed.
    assert not any(layer.merged for _, layer in adapter_layers(model))
    torch.testing.assert_close(_out(model, ids), adapted_out, rtol=0, atol=0)


def test_merge_without_adapters_is_an_error():
    with pytest.raises(ValueError, match="LlamaForCausalLM has no adapters to merge"):
        merge_adapters(tiny_llama())


def test_merge_refuses_non_finite_weights():
    model = adapted(tiny_llama, r=4, target_modules=["q_proj"])
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.lora_B[0, 0] = float("inf")
    before = model.model.layers[1].self_attn.q_proj.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        merge_adapters(model, unload=False)
    assert torch.equal(model.model.layers[1].self_attn.q_proj.base_layer.weight, before)


# -- disabling --------------------------------------------------------------------------------------
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_disable_adapters_gives_the_base_and_restores(merged):
    builder, model, _ = _merge_case("llama-embedding")
    ids = input_ids()
    adapted_out = _out(model, ids)
    base_out = _out(builder(0), ids)
    assert (adapted_out - base_out).abs().max() > 1e-2
    if merged:
        merge_adapters(model, unload=False)
    with disable_adapters(model) as inner:
        assert inner is model
        torch.testing.assert_close(_out(model, ids), base_out, rtol=0, atol=1e-5)
    assert all(layer.merged == merged for _, layer in adapter_layers(model))
    torch.testing.assert_close(_out(model, ids), adapted_out, rtol=0, atol=1e-5)
    # Restored even when the body raises.
    with pytest.raises(RuntimeError, match="boom"), disable_adapters(model):
        raise RuntimeError("boom")
    assert all(not layer.disabled and layer.merged == merged for _, layer in adapter_layers(model))
    torch.testing.assert_close(_out(model, ids), adapted_out, rtol=0, atol=1e-5)


# -- low-precision bases ----------------------------------------------------------------------------
def test_adapters_stay_float32_on_a_bf16_base():
    model = tiny_llama().to(torch.bfloat16)
    apply_peft(model, LoRA(r=4, alpha=8, target_modules=LLAMA_ALL + ["embed_tokens"]))
    randomize_adapters(model)
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name
    model.train()
    out = model(input_ids=input_ids(), labels=input_ids()).logits
    assert out.dtype == torch.bfloat16
    model(input_ids=input_ids(), labels=input_ids()).loss.backward()
    for _, layer in adapter_layers(model):
        assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32

    # One layer against a float64 recomputation: bf16 base output + float32 adapter update, cast once.
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        got = layer(x)
        want = layer.base_layer(x).double() + 2.0 * (x.double() @ layer.lora_A.double().T @ layer.lora_B.double().T)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)


def test_merge_into_bf16_base_computes_in_float32():
    model = tiny_llama().to(torch.bfloat16)
    apply_peft(model, LoRA(r=4, alpha=8, target_modules=["q_proj"]))
    randomize_adapters(model)
    layer = model.model.layers[0].self_attn.q_proj
    expected = (layer.base_layer.weight.double() + 2.0 * layer.lora_B.double() @ layer.lora_A.double()).to(torch.bfloat16)
    merge_adapters(model, unload=True)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.bfloat16
    torch.testing.assert_close(weight, expected, rtol=0, atol=0)


# -- config validation --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(r=0), r"positive integer, got r=0"),
        (dict(r=-1), r"positive integer, got r=-1"),
        (dict(r=2.5), r"positive integer, got r=2\.5"),
        (dict(r=True), r"positive integer, got r=True"),
        (dict(alpha=-1.0), r"alpha must be a positive finite number, got alpha=-1\.0"),
        (dict(alpha=0), r"got alpha=0"),
        (dict(alpha=float("inf")), r"got alpha=inf"),
        (dict(alpha=float("nan")), r"got alpha=nan"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\), got dropout=1\.0"),
        (dict(dropout=-0.1), r"got dropout=-0\.1"),
        (dict(dropout=float("nan")), r"got dropout=nan"),
        (dict(init="xavier"), r"unknown LoRA init 'xavier'"),
    ],
)
def test_bad_config_is_refused_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRA(target_modules=["q_proj"], **kwargs)


def test_scaling():
    assert LoRA(r=8, alpha=16).scaling == 2.0
    assert LoRA(r=16, alpha=8, rslora=True).scaling == 2.0
    # The layer uses the method's scale.
    model = tiny_llama()
    apply_peft(model, LoRA(r=16, alpha=8, rslora=True, target_modules=["q_proj"]))
    assert {layer.scaling for _, layer in adapter_layers(model)} == {2.0}

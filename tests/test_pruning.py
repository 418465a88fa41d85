"""prune_layers (LayerDrop's depth on demand, Fan et al. 2019): the pruned copy against independent references.

The references never go through prune_layers: the original model run with the dropped layers made identity by
forward hooks (what the pruned network computes, by definition), or a model built by transformers from a config
with fewer layers and filled with the original's tensors under renamed state-dict keys. Reloading goes through
save_pretrained / from_pretrained and save_adapter / load_adapter, and adapter files are compared with the full
model's file, renamed by hand.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import LLAMA_ALL, VOCAB, input_ids, logits, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from lightning_peft import (
    IA3,
    Adapter,
    BitFit,
    Compacter,
    DoRA,
    LlamaAdapter,
    LoRA,
    PrefixTuning,
    PromptTuning,
    PTuning,
    apply_peft,
    load_adapter,
    save_adapter,
)
from lightning_peft.core.adapter_layer import AdapterModule, adapter_layers
from lightning_peft.core.blocks import BlockDiscoveryError
from lightning_peft.core.fingerprint import FINGERPRINT_ATTRIBUTE, BaseModelMismatchError, base_fingerprint
from lightning_peft.core.injection import injected_method
from lightning_peft.formats.adapter_dir import WEIGHTS_NAME
from lightning_peft.operations.pruning import prune_layers

LISTS = {"llama": "model.layers", "gpt2": "transformer.h", "bert": "bert.encoder.layer"}
BUILDERS = {"llama": lambda: tiny_llama(num_hidden_layers=4), "gpt2": tiny_gpt2, "bert": tiny_bert}
AUTO = {"llama": AutoModelForCausalLM, "gpt2": AutoModelForCausalLM, "bert": AutoModelForSequenceClassification}


# -- references ------------------------------------------------------------------------------------
@contextmanager
def identity_layers(blocks: nn.ModuleList, dropped: Sequence[int]) -> Iterator[None]:
    """Run ``blocks[i]`` for ``i`` in ``dropped`` as the identity: each returns the hidden states it was given."""

    def identity(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

    handles = [blocks[i].register_forward_hook(identity, with_kwargs=True) for i in dropped]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def renamed_reference(model: nn.Module, list_name: str, keep: list[int]) -> nn.Module:
    """transformers' own model for ``len(keep)`` layers, holding the original's tensors under renamed keys."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(keep)
    reference = type(model)(config).eval()
    pattern = re.compile(rf"^{re.escape(list_name)}\.(\d+)\.")
    state = {}
    for key, tensor in model.state_dict().items():
        found = pattern.match(key)
        if found is None:
            state[key] = tensor
        elif int(found.group(1)) in keep:
            state[pattern.sub(f"{list_name}.{keep.index(int(found.group(1)))}.", key)] = tensor
    reference.load_state_dict(state, strict=True)
    return reference


def dropped(count: int, keep: Sequence[int]) -> list[int]:
    return [i for i in range(count) if i not in keep]


def snapshot(model: nn.Module) -> dict[str, object]:
    """Everything of ``model`` a pruning call could touch by mistake."""
    return {
        "logits": logits(model).detach().clone(),
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "config": model.config.to_dict(),
        "layer_idx": [(n, m.layer_idx) for n, m in model.named_modules() if "layer_idx" in vars(m)],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "fingerprint": copy.deepcopy(getattr(model, FINGERPRINT_ATTRIBUTE, None)),
        "adapters": [n for n, _ in adapter_layers(model)],
    }


def assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    after = snapshot(model)
    assert torch.equal(after["logits"], before["logits"])
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in before["state"])
    for key in ("config", "layer_idx", "requires_grad", "fingerprint", "adapters"):
        assert after[key] == before[key], key


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """Layers 0-1 full attention, 2-3 a sliding window of 3 tokens (shorter than the 7-token test inputs)."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, use_sliding_window=True, sliding_window=3, max_window_layers=2, tie_word_embeddings=False,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).float().eval()


def tiny_qwen2_moe(seed: int = 0, **overrides: object) -> Qwen2MoeForCausalLM:
    torch.manual_seed(seed)
    kwargs = {
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32,
        "num_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "tie_word_embeddings": False,
    }  # fmt: skip
    kwargs.update(overrides)
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(**kwargs)).float().eval()


# -- numerics --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_keeping_every_layer_gives_an_independent_equal_copy(arch):
    model = BUILDERS[arch]()
    count = len(model.get_submodule(LISTS[arch]))
    pruned = prune_layers(model, list(range(count)))
    assert pruned is not model
    assert torch.equal(logits(pruned), logits(model))
    assert pruned.config.num_hidden_layers == count
    with torch.no_grad():
        next(pruned.parameters()).add_(1.0)  # a copy, not a view: the original does not see it
    assert not torch.equal(logits(pruned), logits(model))


@pytest.mark.parametrize("keep", ["every_other", [1, 3], [0, 3], [2]])
def test_pruned_llama_computes_the_original_with_dropped_layers_as_identity(keep):
    model = tiny_llama(num_hidden_layers=4)
    pruned = prune_layers(model, keep)
    kept = [0, 2] if keep == "every_other" else keep
    with identity_layers(model.model.layers, dropped(4, kept)):
        expected = logits(model)
    torch.testing.assert_close(logits(pruned), expected, rtol=0, atol=1e-6)
    assert pruned.config.num_hidden_layers == len(pruned.model.layers) == len(kept)
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == list(range(len(kept)))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_pruned_model_equals_transformers_model_built_for_fewer_layers(arch):
    model = BUILDERS[arch]()
    keep = [1, 2] if arch == "llama" else [1]
    pruned = prune_layers(model, keep)
    reference = renamed_reference(model, LISTS[arch], keep)
    assert pruned.state_dict().keys() == reference.state_dict().keys()
    torch.testing.assert_close(logits(pruned), logits(reference), rtol=0, atol=1e-6)


def test_every_other_keeps_layers_0_2_4_as_fan_et_al():
    model = tiny_llama(num_hidden_layers=5)
    pruned = prune_layers(model)  # the default is the paper's strategy
    assert len(pruned.model.layers) == pruned.config.num_hidden_layers == 3
    for new, old in enumerate([0, 2, 4]):
        assert torch.equal(pruned.model.layers[new].mlp.down_proj.weight, model.model.layers[old].mlp.down_proj.weight)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_save_pretrained_and_from_pretrained_give_back_the_pruned_model(arch, tmp_path):
    model = BUILDERS[arch]()
    keep = [0, 3] if arch == "llama" else [1]
    pruned = prune_layers(model, keep)
    pruned.save_pretrained(tmp_path)
    reloaded, info = AUTO[arch].from_pretrained(tmp_path, output_loading_info=True)
    reloaded.eval()
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(reloaded) is type(model)
    assert reloaded.config.num_hidden_layers == len(keep) == len(reloaded.get_submodule(LISTS[arch]))
    assert torch.equal(logits(reloaded), logits(pruned))


def test_pruned_llama_generates_the_same_with_and_without_the_cache():
    model = tiny_llama(num_hidden_layers=4)
    pruned = prune_layers(model, [1, 3])  # kept layers 1 and 3 must use cache slots 0 and 1
    ids = input_ids(batch=2, length=5)
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    cached = pruned.generate(ids, use_cache=True, **settings)
    uncached = pruned.generate(ids, use_cache=False, **settings)
    assert torch.equal(cached, uncached)
    with identity_layers(model.model.layers, [0, 2]):
        expected = model.generate(ids, use_cache=False, **settings)
    assert torch.equal(cached, expected)


# -- config fields that depend on the layers -------------------------------------------------------
def test_layer_types_are_sliced_and_reload_with_sliding_window_layers(tmp_path):
    model = tiny_qwen2()
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    pruned = prune_layers(model, [1, 2])
    assert pruned.config.layer_types == ["full_attention", "sliding_attention"]
    with identity_layers(model.model.layers, [0, 3]):
        expected = logits(model)
    torch.testing.assert_close(logits(pruned), expected, rtol=0, atol=1e-6)
    # The slice matters: with the sliding layer run as full attention the outputs differ.
    wrong = copy.deepcopy(pruned)
    wrong.config.layer_types = ["full_attention", "full_attention"]
    assert not torch.allclose(logits(wrong), expected, atol=1e-4)

    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.layer_types == ["full_attention", "sliding_attention"]
    assert torch.equal(logits(reloaded), logits(pruned))
    ids = input_ids(batch=1, length=5)
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(pruned.generate(ids, use_cache=True, **settings), pruned.generate(ids, use_cache=False, **settings))


def test_lists_of_layer_numbers_are_renumbered(tmp_path):
    model = tiny_qwen2_moe(mlp_only_layers=[2])  # layer 2 has a dense feed-forward, the others experts
    pruned = prune_layers(model, [0, 2, 3])
    assert pruned.config.mlp_only_layers == [1]
    assert prune_layers(model, [0, 1]).config.mlp_only_layers == []
    with identity_layers(model.model.layers, [1]):
        expected = logits(model)
    torch.testing.assert_close(logits(pruned), expected, rtol=0, atol=1e-6)
    pruned.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert torch.equal(logits(reloaded.eval()), logits(pruned))


def test_a_config_that_cannot_describe_the_kept_layers_is_refused():
    # decoder_sparse_step=2: layers 1 and 3 have experts, by position. Kept at positions 0 and 1, a reload would
    # build position 0 dense, so no config can describe layers [1, 3]; [0, 1] keeps the pattern and is fine.
    model = tiny_qwen2_moe(decoder_sparse_step=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"would not reload.*decoder_sparse_step"):
        prune_layers(model, [1, 3])
    assert_unchanged(model, before)
    assert len(prune_layers(model, [0, 1]).model.layers) == 2


# -- adapters --------------------------------------------------------------------------------------
def adapted_llama(seed: int = 0) -> nn.Module:
    model = tiny_llama(seed, num_hidden_layers=4)
    apply_peft(model, LoRA(r=4, alpha=8, target_modules=LLAMA_ALL))
    randomize_adapters(model, seed=seed + 7)
    return model


def test_lora_adapters_of_kept_layers_save_and_load_under_their_new_paths(tmp_path):
    model = adapted_llama()
    pruned = prune_layers(model, "every_other")
    with identity_layers(model.model.layers, [1, 3]):
        expected = logits(model)
    torch.testing.assert_close(logits(pruned), expected, rtol=0, atol=1e-6)
    assert injected_method(pruned) == injected_method(model)

    save_adapter(model, tmp_path / "full")
    save_adapter(pruned, tmp_path / "pruned")
    full = load_file(str(tmp_path / "full" / WEIGHTS_NAME))
    written = load_file(str(tmp_path / "pruned" / WEIGHTS_NAME))
    # The full model's file with layers 0 and 2 renamed to 0 and 1 by hand, layers 1 and 3 left out.
    renamed = {}
    for key, tensor in full.items():
        layer = int(re.search(r"\.layers\.(\d+)\.", key).group(1))
        if layer in (0, 2):
            renamed[key.replace(f".layers.{layer}.", f".layers.{layer // 2}.")] = tensor
    assert sorted(written) == sorted(renamed)
    assert len(written) == 2 * len(LLAMA_ALL) * 2  # 2 layers x 7 projections x (A, B)
    assert all(torch.equal(written[key], renamed[key]) for key in written)

    fresh = prune_layers(tiny_llama(num_hidden_layers=4), "every_other")
    load_adapter(fresh, tmp_path / "pruned")
    assert torch.equal(logits(fresh), logits(pruned))
    # The pruned model's file belongs to pruned bases only: the full base has other weights at layers.1.
    with pytest.raises(BaseModelMismatchError, match="different base model"):
        load_adapter(tiny_llama(num_hidden_layers=4), tmp_path / "pruned")


@pytest.mark.parametrize(
    ("arch", "make"),
    [
        ("llama", lambda: DoRA(r=2)),
        ("llama", lambda: IA3()),
        ("llama", lambda: Adapter()),
        ("llama", lambda: Compacter(reduction_factor=4)),  # rule matrices shared across layers stay shared
        ("llama", lambda: PTuning(num_virtual_tokens=3)),
        ("gpt2", lambda: BitFit()),
    ],
    ids=["DoRA", "IA3", "Adapter", "Compacter", "PTuning", "BitFit"],
)
def test_other_methods_prune_with_their_layers(arch, make, tmp_path):
    model = BUILDERS[arch]()
    apply_peft(model, make())
    randomize_adapters(model, seed=11)
    keep = [1, 3] if arch == "llama" else [1]
    pruned = prune_layers(model, keep)
    count = len(model.get_submodule(LISTS[arch]))
    with identity_layers(model.get_submodule(LISTS[arch]), dropped(count, keep)):
        expected = logits(model)
    torch.testing.assert_close(logits(pruned), expected, rtol=0, atol=1e-6)
    save_adapter(pruned, tmp_path)
    fresh = load_adapter(prune_layers(BUILDERS[arch](), keep), tmp_path)
    assert torch.equal(logits(fresh), logits(pruned))


def test_the_remembered_base_fingerprint_describes_the_kept_layers():
    model = adapted_llama()
    pruned = prune_layers(model, [0, 3])
    remembered = getattr(pruned, FINGERPRINT_ATTRIBUTE)
    assert remembered == base_fingerprint(pruned)
    assert {re.search(r"layers\.(\d+)\.", n).group(1) for n in remembered["tensors"] if ".layers." in n} == {"0", "1"}
    # Taken from transformers' own 2-layer model holding layers 0 and 3, adapted the same way (frozen, unmerged).
    reference = renamed_reference(tiny_llama(num_hidden_layers=4), "model.layers", [0, 3])
    apply_peft(reference, LoRA(r=4, alpha=8, target_modules=LLAMA_ALL))
    assert remembered["tensors"] == base_fingerprint(reference)["tensors"]
    # The original keeps its own.
    assert any(".layers.3." in name for name in getattr(model, FINGERPRINT_ATTRIBUTE)["tensors"])


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_keeps_the_kept_layers_keys_and_values(projection, tmp_path):
    model = tiny_llama(num_hidden_layers=4)
    apply_peft(model, PrefixTuning(num_virtual_tokens=3, projection=projection))
    pruned = prune_layers(model, [0, 3])
    with identity_layers(model.model.layers, [1, 2]):
        expected = logits(model)
    torch.testing.assert_close(logits(pruned), expected, rtol=0, atol=1e-6)
    # Generation through the cache the prefix is fed in as (one slot per kept layer) matches the reference too.
    ids = input_ids(batch=1, length=5)
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "use_cache": True}
    with identity_layers(model.model.layers, [1, 2]):
        expected_tokens = model.generate(ids, **settings)
    assert torch.equal(pruned.generate(ids, **settings), expected_tokens)

    save_adapter(pruned, tmp_path)
    fresh = prune_layers(tiny_llama(num_hidden_layers=4), [0, 3])
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), logits(pruned), rtol=0, atol=1e-6)


def test_prompt_tuning_survives_pruning(tmp_path):
    model = tiny_llama(num_hidden_layers=4)
    apply_peft(model, PromptTuning(num_virtual_tokens=3))
    pruned = prune_layers(model, [1, 2])
    with identity_layers(model.model.layers, [0, 3]):
        expected = logits(model)
    torch.testing.assert_close(logits(pruned), expected, rtol=0, atol=1e-6)
    save_adapter(pruned, tmp_path)
    fresh = load_adapter(prune_layers(tiny_llama(num_hidden_layers=4), [1, 2]), tmp_path)
    assert torch.equal(logits(fresh), logits(pruned))


def test_llama_adapter_on_the_top_layers_prunes_when_they_stay_on_top(tmp_path):
    model = tiny_llama(num_hidden_layers=4)
    apply_peft(model, LlamaAdapter(adapter_len=2, adapter_layers=2))
    randomize_adapters(model, seed=5)
    pruned = prune_layers(model, [2, 3])
    with identity_layers(model.model.layers, [0, 1]):
        expected = logits(model)
    torch.testing.assert_close(logits(pruned), expected, rtol=0, atol=1e-6)
    save_adapter(pruned, tmp_path)
    fresh = load_adapter(prune_layers(tiny_llama(num_hidden_layers=4), [2, 3]), tmp_path)
    assert torch.equal(logits(fresh), logits(pruned))


def test_adapters_the_method_would_not_put_back_are_refused():
    # LLaMA-Adapter adapts the top 2 layers; keeping layers 0 and 2 leaves an adapter on the lower layer only.
    model = tiny_llama(num_hidden_layers=4)
    apply_peft(model, LlamaAdapter(adapter_len=2, adapter_layers=2))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"would select other modules.*model\.layers\.0\.self_attn"):
        prune_layers(model, [0, 2])
    assert_unchanged(model, before)


def test_target_modules_naming_a_renumbered_layer_are_refused():
    model = tiny_llama(num_hidden_layers=4)
    apply_peft(model, LoRA(r=2, target_modules=["layers.3.self_attn.q_proj"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"no longer fits.*layers\.3\.self_attn\.q_proj"):
        prune_layers(model, [0, 3])
    assert_unchanged(model, before)


# -- the input is never changed --------------------------------------------------------------------
def test_the_original_is_unchanged_by_pruning_and_by_a_failed_call():
    model = adapted_llama()
    before = snapshot(model)
    pruned = prune_layers(model, [1, 2])
    assert len(pruned.model.layers) == 2
    assert_unchanged(model, before)
    assert len(model.model.layers) == model.config.num_hidden_layers == 4
    with pytest.raises(ValueError, match="out of range"):
        prune_layers(model, [0, 9])
    assert_unchanged(model, before)
    # The copy does not share the config or any tensor with the original.
    pruned.config.num_hidden_layers = 1
    assert model.config.num_hidden_layers == 4
    assert not {p.data_ptr() for p in pruned.parameters()} & {p.data_ptr() for p in model.parameters()}


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("keep", "match"),
    [
        ([], r"keep=\[\] keeps no layer.*0 to 3.*4 layers"),
        ([0, 4], r"layer index 4 in keep=\[0, 4\] is out of range: the model has 4 layers \(indices 0 to 3"),
        ([-1], r"layer index -1 .*out of range.*negative indices are not accepted"),
        ([0, 2, 2], r"layer index 2 appears 2 times in keep=\[0, 2, 2\]; each layer can be kept once"),
        ([0, "1"], r"keep\[1\]='1' is not an int"),
        ([0, 1.0], r"keep\[1\]=1\.0 is not an int"),
        ([True], r"keep\[0\]=True is not an int"),
        ("every_third", r"keep='every_third' is not a known choice; give 'every_other'"),
        ([2, 0], r"keep=\[2, 0\] is not in increasing order; layers cannot be reordered meaningfully.*keep=\[0, 2\]"),
        ({0, 2}, r"keep=\{0, 2\} is not 'every_other' or a list of layer indices"),
        (2, r"keep=2 is not 'every_other' or a list of layer indices"),
    ],
)
def test_bad_keep_is_refused_naming_the_value(keep, match):
    model = tiny_llama(num_hidden_layers=4)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        prune_layers(model, keep)
    assert_unchanged(model, before)


def test_models_without_a_single_block_list_are_refused():
    with pytest.raises(BlockDiscoveryError, match="found no transformer block list in Sequential"):
        prune_layers(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), [0])
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4))
    with pytest.raises(BlockDiscoveryError, match=r"has 2 block lists \('encoder\.block', 'decoder\.block'\)"):
        prune_layers(t5, [0])


def test_adapter_modules_it_does_not_know_are_refused():
    class Controller(AdapterModule):  # attached beside the layers, like a training-time controller
        def __init__(self, blocks: list[nn.Module]) -> None:
            super().__init__()
            object.__setattr__(self, "blocks", blocks)

    model = tiny_llama(num_hidden_layers=4)
    model.add_module("controller", Controller(list(model.model.layers)))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"does not know how to prune: controller \(Controller\)"):
        prune_layers(model, [0, 1])
    assert_unchanged(model, before)


def test_a_model_without_a_config_is_refused():
    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    with pytest.raises(ValueError, match=r"Stack has no config\.num_hidden_layers"):
        prune_layers(Stack(), [0])

"""Each probe of lightning_peft.core.transformers_compat against the installed transformers.

The suite runs on the newest transformers (CI's first stage) and on the oldest one pyproject.toml admits
(the lower-bound stage, .ci/constraints-lowest.txt), so every probe is checked on both. Each test asserts
what the probe must find by looking at the object independently (a real call, the cache's own tensors),
not by restating the probe's logic.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import transformers
from torch import nn

from lightning_peft.core import transformers_compat as compat
from tiny_models import input_ids, tiny_bert, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_cache_argument_is_the_name_the_model_really_reads(build):
    model = build(0).eval()
    name = compat.cache_argument(model)
    assert name in compat.CACHE_ARGUMENT_NAMES
    ids = input_ids()
    with torch.no_grad():
        first = model(input_ids=ids[:, :4], use_cache=True)
        cache = compat.output_cache(first)
        # Continuing with the cache under the probed name must equal a full recomputation: the model read it.
        step = model(input_ids=ids[:, 4:5], use_cache=True, **{name: cache})
        full = model(input_ids=ids[:, :5])
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, 4], rtol=1e-5, atol=1e-5)


def test_cache_argument_is_none_for_a_model_without_one():
    class NoCache(nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    assert compat.cache_argument(NoCache()) is None


def test_the_other_spelling_is_not_in_the_signature():
    # The probe must pick the one spelling this release's forward declares (transformers refuses both at once).
    parameters = inspect.signature(tiny_llama(0).forward).parameters
    name = compat.cache_argument(tiny_llama(0))
    others = [n for n in compat.CACHE_ARGUMENT_NAMES if n != name]
    assert name in parameters and not any(n in parameters for n in others)


def test_set_call_cache_replaces_the_other_spelling():
    model = tiny_llama(0)
    name = compat.cache_argument(model)
    call = {"past_key_values": "old", "cache": "old"}
    compat.set_call_cache(model, call, "new")
    assert call == {name: "new"}
    assert compat.call_cache({"past_key_values": "x"}) == "x" and compat.call_cache({"cache": "y"}) == "y"
    assert compat.call_cache({}) is None


def test_output_cache_reads_the_returned_cache_without_a_deprecation_warning():
    model = tiny_llama(0).eval()
    with torch.no_grad():
        output = model(input_ids=input_ids(), use_cache=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = compat.output_cache(output)
    assert isinstance(cache, transformers.Cache)
    assert cache.get_seq_length() == input_ids().shape[1]


def test_new_dynamic_cache_is_empty_and_fills_like_the_models_own():
    model = tiny_llama(0).eval()
    ids = input_ids()
    cache = compat.new_dynamic_cache(model.config)
    assert isinstance(cache, transformers.DynamicCache) and compat.cache_length(cache) == 0
    name = compat.cache_argument(model)
    with torch.no_grad():
        ours = model(input_ids=ids, use_cache=True, **{name: cache}).logits
        reference = model(input_ids=ids).logits
    torch.testing.assert_close(ours, reference)
    assert compat.cache_length(cache) == ids.shape[1]


def test_cache_layer_states_are_the_layers_keys_and_values():
    model = tiny_llama(0).eval()
    ids = input_ids()
    with torch.no_grad():
        cache = compat.output_cache(model(input_ids=ids, use_cache=True))
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    layer = model.model.layers[0].self_attn
    for index in range(config.num_hidden_layers):
        keys, values = compat.cache_layer_states(cache, index)
        assert keys.shape == values.shape == (ids.shape[0], config.num_key_value_heads, ids.shape[1], head_dim)
    # Layer 0's values are v_proj of the first layer's normed input: recompute them independently.
    hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    expected = layer.v_proj(hidden).view(ids.shape[0], ids.shape[1], -1, head_dim).transpose(1, 2)
    torch.testing.assert_close(compat.cache_layer_states(cache, 0)[1], expected, rtol=1e-5, atol=1e-6)


def test_cache_length_refuses_a_legacy_tuple():
    assert compat.cache_length(None) == 0
    with pytest.raises(TypeError, match="tuple.*not a transformers Cache"):
        compat.cache_length(((torch.zeros(1),),))


def test_checkpointing_switches_on_and_off():
    model = tiny_llama(0)
    assert not compat.checkpointing_enabled(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the deprecated spelling warns on releases that renamed it
        compat.enable_checkpointing(model, use_reentrant=False)
        assert compat.checkpointing_enabled(model)
        compat.disable_checkpointing(model)
        assert not compat.checkpointing_enabled(model)


def test_checkpointing_really_recomputes():
    # Enabled means the layers' forwards run again in backward: count them.
    model = tiny_llama(0).train()
    calls = []
    # A pre-hook: torch stops a non-reentrant recompute as soon as the saved tensors are back, which can be
    # inside the last module, before its forward hooks would run.
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *args: calls.append(1))
    compat.enable_checkpointing(model, use_reentrant=False)
    model(input_ids=input_ids(), labels=input_ids()).loss.backward()
    assert len(calls) == 2


def test_encoders_cache_argument_matches_their_signature():
    model = tiny_bert(0)
    parameters = inspect.signature(model.forward).parameters
    name = compat.cache_argument(model)
    assert name is None or name in parameters or name in inspect.signature(model.base_model.forward).parameters


def test_a_head_without_kwargs_takes_only_the_cache_it_names():
    class Backbone(nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    class StrictHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.base_model = Backbone()

        def forward(self, input_ids, labels=None):
            return self.base_model(input_ids)

    class PassingHead(StrictHead):
        def forward(self, input_ids, **kwargs):
            return self.base_model(input_ids, **kwargs)

    assert compat.cache_argument(StrictHead()) is None
    assert compat.cache_argument(PassingHead()) == "past_key_values"


def _attention_call(model: nn.Module) -> tuple[nn.Module, dict, object]:
    """The first attention module of ``model``, the arguments it was really called with, and its output."""
    attention = model.model.layers[0].self_attn
    seen = {}

    def record(module, args, kwargs, output):
        seen["call"] = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        seen["output"] = output

    handle = attention.register_forward_hook(record, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=input_ids())
    handle.remove()
    return attention, seen["call"], seen["output"]


def test_rotary_tables_and_function_reproduce_the_layers_own_rotation():
    model = tiny_llama(0).eval()
    attention, call, _ = _attention_call(model)
    cos, sin = compat.attention_rotary_tables(call)
    rotate = compat.rotary_function(attention)
    assert rotate is not None and cos.shape == sin.shape and cos.shape[-1] == attention.head_dim
    # RoPE by its definition (Su et al. 2021, the rotate-half form Llama uses), in float64.
    q = torch.randn(1, 2, cos.shape[-2], attention.head_dim, dtype=torch.float64)
    half = attention.head_dim // 2
    rotated_half = torch.cat([-q[..., half:], q[..., :half]], dim=-1)
    expected = q * cos.double()[:, None] + rotated_half * sin.double()[:, None]
    got, _ = rotate(q, q, cos.double(), sin.double())
    torch.testing.assert_close(got, expected)


def test_rotary_function_is_none_where_the_model_has_no_rope():
    model = tiny_gpt2(0)
    assert compat.rotary_function(model.transformer.h[0].attn) is None
    assert compat.attention_rotary_tables({"hidden_states": torch.zeros(1)}) is None


def test_split_attention_output_finds_the_tensor_the_layer_adds_to_its_residual():
    model = tiny_llama(0).eval()
    attention, call, output = _attention_call(model)
    attn_output, rest = compat.split_attention_output(output)
    with torch.no_grad():
        direct = attention(**call)
    torch.testing.assert_close(attn_output, compat.split_attention_output(direct)[0])
    assert attn_output.shape == call["hidden_states"].shape and isinstance(rest, tuple)
    only, none = compat.split_attention_output(attn_output)
    assert only is attn_output and none == ()


def test_saved_tokenizer_config_names_a_class_every_supported_release_reads(tmp_path):
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "to": 1, "be": 2, "or": 3, "not": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path)
    written = json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert compat.make_tokenizer_config_portable(tmp_path) == (written in compat.PORTABLE_TOKENIZER_CLASSES)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] not in compat.PORTABLE_TOKENIZER_CLASSES
    assert AutoTokenizer.from_pretrained(tmp_path)("to be or not")["input_ids"] == [1, 2, 3, 4]
    assert compat.make_tokenizer_config_portable(tmp_path) is False  # idempotent
    assert compat.make_tokenizer_config_portable(tmp_path / "missing") is False

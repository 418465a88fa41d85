"""Property-based tests (hypothesis): target matching against its definition, merge/unmerge round trips
against the float64 closed form, and adapter-file loading of arbitrary bytes (always our error, never a
crash or a hang)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_peft import LoRA, apply_peft, merge_adapters, unmerge_adapters
from lightning_peft.core.adapter_layer import adapter_layers
from lightning_peft.core.targets import find_targets
from lightning_peft.formats.adapter_dir import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError, read_adapter_dir

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SEGMENT = st.sampled_from(["q", "k", "v", "proj", "q_proj", "attn", "mlp", "0", "1", "layers"])


def tree_of(paths: list[list[str]]) -> nn.Module:
    """A module whose leaves are Linear layers at the given dotted paths (containers made on the way)."""
    root = nn.Module()
    for path in paths:
        node = root
        for depth, part in enumerate(path):
            child = node._modules.get(part)
            if child is None:
                child = nn.Linear(2, 2) if depth == len(path) - 1 else nn.Module()
                node.add_module(part, child)
            elif isinstance(child, nn.Linear) and depth < len(path) - 1:
                break  # a Linear cannot hold children: this path ends where another one's leaf is
            node = child
    return root


@SETTINGS
@given(paths=st.lists(st.lists(SEGMENT, min_size=1, max_size=3), min_size=1, max_size=6), key=SEGMENT)
def test_suffix_targets_are_exactly_the_names_equal_to_or_ending_in_dot_key(paths, key):
    model = tree_of(paths)
    names = [n for n, _ in model.named_modules() if n]
    expected = [n for n in names if n == key or n.endswith("." + key)]
    linear_only = all(isinstance(model.get_submodule(n), nn.Linear) for n in expected)
    if not expected:
        with pytest.raises(ValueError, match="matched no module"):
            find_targets(model, [key])
    elif not linear_only:
        with pytest.raises(ValueError, match="cannot wrap"):
            find_targets(model, [key])
    else:
        assert find_targets(model, [key]) == expected


@SETTINGS
@given(
    d_in=st.integers(1, 12), d_out=st.integers(1, 12), r=st.integers(1, 4), alpha=st.floats(0.5, 32), rslora=st.booleans(),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_merge_then_unmerge_round_trips_and_equals_the_closed_form(d_in, d_out, r, alpha, rslora, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    original = model[0].weight.detach().double().clone()
    apply_peft(model, LoRA(r=r, alpha=alpha, rslora=rslora, target_modules=["0"]))
    (_, layer), = adapter_layers(model)
    with torch.no_grad():
        layer.lora_B.normal_()
    scale = alpha / (r**0.5 if rslora else r)
    closed_form = original + scale * layer.lora_B.double() @ layer.lora_A.double()
    x = torch.randn(3, d_in)
    unmerged = model(x).double()
    merge_adapters(model, unload=False)
    tolerance = 1e-5 * (1 + closed_form.abs().max().item())
    torch.testing.assert_close(layer.base_layer.weight.double(), closed_form, rtol=0, atol=tolerance)
    torch.testing.assert_close(model(x).double(), unmerged, rtol=0, atol=tolerance * (1 + x.abs().sum(-1).max().item()))
    unmerge_adapters(model)
    torch.testing.assert_close(layer.base_layer.weight.double(), original, rtol=0, atol=tolerance)


VALID_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}


def _adapter_dir(tmp_path_factory, weights: bytes):
    directory = tmp_path_factory.mktemp("fuzz")
    (directory / CONFIG_NAME).write_text(json.dumps(VALID_CONFIG))
    (directory / WEIGHTS_NAME).write_bytes(weights)
    return directory


@SETTINGS
@given(data=st.binary(max_size=512))
def test_random_bytes_are_refused_with_our_error(tmp_path_factory, data):
    with pytest.raises(AdapterFileError):
        read_adapter_dir(_adapter_dir(tmp_path_factory, data))


header_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**40) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@SETTINGS
@given(
    header=st.dictionaries(st.text(max_size=12), header_values, max_size=4),
    tensor=st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "I64", "XX"]), "shape": st.lists(st.integers(-2, 2**31), max_size=3),
                                  "data_offsets": st.lists(st.integers(-2, 2**31), max_size=3)}),
    tail=st.binary(max_size=64), claimed=st.integers(0, 2**20),
)  # fmt: skip
def test_valid_looking_headers_with_bad_contents_are_refused_with_our_error(tmp_path_factory, header, tensor, tail, claimed):
    body = json.dumps({**header, "base_model.model.q_proj.lora_A.weight": tensor}).encode()
    for length in (len(body), claimed):  # the true header length, and a wrong one
        data = struct.pack("<Q", length) + body + tail
        try:
            read_adapter_dir(_adapter_dir(tmp_path_factory, data))
        except AdapterFileError:
            continue
        # Accepted: then it must really be a well-formed safetensors file (hypothesis built a valid one).
        from safetensors.torch import load

        assert load(data)

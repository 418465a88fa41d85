"""The peft adapter file format: round trips with HF peft both ways, the exact keys, metadata and config
fields, refusal of bad adapter directories and of the wrong base model, and atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lightning_peft.formats.peft_format as peft_format
import lightning_peft.formats.atomic as atomic
from lightning_peft import (
    AdapterFileError,
    BaseModelMismatchError,
    LoRA,
    apply_peft,
    load_adapter,
    merge_adapters,
    save_adapter,
)
from lightning_peft.core.adapter_layer import adapter_layers
from adapter_files import rewrite_metadata, rewrite_tensors
from tiny_models import (
    LLAMA_ALL,
    input_ids,
    logits,
    peft_lora_names,
    randomize_adapters,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_llama_classifier,
)


# name -> (builder, LoRA kwargs, peft task_type)
CASES = {
    "llama": (tiny_llama, dict(r=4, alpha=8, target_modules=LLAMA_ALL), "CAUSAL_LM"),
    "llama-embedding": (tiny_llama, dict(r=4, alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"]), "CAUSAL_LM"),
    "gpt2": (tiny_gpt2, dict(r=4, alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]), "CAUSAL_LM"),
    "gpt2-wte": (tiny_gpt2, dict(r=4, alpha=16, target_modules=["wte", "c_attn"]), "CAUSAL_LM"),
    "rslora": (tiny_llama, dict(r=8, alpha=4, rslora=True, target_modules=["q_proj", "down_proj"]), "CAUSAL_LM"),
    "bert-cls": (tiny_bert, dict(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]), "SEQ_CLS"),
    "llama-cls": (tiny_llama_classifier, dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["score"]), "SEQ_CLS"),
}


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return logits(model, input_ids())


def ours_trained(case: str) -> nn.Module:
    """Our adapted model with random non-zero adapters and (where there is one) a changed head."""
    builder, kwargs, _ = CASES[case]
    model = builder(0)
    apply_peft(model, LoRA(**kwargs))
    randomize_adapters(model, seed=5)
    with torch.no_grad():
        for name in kwargs.get("modules_to_save", []):
            for param in model.get_submodule(name).parameters():
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(9)))
    return model


def peft_trained(case: str) -> nn.Module:
    """The same in HF peft, with its own random non-zero adapter values."""
    builder, kwargs, task_type = CASES[case]
    config = LoraConfig(
        r=kwargs["r"],
        lora_alpha=kwargs["alpha"],
        target_modules=list(kwargs["target_modules"]),
        use_rslora=kwargs.get("rslora", False),
        fan_in_fan_out=builder is tiny_gpt2,
        # A copy: peft appends "classifier" and "score" to the list it is given for SEQ_CLS.
        modules_to_save=list(kwargs["modules_to_save"]) if "modules_to_save" in kwargs else None,
        task_type=task_type,
    )
    model = get_peft_model(builder(0), config)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:  # LoRA A/B and the trainable copy of the head
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


# -- round trips with HF peft -----------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_our_adapter_loads_in_peft(case, tmp_path):
    model = ours_trained(case)
    expected = _out(model)
    assert (expected - _out(CASES[case][0](0))).abs().max() > 1e-2  # the adapter matters
    save_adapter(model, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(CASES[case][0](0), tmp_path / "adapter").eval()
    assert peft_lora_names(theirs) == sorted(name for name, _ in adapter_layers(model))
    torch.testing.assert_close(_out(theirs), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_ours(case, tmp_path):
    theirs = peft_trained(case)
    expected = _out(theirs)
    assert (expected - _out(CASES[case][0](0))).abs().max() > 1e-2
    theirs.save_pretrained(tmp_path / "adapter")
    model = load_adapter(CASES[case][0](0), tmp_path / "adapter")
    assert sorted(name for name, _ in adapter_layers(model)) == peft_lora_names(theirs)
    torch.testing.assert_close(_out(model), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["llama", "gpt2-wte", "bert-cls"])
def test_our_round_trip(case, tmp_path):
    model = ours_trained(case)
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(CASES[case][0](0), tmp_path / "adapter")
    torch.testing.assert_close(_out(loaded), _out(model), rtol=0, atol=0)
    # The method config comes back exactly, and the loaded adapters are trainable like fresh ones.
    assert loaded._lightning_peft_method == LoRA(**CASES[case][1])
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {n for n, p in model.named_parameters() if p.requires_grad}


def test_load_into_an_already_adapted_model(tmp_path):
    model = ours_trained("llama")
    save_adapter(model, tmp_path / "adapter")
    target = tiny_llama(0)
    apply_peft(target, LoRA(**CASES["llama"][1]))
    layers_before = dict(adapter_layers(target))
    load_adapter(target, tmp_path / "adapter")
    assert all(layer is layers_before[name] for name, layer in adapter_layers(target))  # no re-injection
    torch.testing.assert_close(_out(target), _out(model), rtol=0, atol=0)


# -- what is in the files -----------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_file_has_peft_keys_metadata_and_config(case, tmp_path):
    builder, kwargs, task_type = CASES[case]
    model = ours_trained(case)
    save_adapter(model, tmp_path / "ours")
    files = sorted(p.name for p in (tmp_path / "ours").iterdir() if not p.name.startswith("."))  # + our hidden file list
    assert files == ["adapter_config.json", "adapter_model.safetensors"]

    # Keys, written out independently of the package: base_model.model.<path>.<peft suffix>.
    expected_keys = set()
    for name, module in builder(0).named_modules():
        if name.rsplit(".", 1)[-1] in kwargs["target_modules"]:
            suffixes = ("lora_embedding_A", "lora_embedding_B") if isinstance(module, nn.Embedding) else ("lora_A.weight", "lora_B.weight")
            expected_keys |= {f"base_model.model.{name}.{s}" for s in suffixes}
    for head in kwargs.get("modules_to_save", []):
        expected_keys |= {f"base_model.model.{head}.{p}" for p, _ in builder(0).get_submodule(head).named_parameters()}
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(tensors) == expected_keys
    assert all(t.dtype == torch.float32 for t in tensors.values())

    # And the same keys and shapes as peft writes for the same config.
    peft_trained(case).save_pretrained(tmp_path / "peft")
    peft_tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    peft_tensors = {k: v for k, v in peft_tensors.items() if ".base_layer." not in k}  # peft's embedding copy
    assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in peft_tensors.items()}

    with safe_open(tmp_path / "ours" / "adapter_model.safetensors", framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "pt"

    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == task_type
    assert config["r"] == kwargs["r"] and config["lora_alpha"] == kwargs["alpha"]
    assert config["use_rslora"] is kwargs.get("rslora", False)
    assert config["fan_in_fan_out"] is (builder is tiny_gpt2)  # GPT-2's Conv1D stores W as (in, out)
    assert config["modules_to_save"] == kwargs.get("modules_to_save")
    # vLLM's multi-LoRA serving: no DoRA, target_modules a list of leaf names.
    assert config["use_dora"] is False
    assert not any("magnitude" in k for k in tensors)
    assert config["target_modules"] == sorted(kwargs["target_modules"])
    # peft's own config class accepts every field.
    assert LoraConfig.from_pretrained(tmp_path / "ours").r == kwargs["r"]


def test_llama_is_not_fan_in_fan_out(tmp_path):
    save_adapter(ours_trained("llama"), tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    save_adapter(ours_trained("gpt2"), tmp_path / "b")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_partial_selection_is_written_as_an_exact_regex(tmp_path):
    # Leaf names would over-select when only some q_proj are adapted: the config must say exactly which.
    model = tiny_llama(0)
    apply_peft(model, LoRA(r=4, target_modules=["q_proj", "v_proj"], exclude_modules=r"model\.layers\.0\..*"))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "a")
    field = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(field, str)
    theirs = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "a").eval()
    assert peft_lora_names(theirs) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    torch.testing.assert_close(_out(theirs), _out(model), rtol=0, atol=1e-5)


def test_peft_adapter_targeting_lm_head_loads(tmp_path):
    # peft writes the full lm_head weight beside adapters on lm_head (save_embedding_layers="auto").
    config = LoraConfig(r=4, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")
    theirs = get_peft_model(tiny_llama(0), config)
    with torch.no_grad():
        for param in theirs.parameters():
            if param.requires_grad:
                param.add_(0.1)
    theirs.save_pretrained(tmp_path / "a")
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "a" / "adapter_model.safetensors")
    model = load_adapter(tiny_llama(0), tmp_path / "a")
    torch.testing.assert_close(_out(model), _out(theirs.eval()), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("field", "value"),
    [("alpha_pattern", {"q_proj": 32}), ("rank_pattern", {"v_proj": 2}), ("layers_to_transform", [1]), ("bias", "lora_only")],
)
def test_peft_patterns_are_honoured_or_refused(field, value, tmp_path):
    # A per-module alpha or rank that the loader ignored would give silently wrong outputs.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **{field: value})
    theirs = get_peft_model(tiny_llama(0), config)
    with torch.no_grad():
        for param in theirs.parameters():
            if param.requires_grad:
                param.add_(0.1)
    theirs.save_pretrained(tmp_path / "a")
    try:
        model = load_adapter(tiny_llama(0), tmp_path / "a")
    except (ValueError, AdapterFileError) as err:
        assert field in str(err)
    else:
        torch.testing.assert_close(_out(model), _out(theirs.eval()), rtol=0, atol=1e-5)


# -- bad adapter directories ------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "adapter"
    save_adapter(ours_trained("llama"), path)
    return path


def _rewrite(path: Path, change) -> None:
    rewrite_tensors(path, change)  # a consistent rewrite: the checksum follows the new tensors


def test_missing_tensor(saved):
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    _rewrite(saved, lambda t: t.pop(key))
    with pytest.raises(AdapterFileError, match=r"1 tensors missing \(e\.g\. \['" + key.replace(".", r"\.")):
        load_adapter(tiny_llama(0), saved)


def test_unexpected_tensor(saved):
    _rewrite(saved, lambda t: t.update({"base_model.model.model.norm.lora_A.weight": torch.zeros(4, 32)}))
    with pytest.raises(AdapterFileError, match=r"1 unexpected tensors \(e\.g\. \['base_model\.model\.model\.norm\.lora_A\.weight"):
        load_adapter(tiny_llama(0), saved)


def test_wrong_shape(saved):
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    _rewrite(saved, lambda t: t.update({key: torch.zeros(4, 31)}))
    with pytest.raises(AdapterFileError, match=r"k_proj\.lora_A\.weight has shape \[4, 31\], the model needs \[4, 32\]"):
        load_adapter(tiny_llama(0), saved)


def test_pickle_is_refused(saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    torch.save(tensors, saved / "adapter_model.bin")
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFileError, match=r"adapter_model\.bin is a pickle.*safetensors"):
        load_adapter(tiny_llama(0), saved)


def test_corrupt_safetensors(saved):
    (saved / "adapter_model.safetensors").write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy().tobytes())
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors is not a valid safetensors file"):
        load_adapter(tiny_llama(0), saved)


def test_truncated_safetensors(saved):
    file = saved / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(AdapterFileError, match=r"not a valid safetensors file"):
        load_adapter(tiny_llama(0), saved)


def test_not_a_directory_and_missing_files(tmp_path, saved):
    with pytest.raises(AdapterFileError, match=r"'.*nowhere' is not a directory"):
        load_adapter(tiny_llama(0), tmp_path / "nowhere")
    (saved / "adapter_config.json").unlink()
    with pytest.raises(AdapterFileError, match=r"has no adapter_config\.json"):
        load_adapter(tiny_llama(0), saved)
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json is not valid JSON"):
        load_adapter(tiny_llama(0), saved)
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFileError, match=r"has no adapter_model\.safetensors"):
        load_adapter(tiny_llama(0), saved)


def _rewrite_method_metadata(directory, edit) -> None:
    """Rewrite our method config in the safetensors header (``edit`` returns the new dict, or None to read the file
    as a peft-written one, without any of our metadata)."""
    def change(metadata):
        method = edit(json.loads(metadata.pop(peft_format.METHOD_KEY)))
        if method is None:
            for key in [k for k in metadata if k.startswith("lightning_peft.")]:
                metadata.pop(key)
        else:
            metadata[peft_format.METHOD_KEY] = json.dumps(method)

    rewrite_metadata(directory, change)


def test_unsupported_peft_type_and_dora(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    _rewrite_method_metadata(saved, lambda method: None)  # read it as a peft-written file
    (saved / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LOHA"}))
    with pytest.raises(ValueError, match=r"unsupported adapter peft_type 'LOHA'"):
        load_adapter(tiny_llama(0), saved)
    # use_dora=true reads as DoRA, whose magnitude vectors this LoRA file lacks: refused, not half-loaded.
    (saved / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterFileError, match=r"tensors missing.*lora_magnitude_vector"):
        load_adapter(tiny_llama(0), saved)


def test_wrong_base_same_architecture(saved):
    model = tiny_llama(seed=1)
    with pytest.raises(BaseModelMismatchError, match=r"different base model.*holds different values"):
        load_adapter(model, saved)
    assert not any(True for _ in adapter_layers(model))  # refused before injecting anything


def test_wrong_base_other_hidden_size(saved):
    with pytest.raises(BaseModelMismatchError, match=r"has shape \[128, 48\], the adapter in .* expects \[128, 32\]"):
        load_adapter(tiny_llama(seed=0, hidden=48), saved)


def test_peft_adapter_on_other_hidden_size(tmp_path):
    # peft's files carry no fingerprint: the shape check must still catch the mismatch.
    peft_trained("llama").save_pretrained(tmp_path / "a")
    with pytest.raises(AdapterFileError, match=r"has shape \[4, 32\], the model needs \[4, 48\]"):
        load_adapter(tiny_llama(seed=0, hidden=48), tmp_path / "a")


def test_fingerprint_tolerates_a_bf16_copy_of_the_base(saved):
    model = load_adapter(tiny_llama(0).to(torch.bfloat16), saved)
    assert len(list(adapter_layers(model))) == 14


def test_save_without_adapters_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has no adapters"):
        save_adapter(tiny_llama(0), tmp_path / "a")
    assert not (tmp_path / "a").exists()


# -- atomic writes ----------------------------------------------------------------------------------
def test_failed_save_keeps_the_old_adapter(saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(atomic, "save_file", broken_save)
    other = tiny_llama(0)
    apply_peft(other, LoRA(r=2, target_modules=["q_proj"]))
    with pytest.raises(OSError, match="disk full"):
        save_adapter(other, saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["adapter"]  # no temp dirs left behind
    monkeypatch.undo()
    torch.testing.assert_close(_out(load_adapter(tiny_llama(0), saved)), _out(ours_trained("llama")), rtol=0, atol=0)


def test_save_over_an_existing_adapter_replaces_it(saved):
    other = tiny_llama(0)
    apply_peft(other, LoRA(r=2, target_modules=["q_proj"]))
    randomize_adapters(other, seed=3)
    save_adapter(other, saved)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["adapter"]
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 2
    torch.testing.assert_close(_out(load_adapter(tiny_llama(0), saved)), _out(other), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_modules=["q_proj", "v_proj"], exclude_modules=["lm_head"]),  # excludes nothing
        dict(target_modules=["q_proj", "v_proj", "c_attn"]),  # one entry matches nothing (peft accepts it)
        dict(target_modules=["embed_tokens", "q_proj"], exclude_modules=r".*layers\.0\.self_attn\.q_proj"),
        dict(target_modules="all-linear"),  # peft writes the expanded list of full names
    ],
)
def test_peft_lenient_configs_load(kwargs, tmp_path):
    theirs = get_peft_model(tiny_llama(0), LoraConfig(r=4, task_type="CAUSAL_LM", **kwargs))
    with torch.no_grad():
        for param in theirs.parameters():
            if param.requires_grad:
                param.add_(0.1)
    theirs.save_pretrained(tmp_path / "a")
    model = load_adapter(tiny_llama(0), tmp_path / "a")
    assert sorted(name for name, _ in adapter_layers(model)) == peft_lora_names(theirs)
    torch.testing.assert_close(_out(model), _out(theirs.eval()), rtol=0, atol=1e-5)


def test_our_own_config_stays_strict(saved):
    # The leniency is for peft-written files only: our method config with a typo is still refused.
    def typo(method):
        method["init_args"]["target_modules"] = ["q_proj", "q_prj"]
        return method

    _rewrite_method_metadata(saved, typo)
    with pytest.raises(ValueError, match=r"\['q_prj'\] matched no module"):
        load_adapter(tiny_llama(0), saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_saved_from_a_merged_model_loads_on_its_base(dtype, tmp_path):
    model = tiny_llama(0).to(dtype)
    apply_peft(model, LoRA(**CASES["llama"][1]))
    # A realistic update (|s*BA| ~ 1e-3 against |W| ~ 2e-2): a bf16 merge rounds W + s*BA, and with
    # updates as large as W itself that rounding alone moves the fingerprint's sample sums.
    randomize_adapters(model, seed=5, std=0.1 if dtype == torch.float32 else 0.02)
    expected = _out(model)
    merge_adapters(model, unload=False)
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(tiny_llama(0).to(dtype), tmp_path / "a")
    torch.testing.assert_close(_out(loaded), expected, rtol=0, atol=1e-5 if dtype == torch.float32 else 5e-2)


def test_failed_move_into_place_is_finished_by_the_next_load(saved, monkeypatch):
    real_replace = atomic.os.replace
    trained = ours_trained("gpt2")

    def replace(src, dst):
        if Path(dst).name == "adapter_model.safetensors":
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(atomic.ExportWriteError, match="put in place by the next save or load"):
        save_adapter(trained, saved)
    monkeypatch.undo()
    # The new export was complete and committed: the next read moves it into place, whole.
    fresh = load_adapter(tiny_gpt2(0), saved)
    for (name, ours), (_, loaded) in zip(adapter_layers(trained), adapter_layers(fresh)):
        assert torch.equal(ours.lora_B, loaded.lora_B), name
    assert sorted(p.name for p in saved.iterdir()) == [".lightning_peft-files.json", "adapter_config.json", "adapter_model.safetensors"]

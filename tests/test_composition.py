"""Several methods on one model (``Composition``): the composed forward against a reference built from each method
alone, freezing, refusals that name the pair, files (peft's for one exported member, ours for several), merging,
adapter-only checkpoints that resume exactly, and parameter groups."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_helpers import LitCausalLM, make_trainer, token_loader
from peft import PeftModel
from tiny_models import input_ids, logits, randomize_adapters, tiny_bert, tiny_llama

from lightning_peft import (
    IA3,
    BitFit,
    Composition,
    LayerDrop,
    LlamaAdapter,
    LoRA,
    PEFTCallback,
    PrefixTuning,
    PromptTuning,
    apply_peft,
    load_adapter,
    merge_adapters,
    param_groups,
    save_adapter,
)
from lightning_peft.core.adapter_layer import adapter_modules
from lightning_peft.core.injection import set_submodule
from lightning_peft.formats.adapter_dir import read_adapter_dir
from lightning_peft.methods.composition import as_method


def lora_and_ia3() -> Composition:
    return Composition([LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), IA3(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])])


def test_composed_forward_equals_each_methods_own_layers_put_into_one_base():
    model = tiny_llama()
    apply_peft(model, lora_and_ia3())
    randomize_adapters(model, seed=3)
    # Reference: each method applied alone to its own copy of the base, its tensors copied from the composed
    # model, then its layers moved into one more copy of the base: no Composition code involved.
    alone = {}
    for method in (LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), IA3(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])):
        single = tiny_llama()
        apply_peft(single, method)
        alone.update(dict(adapter_modules(single)))
    composed = dict(adapter_modules(model))
    assert set(alone) == set(composed) and len(composed) == 8
    reference = tiny_llama()
    with torch.no_grad():
        for name, layer in alone.items():
            for (key, param), (_, ours) in zip(layer.adapter_named_parameters(), composed[name].adapter_named_parameters()):
                param.copy_(ours)
            set_submodule(reference, name, layer)
    ids = input_ids()
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=0)
    assert not torch.allclose(logits(model, ids), logits(tiny_llama(), ids))  # the adapters do change the output


def test_only_every_members_adapters_and_saved_modules_train():
    model = tiny_bert()
    apply_peft(model, Composition([LoRA(r=2, target_modules=["query"], modules_to_save=["classifier"]), BitFit(target_modules=["key"])]))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    expected = sorted(
        [f"bert.encoder.layer.{i}.attention.self.query.lora_{m}" for i in range(2) for m in "AB"]
        + [f"bert.encoder.layer.{i}.attention.self.key.bias_delta" for i in range(2)]
        + ["classifier.weight", "classifier.bias"]
    )
    assert trainable == expected


def test_a_list_is_a_composition_and_one_item_is_the_method_itself():
    lora = LoRA(r=2)
    assert as_method([lora]) is lora
    composed = as_method([lora, LayerDrop(p=0.1)])
    assert isinstance(composed, Composition) and composed.methods == [lora, LayerDrop(p=0.1)]
    assert PEFTCallback([lora, LayerDrop(p=0.1)]).method == composed
    nested = Composition([Composition([lora, IA3()]), LayerDrop(p=0.2)])
    assert [type(m) for m in nested.methods] == [LoRA, IA3, LayerDrop]  # flattened


def test_to_dict_rebuilds_the_same_composition():
    from lightning_peft.methods.base import method_from_dict

    composed = lora_and_ia3()
    data = json.loads(json.dumps(composed.to_dict()))  # what checkpoints and files hold
    assert method_from_dict(data) == composed
    assert method_from_dict(data) != Composition([LoRA(r=8, alpha=8, target_modules=["q_proj", "v_proj"]), IA3()])


def test_two_methods_on_one_layer_are_refused_naming_both_and_the_layer():
    model = tiny_llama()
    before = logits(model)
    with pytest.raises(ValueError, match=r"LoRA and IA3 cannot be composed on these layers: both wrap 'model.layers.0.self_attn.k_proj'"):
        apply_peft(model, Composition([LoRA(r=2, target_modules=["q_proj", "k_proj"]), IA3(target_modules=["k_proj"], feedforward_modules=[])]))
    assert not list(adapter_modules(model)) and not any(p.requires_grad is False for p in model.parameters())
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)


def test_a_wrapper_inside_another_is_refused():
    with pytest.raises(ValueError, match=r"LlamaAdapter and LoRA cannot be composed on these layers: LlamaAdapter wraps 'model.layers.1.self_attn' and LoRA wraps 'model.layers.1.self_attn.q_proj' inside it"):
        apply_peft(tiny_llama(), Composition([LlamaAdapter(adapter_len=2, adapter_layers=1), LoRA(r=2, target_modules=["q_proj"])]))


def test_two_input_methods_are_refused():
    with pytest.raises(ValueError, match=r"PromptTuning and PrefixTuning cannot be composed: both change the model's input"):
        Composition([PromptTuning(num_virtual_tokens=2), LoRA(r=2), PrefixTuning(num_virtual_tokens=2)])


def test_a_composition_of_one_method_is_refused():
    with pytest.raises(ValueError, match=r"a composition needs two or more methods, got 1"):
        Composition([LoRA(r=2)])
    with pytest.raises(TypeError, match=r"a composition takes lightning_peft methods such as LoRA\(...\), got str"):
        Composition([LoRA(r=2), "ia3"])


def test_lora_with_layerdrop_exports_a_peft_lora_directory_that_peft_reads(tmp_path):
    model = tiny_llama()
    apply_peft(model, Composition([LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), LayerDrop(p=0.5)]))
    randomize_adapters(model, seed=1)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    ids = input_ids()
    ours = logits(model.eval(), ids)
    theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    torch.testing.assert_close(theirs(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-6)


def test_several_exported_methods_write_one_directory_in_our_format_that_reloads(tmp_path):
    model = tiny_llama()
    composed = Composition([*lora_and_ia3().methods, LayerDrop(p=0.3)])
    apply_peft(model, composed)
    randomize_adapters(model, seed=2)
    save_adapter(model, tmp_path / "adapter")
    config, tensors, _ = read_adapter_dir(tmp_path / "adapter")
    assert config["format"] == "lightning_peft"
    assert config["method"]["class_path"] == "lightning_peft.methods.composition.Composition"
    assert [m["class_path"].rsplit(".", 1)[1] for m in config["method"]["init_args"]["methods"]] == ["LoRA", "IA3"]  # LayerDrop left out
    assert len(tensors) == 4 * 2 + 4  # LoRA (A, B) on q and v of 2 layers; one IA3 vector on k and down of 2 layers
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "adapter")
    ids = input_ids()
    torch.testing.assert_close(logits(fresh.eval(), ids), logits(model.eval(), ids), rtol=0, atol=0)


def test_merging_a_composition_equals_its_unmerged_output():
    model = tiny_llama()
    apply_peft(model, Composition([*lora_and_ia3().methods, LayerDrop(p=0.3)]))
    randomize_adapters(model, seed=4)
    ids = input_ids()
    before = logits(model.eval(), ids)
    merged = merge_adapters(model)
    assert not list(adapter_modules(merged)) and not hasattr(merged, "lightning_peft_layerdrop")
    torch.testing.assert_close(logits(merged, ids), before, rtol=1e-5, atol=1e-5)


def test_parameter_groups_cover_every_members_tensors():
    model = tiny_llama()
    apply_peft(model, lora_and_ia3())
    groups = param_groups(model, lr=1e-3)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}


def _fit(tmp_path, max_steps, ckpt_path=None, save_every=None):
    torch.manual_seed(0)
    module = LitCausalLM()
    method = [LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"], dropout=0.1), IA3(target_modules=["k_proj"], feedforward_modules=[]), LayerDrop(p=0.5)]
    saver = [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=save_every, save_top_k=-1)] if save_every else []
    trainer = make_trainer(tmp_path, max_steps=max_steps, callbacks=[PEFTCallback(method), *saver], enable_checkpointing=bool(saver))
    trainer.fit(module, train_dataloaders=token_loader(n_batches=3), ckpt_path=ckpt_path)  # step 3 ends an epoch
    return module, trainer


def test_a_composed_run_resumes_exactly_from_its_adapter_only_checkpoint(tmp_path):
    whole, _ = _fit(tmp_path / "whole", 6)
    _fit(tmp_path / "first", 3, save_every=3)
    (checkpoint,) = (tmp_path / "first").rglob("*.ckpt")
    saved = torch.load(checkpoint, weights_only=True)
    assert all(("lora_" in k or "ia3_l" in k) for k in saved["state_dict"])  # adapter-only
    resumed, _ = _fit(tmp_path / "second", 6, ckpt_path=checkpoint)
    assert {s: resumed.step_losses[s] for s in (4, 5, 6)} == {s: whole.step_losses[s] for s in (4, 5, 6)}
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), name


def test_layerdrop_alone_fine_tunes_every_parameter_and_exports_merged_only(tmp_path):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match=r"export_dir='.*', but LayerDrop\(p=0.2, layers=None, seed=0\) trains no adapter tensors to export"):
        make_trainer(tmp_path, callbacks=[PEFTCallback(LayerDrop(p=0.2), export_dir=str(tmp_path / "x"))]).fit(
            LitCausalLM(), train_dataloaders=token_loader()
        )
    module = LitCausalLM()
    base = copy.deepcopy(module.model)
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[PEFTCallback(LayerDrop(p=0.2), export_dir=str(tmp_path / "out"), export_merged=True)])
    trainer.fit(module, train_dataloaders=token_loader())
    assert all(p.requires_grad for p in module.model.parameters())
    assert not torch.equal(module.model.model.embed_tokens.weight, base.model.embed_tokens.weight)  # the base itself trained
    assert not (tmp_path / "out" / "adapter").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged").eval()
    ids = input_ids()
    torch.testing.assert_close(logits(reloaded, ids), logits(module.model.eval(), ids), rtol=0, atol=0)

"""PEFTCallback and PEFTMixin inside a real ``Trainer``: when injection happens, what is trained and exported."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_helpers import (
    LitCausalLM,
    LitEagerOptimizer,
    LitMLP,
    LitPEFTParallel,
    LitTwoModels,
    lora,
    logits,
    make_trainer,
    mlp_loader,
    tiny_llama,
    tiny_llama_config,
    token_loader,
    trainable_names,
)

from lightning_peft import LoRA, PEFTCallback
from lightning_peft.core.adapter_layer import adapter_layers, base_parameter_name
from lightning_peft.core.injection import injected_method


def optimizer_param_ids(trainer) -> set[int]:
    return {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}


def trainable_ids(module) -> set[int]:
    return {id(p) for p in module.parameters() if p.requires_grad}


def lora_closed_form(r: int = 4) -> int:
    """r * (in + out) summed over q_proj and v_proj of every layer of ``tiny_llama_config()``."""
    config = tiny_llama_config()
    head_dim = config.hidden_size // config.num_attention_heads
    q = r * (config.hidden_size + config.num_attention_heads * head_dim)
    v = r * (config.hidden_size + config.num_key_value_heads * head_dim)
    return config.num_hidden_layers * (q + v)


# -- injection at setup ---------------------------------------------------------------------------
class _RecordOptimizerTime(LitCausalLM):
    def configure_optimizers(self):
        self.adapters_at_configure_optimizers = len(list(adapter_layers(self.model)))
        return super().configure_optimizers()


def test_injects_at_setup_before_configure_optimizers(tmp_path):
    module = _RecordOptimizerTime()
    trainer = make_trainer(tmp_path, callbacks=[PEFTCallback(lora())], max_steps=1)
    trainer.fit(module, token_loader())
    assert module.adapters_at_configure_optimizers == 4  # q_proj and v_proj of two layers
    assert optimizer_param_ids(trainer) == trainable_ids(module)
    assert all(name.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for name in trainable_names(module))


def test_freezes_everything_but_adapters_closed_form_count(tmp_path):
    module = LitCausalLM()
    trainer = make_trainer(tmp_path, callbacks=[PEFTCallback(lora(r=4))], max_steps=1)
    trainer.fit(module, token_loader())
    adapter_ids = {id(p) for _, layer in adapter_layers(module.model) for _, p in layer.adapter_named_parameters()}
    for name, param in module.named_parameters():
        assert param.requires_grad == (id(param) in adapter_ids), name
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == lora_closed_form(4) == 896


def test_base_weights_bitwise_unchanged_adapters_trained(tmp_path):
    module = LitCausalLM()
    before = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    trainer = make_trainer(tmp_path, callbacks=[PEFTCallback(lora())], max_steps=3)
    trainer.fit(module, token_loader())
    after = {base_parameter_name(n): p for n, p in module.model.named_parameters() if not p.requires_grad}
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    lora_b = [layer.lora_B for _, layer in adapter_layers(module.model)]
    assert all(b.abs().sum() > 0 for b in lora_b)  # B starts at zero: non-zero means it trained


def test_idempotent_across_fit_validate_test(tmp_path):
    module = LitCausalLM()
    trainer = make_trainer(tmp_path, callbacks=[PEFTCallback(lora())], max_steps=2)
    trainer.fit(module, token_loader())
    layers = dict(adapter_layers(module.model))
    tensors = {n: p for n, p in module.named_parameters() if p.requires_grad}
    values = {n: p.detach().clone() for n, p in tensors.items()}
    trainer.validate(module, token_loader(n_batches=1), verbose=False)
    trainer.test(module, token_loader(n_batches=1), verbose=False)
    assert dict(adapter_layers(module.model)).keys() == layers.keys() and len(layers) == 4
    assert all(dict(adapter_layers(module.model))[n] is layer for n, layer in layers.items())
    after = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert after.keys() == tensors.keys()
    for name, param in after.items():
        assert param is tensors[name] and torch.equal(param, values[name]), name
    # No adapter was wrapped twice (a second injection would nest base_layer.base_layer).
    assert not any(".base_layer.base_layer." in n for n, _ in module.named_parameters())


def test_fit_twice_on_same_module_keeps_one_set_of_adapters(tmp_path):
    module = LitCausalLM()
    callback = PEFTCallback(lora())
    make_trainer(tmp_path, callbacks=[callback], max_steps=1).fit(module, token_loader())
    first = {n: p for n, p in module.named_parameters() if p.requires_grad}
    trainer = make_trainer(tmp_path, callbacks=[callback], max_steps=1)
    trainer.fit(module, token_loader())
    assert {n: p for n, p in module.named_parameters() if p.requires_grad} == first
    assert optimizer_param_ids(trainer) == trainable_ids(module)


# -- finding the model ------------------------------------------------------------------------------
def test_model_found_automatically_inside_module(tmp_path):
    module = LitCausalLM()
    make_trainer(tmp_path, callbacks=[PEFTCallback(lora())], max_steps=1).fit(module, token_loader())
    assert injected_method(module.model) == lora()
    assert sorted(n for n, _ in adapter_layers(module)) == sorted(
        f"model.model.layers.{i}.self_attn.{t}" for i in range(2) for t in ("q_proj", "v_proj")
    )


def test_model_attr_picks_one_of_two_models(tmp_path):
    module = LitTwoModels()
    teacher_before = {n: p.detach().clone() for n, p in module.teacher.named_parameters()}
    trainer = make_trainer(tmp_path, callbacks=[PEFTCallback(lora(), model_attr="model")], max_steps=1)
    trainer.fit(module, token_loader())
    assert len(list(adapter_layers(module.model))) == 4
    assert not list(adapter_layers(module.teacher)) and injected_method(module.teacher) is None
    assert all(torch.equal(p, teacher_before[n]) for n, p in module.teacher.named_parameters())
    assert optimizer_param_ids(trainer) == trainable_ids(module.model) == trainable_ids(module)


def test_two_models_without_model_attr_is_a_clear_error(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[PEFTCallback(lora())], max_steps=1)
    with pytest.raises(ValueError, match=r"several transformers models \(model, teacher\).*model_attr"):
        trainer.fit(LitTwoModels(), token_loader())


def test_unknown_model_attr_is_a_clear_error(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[PEFTCallback(lora(), model_attr="backbone")], max_steps=1)
    with pytest.raises(AttributeError, match="no attribute 'backbone'"):
        trainer.fit(LitCausalLM(), token_loader())


# -- optimizers built too early ---------------------------------------------------------------------
def test_optimizer_built_before_injection_is_an_error_naming_orphans(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[PEFTCallback(lora())], max_steps=1)
    module = LitEagerOptimizer()
    with pytest.raises(RuntimeError, match=r"8 trainable adapter parameters are in no optimizer.*q_proj\.lora_A"):
        trainer.fit(module, token_loader())
    assert module.step_losses == {}  # it failed before the first step, not after silently training nothing


# -- PEFTMixin --------------------------------------------------------------------------------------
@pytest.mark.parametrize("via_callback", [False, True], ids=["method-in-init", "method-from-callback"])
def test_mixin_builds_injects_then_parallelizes_once(tmp_path, via_callback):
    module = LitPEFTParallel(lora_args=None if via_callback else dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    callbacks = [PEFTCallback(lora())] if via_callback else []
    trainer = make_trainer(tmp_path, callbacks=callbacks, max_steps=2)
    trainer.fit(module, token_loader())
    trainer.validate(module, token_loader(n_batches=1), verbose=False)
    trainer.test(module, token_loader(n_batches=1), verbose=False)
    # Built once, and parallelize ran once, after the 4 adapters were in place.
    assert module.events == [("build", None), ("parallelize", 4)]
    assert injected_method(module.model) == lora()
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == lora_closed_form(4)
    assert optimizer_param_ids(trainer) == trainable_ids(module)
    assert module.strict_loading is False


def test_mixin_refuses_a_second_different_method(tmp_path):
    module = LitPEFTParallel(lora_args=dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer = make_trainer(tmp_path, callbacks=[PEFTCallback(lora(r=8))], max_steps=1)
    with pytest.raises(ValueError, match="already uses LoRA"):
        trainer.fit(module, token_loader())


def test_mixin_injecting_after_parallelize_is_a_clear_error():
    module = LitPEFTParallel()
    module.configure_model()  # built and parallelized with no method known yet
    assert module.events == [("build", None), ("parallelize", 0)]
    with pytest.raises(RuntimeError, match="already parallelized"):
        module.use_peft_method(lora())
    assert not list(adapter_layers(module.model))


# -- plain torch models -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("targets", "model_attr"),
    [(["0", "2"], None), (["0", "2"], "net"), (r"net\.(0|2)", None), (r"[02]", "net")],
    ids=["names", "names-model_attr", "regex", "regex-model_attr"],
)
def test_plain_torch_model(tmp_path, targets, model_attr):
    module = LitMLP()
    before = {n: p.detach().clone() for n, p in module.net.named_parameters()}
    trainer = make_trainer(tmp_path, callbacks=[PEFTCallback(LoRA(r=2, target_modules=targets), model_attr=model_attr)], max_steps=4)
    trainer.fit(module, mlp_loader())
    wrapped = sorted(n for n, _ in adapter_layers(module.net))
    assert wrapped == ["0", "2"]
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == 2 * (8 + 16) + 2 * (16 + 4)
    assert optimizer_param_ids(trainer) == trainable_ids(module)
    for name, param in module.net.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, before[base_parameter_name(name)]), name
    assert module.step_losses[4] < module.step_losses[1]  # the adapters learn


# -- export ---------------------------------------------------------------------------------------------
def test_export_adapter_at_fit_end_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    module = LitCausalLM()
    callback = PEFTCallback(lora(), export_dir=str(tmp_path / "export"))
    make_trainer(tmp_path, callbacks=[callback], max_steps=3).fit(module, token_loader())
    adapter_dir = tmp_path / "export" / "adapter"
    assert sorted(p.name for p in adapter_dir.iterdir() if not p.name.startswith(".")) == ["adapter_config.json", "adapter_model.safetensors"]
    expected = logits(module.model)
    assert not torch.allclose(expected, logits(tiny_llama(0)), atol=1e-4)  # the adapters changed something
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(0), str(adapter_dir))
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=0)
    assert not (tmp_path / "export" / "merged").exists()


def test_export_on_checkpoint_writes_one_adapter_per_step(tmp_path):
    from lightning_peft import load_adapter

    module = LitCausalLM()
    callback = PEFTCallback(lora(), export_dir=str(tmp_path / "export"), export_on="checkpoint")
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    make_trainer(tmp_path, callbacks=[callback, saver], max_steps=4, enable_checkpointing=True).fit(module, token_loader())
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["step-2", "step-4"]  # no fit_end export
    step2 = load_adapter(tiny_llama(0), tmp_path / "export" / "step-2" / "adapter")
    step4 = load_adapter(tiny_llama(0), tmp_path / "export" / "step-4" / "adapter")
    torch.testing.assert_close(logits(step4), logits(module.model), atol=1e-6, rtol=0)
    assert not torch.allclose(logits(step2), logits(step4), atol=1e-5)


def test_export_merged_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    module = LitCausalLM()
    callback = PEFTCallback(lora(), export_dir=str(tmp_path / "export"), export_merged=True)
    make_trainer(tmp_path, callbacks=[callback], max_steps=3).fit(module, token_loader())
    merged_dir = tmp_path / "export" / "merged"
    assert (merged_dir / "config.json").exists()
    assert json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert set(merged.state_dict()) == set(tiny_llama(0).state_dict())
    assert not list(adapter_layers(merged))
    torch.testing.assert_close(logits(merged), logits(module.model), atol=1e-5, rtol=0)
    # The training model was left as it was: still adapted, unmerged.
    assert all(not layer.merged for _, layer in adapter_layers(module.model))


def test_export_on_both_writes_step_and_final_adapters(tmp_path):
    from lightning_peft import load_adapter

    module = LitCausalLM()
    callback = PEFTCallback(lora(), export_dir=str(tmp_path / "export"), export_on="both")
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3)
    make_trainer(tmp_path, callbacks=[callback, saver], max_steps=3, enable_checkpointing=True).fit(module, token_loader())
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["adapter", "step-3"]
    final = load_adapter(tiny_llama(0), tmp_path / "export" / "adapter")
    torch.testing.assert_close(logits(final), logits(module.model), atol=1e-6, rtol=0)


def test_export_on_checkpoint_with_weights_only_checkpoints_is_refused(tmp_path):
    callback = PEFTCallback(lora(), export_dir=str(tmp_path / "export"), export_on="checkpoint")
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_weights_only=True)
    trainer = make_trainer(tmp_path, callbacks=[callback, saver], enable_checkpointing=True)
    with pytest.raises(ValueError, match="weights-only checkpoints"):
        trainer.fit(LitCausalLM(), token_loader())


def test_export_arguments_are_validated_eagerly():
    with pytest.raises(ValueError, match="export_on='epoch'"):
        PEFTCallback(lora(), export_on="epoch")
    with pytest.raises(TypeError, match="LoRA"):
        PEFTCallback({"r": 8})


# -- exports that must not destroy a trained result ------------------------------------------------
def test_a_fit_without_steps_does_not_overwrite_the_trained_export(tmp_path):
    from lightning_peft import load_adapter

    export = tmp_path / "export"
    trained = LitCausalLM()
    make_trainer(tmp_path, callbacks=[PEFTCallback(lora(), export_dir=str(export))], max_steps=3).fit(trained, token_loader())
    before = {p.name: p.read_bytes() for p in (export / "adapter").iterdir()}
    rerun = LitCausalLM()  # a rerun on an empty data set: no step, untrained adapters
    with pytest.warns(UserWarning, match=r"not exporting .*made no optimizer step.*export_untrained=True"):
        make_trainer(tmp_path, callbacks=[PEFTCallback(lora(), export_dir=str(export))], max_steps=3, limit_train_batches=0).fit(rerun, token_loader())
    assert {p.name: p.read_bytes() for p in (export / "adapter").iterdir()} == before
    torch.testing.assert_close(logits(load_adapter(tiny_llama(0), export / "adapter")), logits(trained.model), atol=1e-6, rtol=0)
    asked = LitCausalLM()
    callback = PEFTCallback(lora(), export_dir=str(export), export_untrained=True)
    make_trainer(tmp_path, callbacks=[callback], max_steps=3, limit_train_batches=0).fit(asked, token_loader())
    assert {p.name: p.read_bytes() for p in (export / "adapter").iterdir()} != before  # asked for explicitly


class DivergingLitCausalLM(LitCausalLM):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * float("nan")


def test_a_diverged_run_is_not_exported_and_says_so(tmp_path):
    export = tmp_path / "export"
    make_trainer(tmp_path, callbacks=[PEFTCallback(lora(), export_dir=str(export))], max_steps=3).fit(LitCausalLM(), token_loader())
    before = {p.name: p.read_bytes() for p in (export / "adapter").iterdir()}
    with pytest.raises(ValueError, match=r"non-finite values .*diverged"):
        make_trainer(tmp_path, callbacks=[PEFTCallback(lora(), export_dir=str(export))], max_steps=3).fit(DivergingLitCausalLM(), token_loader())
    assert {p.name: p.read_bytes() for p in (export / "adapter").iterdir()} == before


def test_an_export_path_that_cannot_work_fails_at_setup_before_training(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "adapter").write_text("a file where the adapter would go")
    module = LitCausalLM()
    with pytest.raises(ValueError, match=r"adapter' is a file"):
        make_trainer(tmp_path, callbacks=[PEFTCallback(lora(), export_dir=str(tmp_path / "export"))], max_steps=3).fit(module, token_loader())
    assert module.step_losses == {}  # refused before the first step
    assert (tmp_path / "export" / "adapter").read_text() == "a file where the adapter would go"


def test_step_exports_are_written_once_and_follow_save_top_k(tmp_path, monkeypatch):
    writes = []
    real_export = PEFTCallback._export
    monkeypatch.setattr(PEFTCallback, "_export", lambda self, trainer, module, directory: (writes.append(str(directory)), real_export(self, trainer, module, directory)))
    callback = PEFTCallback(lora(), export_dir=str(tmp_path / "export"), export_on="checkpoint")
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=2, monitor="step", mode="max", save_last=True)
    make_trainer(tmp_path, callbacks=[callback, saver], max_steps=6, enable_checkpointing=True).fit(LitCausalLM(), token_loader(n_batches=6))
    assert len(writes) == len(set(writes)) == 6  # save_last=True saves twice per step: one export each
    kept_checkpoints = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert kept_checkpoints == ["epoch=0-step=5.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["step-5", "step-6"]


def test_a_merged_export_of_a_method_that_cannot_merge_fails_at_setup(tmp_path):
    from lightning_peft import Adapter

    module = LitCausalLM()
    callback = PEFTCallback(Adapter(style="houlsby", reduction_factor=4), export_dir=str(tmp_path / "export"), export_merged=True)
    with pytest.raises(ValueError, match=r"cannot be merged into their base weights.*load_adapter"):
        make_trainer(tmp_path, callbacks=[callback], max_steps=3).fit(module, token_loader())
    assert module.step_losses == {} and not (tmp_path / "export").exists()


def test_a_resume_that_trains_nothing_more_exports_the_restored_result_when_no_export_exists(tmp_path):
    """A run killed after its last checkpoint and before its fit-end export: the resume reaches max_steps at once,
    and the trained adapter it restored is exported (nothing to overwrite); with an export on disk it is kept."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_peft import load_adapter

    export = tmp_path / "export"
    first = LitCausalLM()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    make_trainer(tmp_path, callbacks=[PEFTCallback(lora()), saver], max_steps=3, enable_checkpointing=True).fit(first, token_loader())
    checkpoint = str(next((tmp_path / "ckpt").glob("*step=3.ckpt")))
    resumed = LitCausalLM()
    make_trainer(tmp_path, callbacks=[PEFTCallback(lora(), export_dir=str(export))], max_steps=3).fit(resumed, token_loader(), ckpt_path=checkpoint)
    torch.testing.assert_close(logits(load_adapter(tiny_llama(0), export / "adapter")), logits(first.model), atol=1e-6, rtol=0)
    before = {p.name: p.read_bytes() for p in (export / "adapter").iterdir()}
    with pytest.warns(UserWarning, match=r"not exporting .*made no optimizer step"):
        make_trainer(tmp_path, callbacks=[PEFTCallback(lora(), export_dir=str(export))], max_steps=3).fit(LitCausalLM(), token_loader(), ckpt_path=checkpoint)
    assert {p.name: p.read_bytes() for p in (export / "adapter").iterdir()} == before

"""Adapter-only Lightning checkpoints: what they hold, resuming, ``load_from_checkpoint`` and wrong bases."""

from __future__ import annotations

import io
import re

import copy
import os
import pickle

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_helpers import (
    LitCausalLM,
    LitMLP,
    LitPEFTCausalLM,
    LitPEFTParallel,
    lora,
    logits,
    make_trainer,
    mlp_loader,
    save_tiny_llama,
    token_loader,
    trainable_names,
)

from lightning_peft.integration.rng_state import rng_states
from lightning_peft import BaseModelMismatchError, LoRA, PEFTCallback
from lightning_peft.integration.checkpoints import CHECKPOINT_KEY
from lightning_peft.core.adapter_layer import adapter_layers

LORA_ARGS = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def fit_and_checkpoint(tmp_path, module, callbacks=(), steps: int = 3, **saver_kwargs) -> str:
    """Fit ``steps`` steps with a checkpoint at the last step; returns its path."""
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=steps, save_top_k=-1, **saver_kwargs)
    trainer = make_trainer(tmp_path, callbacks=[*callbacks, saver], max_steps=steps, enable_checkpointing=True)
    trainer.fit(module, token_loader())
    return saver.last_model_path or saver.best_model_path


# -- what a checkpoint holds ----------------------------------------------------------------------
def test_checkpoint_holds_exactly_the_trainable_tensors(tmp_path):
    module = LitCausalLM()
    checkpoint = load(fit_and_checkpoint(tmp_path, module, [PEFTCallback(lora())]))
    assert set(checkpoint["state_dict"]) == trainable_names(module)
    assert len(checkpoint["state_dict"]) == 8
    params = dict(module.named_parameters())
    for name, tensor in checkpoint["state_dict"].items():
        assert torch.equal(tensor, params[name]), name
    (optimizer,) = checkpoint["optimizer_states"]
    assert len(optimizer["state"]) == 8 and all(int(s["step"]) == 3 for s in optimizer["state"].values())
    assert checkpoint["global_step"] == 3 and "loops" in checkpoint
    assert checkpoint[CHECKPOINT_KEY]["method"] == lora().to_dict()
    assert "model.layers.0.self_attn.q_proj.weight" in checkpoint[CHECKPOINT_KEY]["base"]["tensors"]


def test_weights_only_checkpoint_is_adapter_only_with_fingerprint(tmp_path):
    module = LitCausalLM()
    checkpoint = load(fit_and_checkpoint(tmp_path, module, [PEFTCallback(lora())], save_weights_only=True))
    assert set(checkpoint["state_dict"]) == trainable_names(module)
    assert "optimizer_states" not in checkpoint and "loops" in checkpoint
    # Callback.on_save_checkpoint does not run for weights-only saves; the base fingerprint must still be there.
    assert checkpoint[CHECKPOINT_KEY]["method"] == lora().to_dict()
    assert "model.layers.0.self_attn.q_proj.weight" in checkpoint[CHECKPOINT_KEY]["base"]["tensors"]


def test_mixin_weights_only_checkpoint_holds_exactly_the_trainable_tensors(tmp_path):
    module = LitPEFTCausalLM(lora_args=LORA_ARGS)
    checkpoint = load(fit_and_checkpoint(tmp_path, module, save_weights_only=True))
    assert set(checkpoint["state_dict"]) == trainable_names(module) and len(checkpoint["state_dict"]) == 8
    assert checkpoint[CHECKPOINT_KEY]["method"] == lora().to_dict()


def test_checkpoint_is_a_small_fraction_of_a_full_one(tmp_path):
    peft_path = fit_and_checkpoint(tmp_path / "peft", LitCausalLM(), [PEFTCallback(lora())])
    full_path = fit_and_checkpoint(tmp_path / "full", LitCausalLM())
    assert len(load(full_path)["state_dict"]) > 20  # the full run really saved the whole model
    peft_size, full_size = os.path.getsize(peft_path), os.path.getsize(full_path)
    # Both hold the random generators' states (a fixed ~12 KB that a real model's checkpoint does not notice).
    rng = io.BytesIO()
    torch.save(rng_states(), rng)
    assert rng.tell() < 16_000
    assert peft_size < 0.1 * full_size + rng.tell(), (peft_size, full_size, rng.tell())


# -- resume -------------------------------------------------------------------------------------------
def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    uninterrupted = LitCausalLM(seed=0)
    make_trainer(tmp_path / "a", callbacks=[PEFTCallback(lora())], max_steps=6).fit(uninterrupted, token_loader())
    assert sorted(uninterrupted.step_losses) == [1, 2, 3, 4, 5, 6]

    first = LitCausalLM(seed=0)
    ckpt = fit_and_checkpoint(tmp_path / "b", first, [PEFTCallback(lora())], steps=3)
    assert first.step_losses == {k: uninterrupted.step_losses[k] for k in (1, 2, 3)}

    resumed = LitCausalLM(seed=0)  # a fresh module: same base, new random adapter init
    trainer = make_trainer(tmp_path / "c", callbacks=[PEFTCallback(lora())], max_steps=6)
    trainer.fit(resumed, token_loader(), ckpt_path=ckpt)
    assert sorted(resumed.step_losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.step_losses[step] == pytest.approx(uninterrupted.step_losses[step], abs=1e-6), step
    final = dict(uninterrupted.named_parameters())
    for name, param in resumed.named_parameters():
        torch.testing.assert_close(param, final[name], atol=1e-6, rtol=0, msg=name)


def test_resume_with_dropout_draws_the_uninterrupted_runs_masks(tmp_path):
    # The checkpoint at step 3 is an epoch boundary (3 batches): only the random generators can differ.
    dropout = lora(dropout=0.3)
    uninterrupted = LitCausalLM(seed=0)
    make_trainer(tmp_path / "a", callbacks=[PEFTCallback(dropout)], max_steps=6).fit(uninterrupted, token_loader())
    ckpt = fit_and_checkpoint(tmp_path / "b", LitCausalLM(seed=0), [PEFTCallback(dropout)], steps=3)
    torch.manual_seed(999)  # whatever the generators hold before the resume, the checkpoint's states win
    resumed = LitCausalLM(seed=0)
    make_trainer(tmp_path / "c", callbacks=[PEFTCallback(dropout)], max_steps=6).fit(resumed, token_loader(), ckpt_path=ckpt)
    assert {s: resumed.step_losses[s] for s in (4, 5, 6)} == {s: uninterrupted.step_losses[s] for s in (4, 5, 6)}  # bitwise
    final = dict(uninterrupted.named_parameters())
    assert all(torch.equal(param, final[name]) for name, param in resumed.named_parameters())


def test_our_checkpoints_load_with_weights_only(tmp_path):
    ckpt = fit_and_checkpoint(tmp_path, LitCausalLM(), [PEFTCallback(lora(dropout=0.1))])
    loaded = torch.load(ckpt, weights_only=True)  # no pickled code: what Lightning's own loading allows
    assert set(loaded["lightning_peft"]) == {"method", "base", "rng"} and torch.is_tensor(loaded["lightning_peft"]["rng"]["torch"])


def test_mixin_resume_reproduces_the_uninterrupted_run(tmp_path):
    uninterrupted = LitPEFTCausalLM(lora_args=LORA_ARGS)
    make_trainer(tmp_path / "a", max_steps=6).fit(uninterrupted, token_loader())
    ckpt = fit_and_checkpoint(tmp_path / "b", LitPEFTCausalLM(lora_args=LORA_ARGS), steps=3)
    resumed = LitPEFTCausalLM(lora_args=LORA_ARGS)
    make_trainer(tmp_path / "c", max_steps=6).fit(resumed, token_loader(), ckpt_path=ckpt)
    assert sorted(resumed.step_losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.step_losses[step] == pytest.approx(uninterrupted.step_losses[step], abs=1e-6), step


# -- load_from_checkpoint -------------------------------------------------------------------------------
@pytest.mark.parametrize("via_callback", [False, True], ids=["method-in-init", "method-from-callback"])
def test_load_from_checkpoint_rebuilds_the_adapted_model(tmp_path, via_callback):
    base = save_tiny_llama(tmp_path / "base", seed=0)
    module = LitPEFTCausalLM(model_path=base, lora_args=None if via_callback else LORA_ARGS)
    ckpt = fit_and_checkpoint(tmp_path, module, [PEFTCallback(lora())] if via_callback else [])
    loaded = LitPEFTCausalLM.load_from_checkpoint(ckpt)
    assert loaded.model is not None and len(list(adapter_layers(loaded.model))) == 4
    trained = logits(module.model)
    assert not torch.allclose(trained, logits(LitPEFTCausalLM(model_path=base).configure_base_model()), atol=1e-4)
    torch.testing.assert_close(logits(loaded.model), trained, atol=1e-6, rtol=0)


# -- wrong checkpoints ------------------------------------------------------------------------------------
def test_resume_onto_a_different_base_is_refused(tmp_path):
    ckpt = fit_and_checkpoint(tmp_path, LitCausalLM(seed=0), [PEFTCallback(lora())])
    trainer = make_trainer(tmp_path / "other", callbacks=[PEFTCallback(lora())], max_steps=6)
    with pytest.raises(BaseModelMismatchError, match="different base model"):
        trainer.fit(LitCausalLM(seed=1), token_loader(), ckpt_path=ckpt)


def test_resume_onto_a_different_hidden_size_is_refused(tmp_path):
    ckpt = fit_and_checkpoint(tmp_path, LitCausalLM(seed=0), [PEFTCallback(lora())])
    trainer = make_trainer(tmp_path / "other", callbacks=[PEFTCallback(lora())], max_steps=6)
    other = LitCausalLM(seed=0, hidden_size=48, intermediate_size=96)
    with pytest.raises(BaseModelMismatchError, match=r"has shape \[.*48.*\], the checkpoint expects \[.*32.*\]"):
        trainer.fit(other, token_loader(), ckpt_path=ckpt)


def test_load_from_checkpoint_onto_a_different_base_is_refused(tmp_path):
    base = save_tiny_llama(tmp_path / "base", seed=0)
    ckpt = fit_and_checkpoint(tmp_path, LitPEFTCausalLM(model_path=base, lora_args=LORA_ARGS))
    other = save_tiny_llama(tmp_path / "other", seed=1)
    with pytest.raises(BaseModelMismatchError, match="holds different values"):
        LitPEFTCausalLM.load_from_checkpoint(ckpt, model_path=other)
    wider = save_tiny_llama(tmp_path / "wider", seed=0, hidden_size=48, intermediate_size=96)
    with pytest.raises(BaseModelMismatchError, match=r"has shape \[.*48.*\], the checkpoint expects"):
        LitPEFTCausalLM.load_from_checkpoint(ckpt, model_path=wider)


def _drop_one_adapter_tensor(path, tmp_path) -> tuple[str, str]:
    checkpoint = load(path)
    dropped = sorted(checkpoint["state_dict"])[0]
    del checkpoint["state_dict"][dropped]
    broken = str(tmp_path / "broken.ckpt")
    torch.save(checkpoint, broken)
    return broken, dropped


def test_checkpoint_missing_an_adapter_tensor_is_refused_on_resume(tmp_path):
    ckpt, dropped = _drop_one_adapter_tensor(fit_and_checkpoint(tmp_path, LitCausalLM(), [PEFTCallback(lora())]), tmp_path)
    trainer = make_trainer(tmp_path / "resume", callbacks=[PEFTCallback(lora())], max_steps=6)
    with pytest.raises(KeyError, match=f"lacks 1 trainable tensors.*{dropped}"):
        trainer.fit(LitCausalLM(), token_loader(), ckpt_path=ckpt)


def test_checkpoint_missing_an_adapter_tensor_is_refused_by_load_from_checkpoint(tmp_path):
    base = save_tiny_llama(tmp_path / "base", seed=0)
    ckpt = fit_and_checkpoint(tmp_path, LitPEFTCausalLM(model_path=base, lora_args=LORA_ARGS))
    broken, dropped = _drop_one_adapter_tensor(ckpt, tmp_path)
    with pytest.raises(KeyError, match=f"lacks 1 trainable tensors.*{dropped}"):
        LitPEFTCausalLM.load_from_checkpoint(broken)


def test_weights_only_checkpoint_is_verified_outside_fit(tmp_path):
    """Weights-only checkpoints have no ``callbacks`` key; ``trainer.test(ckpt_path=...)`` must still check them."""
    ckpt = fit_and_checkpoint(tmp_path, LitCausalLM(seed=0), [PEFTCallback(lora())], save_weights_only=True)
    trainer = make_trainer(tmp_path / "test", callbacks=[PEFTCallback(lora())])
    with pytest.raises(BaseModelMismatchError, match="different base model"):
        trainer.test(LitCausalLM(seed=1), token_loader(n_batches=1), ckpt_path=ckpt, verbose=False)
    broken, dropped = _drop_one_adapter_tensor(ckpt, tmp_path)
    with pytest.raises(KeyError, match=f"lacks 1 trainable tensors.*{dropped}"):
        trainer.test(LitCausalLM(seed=0), token_loader(n_batches=1), ckpt_path=broken, verbose=False)


def test_full_finetune_checkpoint_is_refused_by_a_peft_module(tmp_path):
    base = save_tiny_llama(tmp_path / "base", seed=0)
    ckpt = fit_and_checkpoint(tmp_path, LitPEFTCausalLM(model_path=base))  # no method: a full fine-tune
    assert CHECKPOINT_KEY not in load(ckpt)
    with pytest.raises(KeyError, match="lacks 8 trainable tensors"):
        LitPEFTCausalLM.load_from_checkpoint(ckpt, lora_args=LORA_ARGS)


class _LitOwnHooks(LitCausalLM):
    def on_save_checkpoint(self, checkpoint):
        checkpoint["mine"] = 42

    def on_load_checkpoint(self, checkpoint):
        self.loaded_mine = checkpoint.get("mine")


def test_the_modules_own_checkpoint_hooks_still_run(tmp_path):
    ckpt = fit_and_checkpoint(tmp_path, _LitOwnHooks(), [PEFTCallback(lora())])
    checkpoint = load(ckpt)
    assert checkpoint["mine"] == 42 and CHECKPOINT_KEY in checkpoint
    resumed = _LitOwnHooks()
    make_trainer(tmp_path / "resume", callbacks=[PEFTCallback(lora())], max_steps=4).fit(resumed, token_loader(), ckpt_path=ckpt)
    assert resumed.loaded_mine == 42 and sorted(resumed.step_losses) == [4]


def test_adapted_module_still_deepcopies_and_pickles(tmp_path):
    module = LitCausalLM()
    make_trainer(tmp_path, callbacks=[PEFTCallback(lora())], max_steps=1).fit(module, token_loader())
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        checkpoint: dict = {}
        clone.on_save_checkpoint(checkpoint)  # the hook acts on the copy, not on the original
        assert checkpoint[CHECKPOINT_KEY]["method"] == lora().to_dict()
        assert clone.on_save_checkpoint.lightning_module is clone


def test_load_from_checkpoint_warns_when_parallelize_ran_before_injection(tmp_path):
    """With the method from a PEFTCallback, load_from_checkpoint learns it only after configure_model."""
    base = save_tiny_llama(tmp_path / "base", seed=0)
    module = LitPEFTParallel(model_path=base)
    ckpt = fit_and_checkpoint(tmp_path, module, [PEFTCallback(lora())])
    with pytest.warns(UserWarning, match=r"after parallelize\(\) already ran"):
        loaded = LitPEFTParallel.load_from_checkpoint(ckpt)
    assert loaded.events == [("build", None), ("parallelize", 0)]
    torch.testing.assert_close(logits(loaded.model), logits(module.model), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("changed", "named"),
    [(dict(r=8), "r: checkpoint 4, now 8"), (dict(alpha=32), "alpha: checkpoint 8.0, now 32.0"),
     (dict(target_modules=["q_proj"]), "target_modules: checkpoint ['q_proj', 'v_proj'], now ['q_proj']"),
     (dict(r=8, dropout=0.1), "dropout: checkpoint 0.0, now 0.1; r: checkpoint 4, now 8")],
    ids=["r", "alpha", "fewer-targets", "r-and-dropout"],
)  # fmt: skip
def test_resume_with_another_method_config_is_refused_naming_the_fields(tmp_path, changed, named):
    ckpt = fit_and_checkpoint(tmp_path, LitCausalLM(), [PEFTCallback(lora())])
    trainer = make_trainer(tmp_path / "resume", callbacks=[PEFTCallback(lora(**changed))], max_steps=6)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint was trained with another LoRA config ({named})")):
        trainer.fit(LitCausalLM(), token_loader(), ckpt_path=ckpt)


def test_resume_with_another_dropout_is_allowed_with_a_warning(tmp_path):
    ckpt = fit_and_checkpoint(tmp_path, LitCausalLM(), [PEFTCallback(lora())])
    module = LitCausalLM()
    trainer = make_trainer(tmp_path / "resume", callbacks=[PEFTCallback(lora(dropout=0.1))], max_steps=4)
    with pytest.warns(UserWarning, match=r"resuming LoRA with changed dropout: checkpoint 0.0, now 0.1: allowed"):
        trainer.fit(module, token_loader(), ckpt_path=ckpt)
    assert trainer.global_step == 4


def test_plain_torch_model_checkpoint_resumes_and_refuses_another_base(tmp_path):
    method = LoRA(r=2, target_modules=["0", "2"])
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)
    make_trainer(tmp_path, callbacks=[PEFTCallback(method), saver], max_steps=2, enable_checkpointing=True).fit(LitMLP(), mlp_loader())
    ckpt = saver.best_model_path
    assert sorted(load(ckpt)["state_dict"]) == ["net.0.lora_A", "net.0.lora_B", "net.2.lora_A", "net.2.lora_B"]
    resumed = LitMLP(seed=0)
    make_trainer(tmp_path / "ok", callbacks=[PEFTCallback(method)], max_steps=3).fit(resumed, mlp_loader(), ckpt_path=ckpt)
    assert sorted(resumed.step_losses) == [3]
    with pytest.raises(BaseModelMismatchError, match=r"net\.0\.weight holds different values"):
        make_trainer(tmp_path / "bad", callbacks=[PEFTCallback(method)], max_steps=3).fit(LitMLP(seed=1), mlp_loader(), ckpt_path=ckpt)


def test_rng_states_round_trip_every_generator_through_a_weights_only_load():
    import random

    import numpy as np

    from lightning_peft.integration.rng_state import restore_rng_states

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    buffer = io.BytesIO()
    torch.save(rng_states(), buffer)
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    buffer.seek(0)
    restore_rng_states(torch.load(buffer, weights_only=True))
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])

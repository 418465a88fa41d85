"""Adapter-only checkpoints, resume and the exported adapter for Adapter, Compacter, IA3 and BitFit, through
PEFTCallback on a tiny Llama with biases (so BitFit has something to train)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_helpers import LitCausalLM, logits, make_trainer, token_loader, trainable_names

from lightning_peft import IA3, Adapter, BitFit, Compacter, PEFTCallback, load_adapter
from lightning_peft.integration.checkpoints import CHECKPOINT_KEY
from lightning_peft.methods.base import method_from_dict

METHODS = {
    "houlsby": lambda: Adapter(style="houlsby", reduction_factor=4),
    "compacter++": lambda: Compacter(phm_dim=4, reduction_factor=4, style="pfeiffer"),
    "ia3": lambda: IA3(),
    "bitfit": lambda: BitFit(),
}
BIASED = dict(attention_bias=True, mlp_bias=True)


def _module() -> LitCausalLM:
    return LitCausalLM(seed=0, **BIASED)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_checkpoint_resume_and_export(name, tmp_path):
    uninterrupted = _module()
    make_trainer(tmp_path / "a", callbacks=[PEFTCallback(METHODS[name]())], max_steps=6).fit(uninterrupted, token_loader())

    first = _module()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    callback = PEFTCallback(METHODS[name](), export_dir=str(tmp_path / "export"))
    make_trainer(tmp_path / "b", callbacks=[callback, saver], max_steps=3, enable_checkpointing=True).fit(first, token_loader())
    path = saver.last_model_path or saver.best_model_path
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    # Exactly the trainable tensors (Compacter's shared rule matrices once), and the method to rebuild them.
    assert set(checkpoint["state_dict"]) == trainable_names(first)
    assert method_from_dict(checkpoint[CHECKPOINT_KEY]["method"]) == METHODS[name]()

    # The exported adapter reloads into a fresh base and gives the trained model's outputs.
    fresh = load_adapter(LitCausalLM(seed=0, **BIASED).model, tmp_path / "export" / "adapter")
    torch.testing.assert_close(logits(fresh), logits(first.model), atol=1e-6, rtol=0)

    resumed = _module()
    make_trainer(tmp_path / "c", callbacks=[PEFTCallback(METHODS[name]())], max_steps=6).fit(resumed, token_loader(), ckpt_path=path)
    assert sorted(resumed.step_losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.step_losses[step] == pytest.approx(uninterrupted.step_losses[step], abs=1e-6), step
    assert uninterrupted.step_losses[4] < uninterrupted.step_losses[1]  # it trained (steps 1 and 4 see the same batch)

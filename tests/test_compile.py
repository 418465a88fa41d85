"""compile=True: every transformer block compiled in place after injection; the same training as eager, the
same parameter names (adapter-only checkpoints and exports do not change)."""

from __future__ import annotations

import shutil

import pytest
import torch
from lightning_helpers import VOCAB, make_trainer, save_tiny_llama
from torch import nn

from lightning_peft import LoRA, PEFTCallback
from lightning_peft.core.compilation import compile_blocks
from lightning_peft.recipes.tasks import CausalLMTask

# Inductor compiles C++ on the CPU; without a compiler torch.compile cannot run at all.
needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler for inductor")


def _batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(0, VOCAB, (2, 8), generator=g)), "labels": ids} for _ in range(n)]


def _sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.5)


def _train(tmp_path, path: str, compile: bool) -> CausalLMTask:
    torch.manual_seed(0)  # the same LoRA init for both
    task = CausalLMTask(path, optimizer=_sgd, compile=compile)
    trainer = make_trainer(tmp_path / str(compile), max_steps=3, callbacks=[PEFTCallback(LoRA(r=4, target_modules=["q_proj", "v_proj"]))])
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(_batches(), batch_size=None))
    return task


@needs_compiler
def test_compiled_blocks_train_as_eager_with_the_same_names(tmp_path) -> None:
    path = save_tiny_llama(tmp_path / "llama")
    eager, compiled = _train(tmp_path, path, False), _train(tmp_path, path, True)
    assert all(getattr(block, "_compiled_call_impl", None) is not None for block in compiled.model.model.layers)
    assert eager.model.model.layers[0]._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefixes
    for (name, ours), theirs in zip(compiled.model.named_parameters(), eager.model.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=name)


def test_a_model_without_blocks_and_a_bad_flag_are_named(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"compile=True found no transformer blocks .* in Sequential"):
        compile_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with pytest.raises(TypeError, match=r"compile must be true or false, got 'yes'"):
        CausalLMTask("any", compile="yes")  # type: ignore[arg-type]

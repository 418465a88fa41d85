"""FSDP1 (Lightning's FSDPStrategy, GPU only) with one device: wrapping, dtype and checkpoint paths still
run with a single rank. LoRA on a 16-bit base, and QLoRA with the 4-bit codes stored in FSDP's
parameter dtype."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_helpers import LitCausalLM, make_trainer, token_loader
from lightning_peft import LoRA, PEFTCallback, Quantization

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


# Measured on an H100 (2026-11-23) before lightning_peft/integration/fsdp_wrapping.py existed, both cases failed: the adapter-only
# state_dict hook ran before FSDP1's own hook for the root unit ("FSDP assumes model.model.embed_tokens.weight is in the
# state_dict"), and QLoRA's unit mixed float32 adapters and norms with bfloat16-stored codes ("Must flatten tensors with
# uniform dtype"). The adapter wrap policy leaves the root unit empty and every unit one dtype; tests/test_fsdp1.py checks
# both on CPU processes. This test runs the same on a GPU: python -m pytest -q -m gpu tests/test_fsdp1_gpu.py
@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_fsdp1_single_gpu_trains_checkpoints_and_resumes(tmp_path, quantized):
    from lightning.pytorch.strategies import FSDPStrategy

    quantization = Quantization(bits=4, compute_dtype="bfloat16", quant_storage="bfloat16") if quantized else None

    def callbacks(saver=None):
        extra = [saver] if saver else []
        return [PEFTCallback(LoRA(r=4, alpha=8, target_modules="all-linear"), quantization=quantization), *extra]

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    common = dict(accelerator="gpu", devices=1, precision="bf16-mixed")
    first = LitCausalLM()
    trainer = make_trainer(tmp_path / "a", strategy=FSDPStrategy(), max_steps=3, enable_checkpointing=True, callbacks=callbacks(saver), **common)
    trainer.fit(first, token_loader())
    assert all(v == v for v in first.step_losses.values()) and len(first.step_losses) == 3
    checkpoint = saver.best_model_path or saver.last_model_path
    assert checkpoint
    uninterrupted = LitCausalLM()
    make_trainer(tmp_path / "b", strategy=FSDPStrategy(), max_steps=6, callbacks=callbacks(), **common).fit(uninterrupted, token_loader())
    resumed = LitCausalLM()
    make_trainer(tmp_path / "c", strategy=FSDPStrategy(), max_steps=6, callbacks=callbacks(), **common).fit(resumed, token_loader(), ckpt_path=checkpoint)
    assert sorted(resumed.step_losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(resumed.step_losses[step] - uninterrupted.step_losses[step]) < 1e-3, step

"""A failed apply_peft or load_adapter leaves the model exactly as it was, so a corrected retry works and
says the right thing (issue 14: before, the layers stayed wrapped and the base frozen, and the retry failed
with "model already has adapters")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_peft import AdapterFileError, IA3, LoRA, PrefixTuning, apply_peft, load_adapter, save_adapter
from lightning_peft.core.injection import injected_method
from lightning_peft.core.fingerprint import FINGERPRINT_ATTRIBUTE
from lightning_peft.methods.lora import LoRALayer
from adapter_files import as_peft_written, rewrite_tensors
from tiny_models import LLAMA_ALL, logits, randomize_adapters, tiny_llama


def snapshot(model: nn.Module) -> dict:
    """Everything an injection changes: the module tree (by identity), requires_grad, our attributes."""
    return {
        "modules": [(name, id(module), type(module)) for name, module in model.named_modules()],
        "trainable": [(name, p.requires_grad) for name, p in model.named_parameters()],
        "attributes": sorted(k for k in vars(model) if k.startswith("_lightning_peft")),
    }


def assert_untouched(model: nn.Module, before: dict, reference_logits: torch.Tensor) -> None:
    assert snapshot(model) == before
    assert injected_method(model) is None and not hasattr(model, FINGERPRINT_ATTRIBUTE)
    torch.testing.assert_close(logits(model), reference_logits, rtol=0, atol=0)


def partly_frozen_llama() -> nn.Module:
    # A user's own choice of frozen parameters, which a failed injection must not overwrite.
    model = tiny_llama(0)
    model.model.embed_tokens.weight.requires_grad_(False)
    return model


@pytest.mark.parametrize(
    "bad, good",
    [
        (LoRA(r=4, target_modules=["q_proj"], modules_to_save=["lm_haed"]), LoRA(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
        (LoRA(r=4, target_modules=["q_prj"]), LoRA(r=4, target_modules=["q_proj"])),
        (IA3(target_modules=["k_proj", "down_proj"], feedforward_modules=["up_proj"]), IA3(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])),
    ],
    ids=["modules_to_save typo", "target typo", "feedforward not a target"],
)
def test_failed_apply_peft_leaves_the_model_as_it_was_and_a_retry_works(bad, good):
    model = partly_frozen_llama()
    before, reference = snapshot(model), logits(model)
    with pytest.raises(ValueError):
        apply_peft(model, bad)
    assert_untouched(model, before, reference)
    targets = apply_peft(model, good)
    assert targets and injected_method(model) == good
    assert not model.model.embed_tokens.weight.requires_grad


def test_failure_after_some_layers_were_wrapped_is_rolled_back(monkeypatch):
    """A method that fails half-way through wrapping (here: on the fourth layer)."""
    model = partly_frozen_llama()
    before, reference = snapshot(model), logits(model)
    method = LoRA(r=4, target_modules=LLAMA_ALL)
    calls = []
    wrap = LoRA.wrap

    def failing_wrap(self, name, module):
        calls.append(name)
        if len(calls) == 4:
            raise RuntimeError("out of memory while allocating lora_A")
        return wrap(self, name, module)

    monkeypatch.setattr(LoRA, "wrap", failing_wrap)
    with pytest.raises(RuntimeError, match="out of memory"):
        apply_peft(model, method)
    assert len(calls) == 4
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
    assert_untouched(model, before, reference)


def test_failed_attach_of_virtual_tokens_is_rolled_back():
    model = tiny_llama(0)
    model.prompt_encoder = nn.Identity()  # the name the virtual tokens need is taken
    before, reference = snapshot(model), logits(model)
    with pytest.raises(ValueError, match="already has an attribute 'prompt_encoder'"):
        apply_peft(model, PrefixTuning(4))
    assert_untouched(model, before, reference)


# -- load_adapter -----------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path) -> Path:
    model = tiny_llama(0)
    apply_peft(model, LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, seed=3)
    path = save_adapter(model, tmp_path / "adapter")
    return path


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
    "damage, error",
    [
        (lambda p: rewrite_tensors(p, lambda t: t.update({Q_A: torch.zeros(4, 31)})), r"has shape \[4, 31\], the model needs \[4, 32\]"),
        (lambda p: rewrite_tensors(p, lambda t: t.pop(Q_A)), r"1 tensors missing"),
        (lambda p: rewrite_tensors(p, lambda t: t.update({"base_model.model.model.norm.lora_A.weight": torch.zeros(4, 32)})), r"1 unexpected tensors"),
        (lambda p: as_peft_written(p, use_dora=True), r"tensors missing.*lora_magnitude_vector"),
        (lambda p: as_peft_written(p, target_modules=None), r"LORA adapter_config.json has no target_modules.*Add the adapted modules"),
    ],
    ids=["wrong shape", "missing tensor", "extra tensor", "wrong use_dora", "no target_modules"],
)
def test_failed_load_adapter_leaves_the_model_as_it_was_and_a_retry_works(saved, tmp_path, damage, error):
    good = tmp_path / "good"
    good.mkdir()
    for file in saved.iterdir():
        (good / file.name).write_bytes(file.read_bytes())
    damage(saved)
    model = partly_frozen_llama()
    before, reference = snapshot(model), logits(model)
    with pytest.raises((AdapterFileError, ValueError), match=error):
        load_adapter(model, saved)
    assert_untouched(model, before, reference)
    load_adapter(model, good)  # the retry with a good file works and changes the output
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALayer)
    assert (logits(model) - reference).abs().max() > 1e-4


def test_failed_load_into_an_adapted_model_keeps_its_adapters(saved):
    model = tiny_llama(0)
    apply_peft(model, LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, seed=8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rewrite_tensors(saved, lambda t: t.update({Q_A: torch.zeros(4, 31)}))
    with pytest.raises(AdapterFileError):
        load_adapter(model, saved)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert isinstance(injected_method(model), LoRA)

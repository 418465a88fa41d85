"""Initialisations that start LoRA away from zero (PiSSA, OLoRA, LoRA-GA): parity with peft's factors,
the step-0 output, LoRA-GA against a float64 recomputation, export against the ORIGINAL base, resuming,
a 4-bit base, and the errors for bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from lightning_peft import LoRA, PEFTCallback, Quantization, apply_peft, save_adapter
from lightning_peft.core.adapter_layer import adapter_layers
from lightning_peft.formats.merged import save_merged
from lightning_peft.methods.lora_ga import estimate_weight_gradients
from lightning_peft.methods.lora_init import lora_ga_factors
from lightning_peft.quantization import quantize_model
from lightning_helpers import DestroyProcessGroupAtTeardown
from lightning_helpers import LitCausalLM, make_trainer, token_batches, token_loader
from lightning_helpers import tiny_llama as lightning_tiny_llama
from nf4_reference import reference_dequantize
from tiny_models import input_ids, logits, peft_adapter_params, tiny_gpt2, tiny_llama

QV = ["q_proj", "v_proj"]


def residual(layer) -> torch.Tensor:
    """The base weight a peft-style init would have written: W - s B0 A0, in the base's layout."""
    offset = layer.scaling * layer.lora_B0 @ layer.lora_A0  # (out, in)
    return layer.base_layer.weight.detach() - (offset if layer.kind == "linear" else offset.T)


def peft_base_weight(peft_model: nn.Module, name: str) -> torch.Tensor:
    return peft_model.base_model.model.get_submodule(name).base_layer.weight.detach()


# -- parity of the factors with peft -----------------------------------------------------------------
@pytest.mark.parametrize(
    "builder,targets,init",
    [(tiny_llama, QV + ["down_proj"], "pissa"), (tiny_gpt2, ["c_attn", "c_fc"], "pissa"), (tiny_llama, QV + ["down_proj"], "olora")],
    ids=["pissa-llama", "pissa-gpt2-conv1d", "olora-llama"],
)
def test_factors_and_residual_match_peft(builder, targets, init):
    ours = builder(0)
    apply_peft(ours, LoRA(r=4, alpha=8, target_modules=targets, init=init))
    theirs = get_peft_model(builder(0), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, fan_in_fan_out=builder is tiny_gpt2))
    for name, layer in adapter_layers(ours):
        a, b = peft_adapter_params(theirs, name)
        torch.testing.assert_close(layer.lora_A, a, rtol=0, atol=1e-5, msg=f"A of {name}")
        torch.testing.assert_close(layer.lora_B, b, rtol=0, atol=1e-5, msg=f"B of {name}")
        torch.testing.assert_close(residual(layer), peft_base_weight(theirs, name), rtol=0, atol=1e-5, msg=f"residual of {name}")
        assert layer.lora_B.abs().max() > 1e-3  # really initialised away from zero


def test_fast_pissa_matches_peft_with_the_same_random_draws():
    ours = tiny_llama(0)
    apply_peft(ours, LoRA(r=4, alpha=8, target_modules=["down_proj"], init="pissa", svd_niter=4))
    theirs = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"]))
    for name, layer in adapter_layers(ours):
        module = theirs.base_model.model.get_submodule(name)
        torch.manual_seed(0)  # ours draws from a generator seeded 0 (lora_init._SVD_SEED)
        module.pissa_init("default", "pissa_niter_4")
        a, b = peft_adapter_params(theirs, name)
        torch.testing.assert_close(layer.lora_A, a, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.lora_B, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(residual(layer), peft_base_weight(theirs, name), rtol=0, atol=1e-5)


# -- step 0 ---------------------------------------------------------------------------------------------
INITS = [
    (tiny_llama, dict(init="kaiming")),
    (tiny_llama, dict(init="gaussian")),
    (tiny_llama, dict(init="pissa")),
    (tiny_llama, dict(init="pissa", svd_niter=2)),
    (tiny_llama, dict(init="olora")),
    (tiny_gpt2, dict(init="pissa")),
    (tiny_gpt2, dict(init="olora")),  # peft's OLoRA is wrong on Conv1D (QR of the transposed weight); ours is not
]


@pytest.mark.parametrize("builder,kwargs", INITS, ids=[f"{b.__name__}-{k['init']}-{k.get('svd_niter')}" for b, k in INITS])
def test_step_zero_output_equals_the_base(builder, kwargs):
    model = builder(0)
    apply_peft(model, LoRA(r=4, alpha=8, target_modules="all-linear", **kwargs))
    base = logits(builder(0))
    out = logits(model)
    assert (out - base).norm() / base.norm() < 1e-5
    if kwargs["init"] not in ("kaiming", "gaussian"):
        assert all(layer.lora_B.abs().max() > 1e-3 for _, layer in adapter_layers(model))


def test_step_zero_output_equals_the_base_for_lora_ga(tmp_path):
    module = LitCausalLM()
    base = logits(copy.deepcopy(module.model))
    trainer = make_trainer(tmp_path, max_steps=0, callbacks=[PEFTCallback(LoRA(r=4, target_modules="all-linear", init="lora_ga", init_batches=2))])
    trainer.fit(module, train_dataloaders=token_loader(n_batches=3))
    assert all(layer.lora_B.abs().max() > 1e-4 for _, layer in adapter_layers(module.model))
    out = logits(module.model)
    assert (out - base).norm() / base.norm() < 1e-5


# -- LoRA-GA against a float64 recomputation ---------------------------------------------------------
def float64_gradients(batches, targets) -> dict[str, torch.Tensor]:
    """The average dL/dW of the target weights, by plain autograd on a float64 copy of the base."""
    model = tiny_llama(0).double()
    for name, param in model.named_parameters():
        param.requires_grad_(any(name == f"{t}.weight" for t in targets))
    for batch in batches:
        ids = batch["input_ids"]
        model(input_ids=ids, labels=ids).loss.backward()
    return {t: model.get_submodule(t).weight.grad / len(batches) for t in targets}


def test_lora_ga_matches_a_float64_recomputation(tmp_path):
    r, batches = 2, token_batches(n_batches=3)
    loader = torch.utils.data.DataLoader(batches, batch_size=2, shuffle=False)
    module = LitCausalLM()
    trainer = make_trainer(tmp_path, max_steps=0, callbacks=[PEFTCallback(LoRA(r=r, alpha=4, target_modules=QV, init="lora_ga", init_batches=2))])
    trainer.fit(module, train_dataloaders=loader)
    layers = dict(adapter_layers(module.model))
    first_two = list(loader)[:2]
    reference = float64_gradients(first_two, list(layers))
    for name, layer in layers.items():
        U, S, Vh = torch.linalg.svd(reference[name], full_matrices=False)
        scale = layer.lora_B.shape[0] ** 0.25 / 16**0.5
        A_ref, B_ref = Vh[:r] * scale, U[:, r : 2 * r] * scale
        # Singular vectors are defined up to sign: align each row of A and column of B first.
        sign_a = torch.sign((layer.lora_A0.double() * A_ref).sum(dim=1, keepdim=True))
        sign_b = torch.sign((layer.lora_B0.double() * B_ref).sum(dim=0, keepdim=True))
        torch.testing.assert_close(layer.lora_A0.double() * sign_a, A_ref, rtol=0, atol=1e-5, msg=f"A of {name}")
        torch.testing.assert_close(layer.lora_B0.double() * sign_b, B_ref, rtol=0, atol=1e-5, msg=f"B of {name}")
        assert (S[r - 1] - S[r]) / S[0] > 1e-3  # separated spectrum, so the comparison is meaningful


def test_gradient_estimate_equals_peft_preprocess_loraga():
    from peft import LoraGAConfig, preprocess_loraga

    batches = list(token_loader(n_batches=2))
    peft_model = tiny_llama(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=QV, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

    def train_step():
        for batch in batches:
            peft_model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()

    preprocess_loraga(peft_model, config, train_step)
    ours = tiny_llama(0)
    apply_peft(ours, LoRA(r=2, alpha=4, target_modules=QV, init="lora_ga"))
    layers = dict(adapter_layers(ours))
    estimate = estimate_weight_gradients(ours, layers, batches, lambda b: ours(input_ids=b["input_ids"], labels=b["input_ids"]).loss)
    for name in layers:
        # peft divides by the number of backward calls it counted per module: the same average.
        torch.testing.assert_close(estimate[name], peft_model.get_submodule(name)._peft_loraga_grad, rtol=1e-5, atol=1e-7, msg=name)
    assert all(p.grad is None for p in ours.parameters())  # the estimate leaves no gradients behind
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [n for n, _ in ours.named_parameters() if "lora_" in n]


def test_lora_ga_on_a_4bit_base_keeps_the_codes_and_estimates_through_the_dequantized_weights():
    batches = list(token_loader(n_batches=2))
    quantized = tiny_llama(0)
    quantize_model(quantized, Quantization(compute_dtype="float32"))
    kbit = {n: m for n, m in quantized.named_modules() if getattr(getattr(m, "weight", None), "quant_state", None) is not None}
    codes = {n: m.weight.data.clone() for n, m in kbit.items()}
    apply_peft(quantized, LoRA(r=2, alpha=4, target_modules=QV, init="lora_ga"))
    twin = tiny_llama(0)
    with torch.no_grad():
        for name, module in kbit.items():
            twin.get_submodule(name).weight.copy_(reference_dequantize(module))
    apply_peft(twin, LoRA(r=2, alpha=4, target_modules=QV, init="lora_ga"))
    estimates = []
    for model in (quantized, twin):
        layers = dict(adapter_layers(model))
        estimates.append(estimate_weight_gradients(model, layers, batches, lambda b, m=model: m(input_ids=b["input_ids"], labels=b["input_ids"]).loss))
    for name in estimates[0]:
        torch.testing.assert_close(estimates[0][name], estimates[1][name], rtol=1e-4, atol=1e-7, msg=name)
    base = logits(quantized)
    for name, layer in adapter_layers(quantized):
        layer.set_initial_factors(*lora_ga_factors(estimates[0][name], 2))
    assert all(torch.equal(kbit[n].weight.data, c) for n, c in codes.items())  # nothing requantized
    torch.testing.assert_close(logits(quantized), base, rtol=0, atol=1e-5)


# -- export against the original base, and resuming ----------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "lora_ga"])
def test_export_reproduces_the_trained_model_on_the_original_base(tmp_path, init):
    module = LitCausalLM()
    method = LoRA(r=4, alpha=8, target_modules="all-linear", init=init, init_batches=2)
    trainer = make_trainer(tmp_path, max_steps=3, callbacks=[PEFTCallback(method)])
    trainer.fit(module, train_dataloaders=token_loader(n_batches=3))
    trained = logits(module.model)
    assert (trained - logits(lightning_tiny_llama(0).eval())).abs().max() > 1e-3  # training moved it
    save_adapter(module.model, tmp_path / "adapter")
    peft_loaded = PeftModel.from_pretrained(lightning_tiny_llama(0).eval(), tmp_path / "adapter")  # the ORIGINAL base
    assert peft_loaded.peft_config["default"].r == 8  # rank 2r: [A; A0], [B, -B0]
    torch.testing.assert_close(logits(peft_loaded), trained, rtol=0, atol=1e-4)
    save_merged(module.model, tmp_path / "merged", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(logits(merged), trained, rtol=0, atol=1e-4)


def test_lora_ga_resumes_from_an_adapter_only_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    method = LoRA(r=2, alpha=4, target_modules=QV, init="lora_ga", init_batches=2)
    straight = LitCausalLM()
    make_trainer(tmp_path / "a", max_steps=6, callbacks=[PEFTCallback(method)]).fit(straight, train_dataloaders=token_loader())

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    first = LitCausalLM()
    make_trainer(tmp_path / "b", max_steps=3, callbacks=[PEFTCallback(method), saver], enable_checkpointing=True).fit(first, train_dataloaders=token_loader())
    state = torch.load(saver.last_model_path or saver.best_model_path, weights_only=False)["state_dict"]
    assert any(k.endswith("lora_A0") for k in state) and not any(k.endswith("base_layer.weight") for k in state)

    resumed = LitCausalLM()  # fresh adapters: everything, the initial factors included, must come from the checkpoint
    make_trainer(tmp_path / "c", max_steps=6, callbacks=[PEFTCallback(method)]).fit(
        resumed, train_dataloaders=token_loader(), ckpt_path=saver.last_model_path or saver.best_model_path
    )
    assert sorted(resumed.step_losses) == [4, 5, 6]  # no estimate on resume (it would have called training_step)
    for step in (4, 5, 6):
        assert resumed.step_losses[step] == pytest.approx(straight.step_losses[step], rel=1e-6, abs=1e-7), step


# -- bad input ---------------------------------------------------------------------------------------------
def test_unknown_init_is_named():
    with pytest.raises(ValueError, match=r"unknown LoRA init 'loftq'; choose one of 'kaiming', 'gaussian', 'pissa', 'olora', 'lora_ga'"):
        LoRA(init="loftq")
    with pytest.raises(ValueError, match=r"init_batches must be a positive integer, got init_batches=0"):
        LoRA(init="lora_ga", init_batches=0)


def test_init_batches_larger_than_the_dataloader(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[PEFTCallback(LoRA(r=2, target_modules=QV, init="lora_ga", init_batches=5))])
    with pytest.raises(ValueError, match=r"init_batches=5 is larger than the train dataloader, which has 3 batches"):
        trainer.fit(LitCausalLM(), train_dataloaders=token_loader(n_batches=3))


def test_lora_ga_without_a_training_dataloader(tmp_path):
    class NoTrainData(LitCausalLM):
        def train_dataloader(self):
            return None

    trainer = make_trainer(tmp_path, callbacks=[PEFTCallback(LoRA(r=2, target_modules=QV, init="lora_ga"))])
    with pytest.raises(Exception, match=r"no train dataloader|train_dataloader"):
        trainer.fit(NoTrainData())


def test_base_moving_init_on_an_embedding_is_named():
    with pytest.raises(ValueError, match=r"init='pissa' is defined for Linear and Conv1D layers; target 'model.embed_tokens' is an Embedding"):
        apply_peft(tiny_llama(0), LoRA(target_modules=["embed_tokens"], init="pissa"))


def test_unconverted_peft_pissa_file_is_refused(tmp_path):
    from lightning_peft import load_adapter

    theirs = get_peft_model(tiny_llama(0), LoraConfig(r=2, lora_alpha=4, target_modules=QV, init_lora_weights="pissa"))
    theirs.save_pretrained(tmp_path / "pissa")
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa' and not converted"):
        load_adapter(tiny_llama(0), tmp_path / "pissa")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_lora_ga_through_the_trainer_on_a_4bit_base(tmp_path):
    module = LitCausalLM()
    callback = PEFTCallback(LoRA(r=2, target_modules=QV, init="lora_ga", init_batches=2), quantization=Quantization(compute_dtype="float32"))
    trainer = make_trainer(tmp_path, accelerator="gpu", max_steps=0, callbacks=[callback])
    trainer.fit(module, train_dataloaders=token_loader(n_batches=3))
    layers = dict(adapter_layers(module.model))
    assert all(layer.lora_B.abs().max() > 1e-4 for layer in layers.values())  # estimated on the GPU (fit moves the model back after)
    module.model.cuda().eval()
    out = logits(module.model, input_ids().cuda()).cpu()
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.zero_()
            layer.lora_B0.zero_()
    torch.testing.assert_close(logits(module.model, input_ids().cuda()).cpu(), out, rtol=0, atol=1e-5)


class _SameInitOnEveryRank(__import__("lightning").pytorch.Callback):
    """Runs in each DDP process after LoRA-GA: every rank must hold the same initial factors, and the
    ranks' data shards must differ (so the all-reduce is what made them equal)."""

    def on_train_start(self, trainer, pl_module):
        layers = dict(adapter_layers(pl_module.model))
        for name, layer in layers.items():
            gathered = trainer.strategy.all_gather(layer.lora_A0)  # (world, r, in)
            assert torch.equal(gathered[0], gathered[1]), f"rank factors differ for {name}"
            assert layer.lora_B0.abs().max() > 1e-4
        first = next(iter(trainer.train_dataloader))["input_ids"]
        shards = trainer.strategy.all_gather(first)
        assert not torch.equal(shards[0], shards[1]), "both ranks saw the same batch"


def test_lora_ga_is_identical_on_every_ddp_rank(tmp_path):
    method = LoRA(r=2, alpha=4, target_modules=QV, init="lora_ga", init_batches=2)
    trainer = make_trainer(
        tmp_path, strategy="ddp_spawn", devices=2, max_steps=1, callbacks=[PEFTCallback(method), _SameInitOnEveryRank(), DestroyProcessGroupAtTeardown()]
    )
    trainer.fit(LitCausalLM(), train_dataloaders=token_loader(n_batches=4))

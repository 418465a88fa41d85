"""The chunked linear + cross-entropy loss: values and gradients against a float64 recomputation and against the
plain transformers loss (label masking, logits_to_keep, tied and untied heads, full fine-tuning, prompt tuning,
a 4-bit base, DDP), the fallbacks of ``loss='auto'`` and the errors of bad input."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning_helpers import VOCAB, DestroyProcessGroupAtTeardown, make_trainer, save_tiny_llama, tiny_llama
from tiny_models import randomize_adapters
from torch.utils.data import DataLoader

from lightning_peft import LoRA, PromptTuning, Quantization, apply_peft
from lightning_peft.core.linear_cross_entropy import default_chunk_rows, linear_cross_entropy
from lightning_peft.operations.causal_lm_loss import causal_lm_loss, check_head_is_last, lean_loss_obstacle
from lightning_peft.quantization import is_quantized_linear, quantize_model
from lightning_peft.recipes.tasks import CausalLMTask


def _inputs(dtype: torch.dtype, n: int = 2, t: int = 37, h: int = 16, v: int = 100, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, h, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g).to(dtype).requires_grad_()
    bias = torch.randn(v, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n, t), generator=g)
    targets[0, :5] = -100  # a masked prompt
    targets[1, -3:] = -100  # padding
    return hidden, weight, bias, targets


def _grads(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


@pytest.mark.parametrize("chunk_rows", [1, 7, 10_000])
def test_loss_and_gradients_equal_a_float64_recomputation(chunk_rows: int) -> None:
    hidden, weight, bias, targets = _inputs(torch.float32)
    ours = linear_cross_entropy(hidden, weight, targets, bias, chunk_rows=chunk_rows)
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (hidden, weight, bias))
    reference = F.cross_entropy((h64 @ w64.T + b64).view(-1, 100), targets.view(-1), ignore_index=-100)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-6, atol=1e-6)
    for mine, exact in zip(_grads(ours, hidden, weight, bias), _grads(reference, h64, w64, b64)):
        torch.testing.assert_close(mine.double(), exact, rtol=1e-5, atol=1e-7)


def test_bfloat16_matches_the_plain_loss_of_a_bfloat16_head() -> None:
    # The plain loss: a bf16 head, upcast to float32, cross-entropy (what transformers does).
    hidden, weight, bias, targets = _inputs(torch.bfloat16)
    plain = F.cross_entropy(F.linear(hidden, weight, bias).float().view(-1, 100), targets.view(-1))
    ours = linear_cross_entropy(hidden, weight, targets, bias, chunk_rows=5)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-6)
    for mine, theirs in zip(_grads(ours, hidden, weight, bias), _grads(plain, hidden, weight, bias)):
        assert mine.dtype == torch.bfloat16
        torch.testing.assert_close(mine.float(), theirs.float(), rtol=1.6e-2, atol=1e-3)  # bf16's own rounding


def test_the_incoming_gradient_scales_the_result() -> None:
    hidden, weight, bias, targets = _inputs(torch.float64)
    (g1,) = _grads(linear_cross_entropy(hidden, weight, targets, bias), hidden)
    (g3,) = _grads(3.0 * linear_cross_entropy(hidden, weight, targets, bias), hidden)
    torch.testing.assert_close(g3, 3.0 * g1)


def test_a_frozen_head_gets_no_gradient_and_no_grad_mode_computes_none() -> None:
    hidden, weight, _, targets = _inputs(torch.float32)
    weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        evaluated = linear_cross_entropy(hidden, weight, targets)
    assert not evaluated.requires_grad and evaluated.item() == pytest.approx(loss.item(), rel=1e-7)


def test_default_chunk_is_64_mib_of_float32_logits() -> None:
    assert default_chunk_rows(49_152) == 341 and default_chunk_rows(128_256) == 130 and default_chunk_rows(10**9) == 1


def test_no_scored_target_gives_nan_like_the_plain_loss() -> None:
    hidden, weight, _, targets = _inputs(torch.float32)
    loss = linear_cross_entropy(hidden, weight, torch.full_like(targets, -100))
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(F.linear(hidden, weight).view(-1, 100), torch.full_like(targets, -100).view(-1)))


def test_bad_input_is_named() -> None:
    hidden, weight, _, targets = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"target token id 100 is outside the head's vocabulary \[0, 100\)"):
        linear_cross_entropy(hidden, weight, targets.index_put((torch.tensor(1), torch.tensor(0)), torch.tensor(100)))
    with pytest.raises(ValueError, match=r"target token id -7 is outside"):
        linear_cross_entropy(hidden, weight, targets.index_put((torch.tensor(1), torch.tensor(0)), torch.tensor(-7)))
    with pytest.raises(ValueError, match=r"hidden states \(2, 37, 16\) and targets \(2, 36\) do not align"):
        linear_cross_entropy(hidden, weight, targets[:, 1:])
    with pytest.raises(ValueError, match=r"weight \(100, 8\) is not \(vocab, 16\)"):
        linear_cross_entropy(hidden, weight[:, :8], targets)
    with pytest.raises(ValueError, match=r"chunk_rows must be a positive integer \(e.g. 256\), got 0"):
        linear_cross_entropy(hidden, weight, targets, chunk_rows=0)


# -- through a transformers model ---------------------------------------------------------------------------
def _batch(seed: int = 3, rows: int = 3, length: int = 11) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[2, -4:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :6] = -100  # a chat prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _plain_and_chunked(model: torch.nn.Module, batch: dict[str, torch.Tensor], **kwargs) -> tuple:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    trained = [p for p in model.parameters() if p.requires_grad]
    plain = model(**inputs, labels=batch["labels"], use_cache=False).loss
    plain_grads = _grads(plain, *trained)
    chunked = causal_lm_loss(model, inputs, batch["labels"], chunk_rows=4, **kwargs)
    return plain, chunked, plain_grads, _grads(chunked, *trained)


def _assert_same(plain, chunked, plain_grads, chunked_grads) -> None:
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    assert len(plain_grads) == len(chunked_grads) > 0
    for ours, theirs in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_lora_gradients_equal_the_plain_loss(tied: bool) -> None:
    model = tiny_llama(0, tie_word_embeddings=tied)
    apply_peft(model, LoRA(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    assert lean_loss_obstacle(model) is None and check_head_is_last(model, _batch()) is None
    _assert_same(*_plain_and_chunked(model, _batch()))


def test_full_fine_tuning_trains_the_head_and_the_tied_embedding_alike() -> None:
    model = tiny_llama(0, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _assert_same(*_plain_and_chunked(model, _batch()))


def test_logits_to_keep_scores_the_kept_positions() -> None:
    model = tiny_llama(0)
    apply_peft(model, LoRA(r=4, target_modules=["q_proj"]))
    randomize_adapters(model)
    batch = _batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    trained = [p for p in model.parameters() if p.requires_grad]
    # The plain loss of the last 4 positions: each predicts the next token; the very last has none.
    logits = model(**inputs, use_cache=False).logits[:, -4:-1]
    plain = F.cross_entropy(logits.float().reshape(-1, VOCAB), batch["labels"][:, -3:].reshape(-1))
    chunked = causal_lm_loss(model, inputs, batch["labels"], logits_to_keep=4)
    _assert_same(plain, chunked, _grads(plain, *trained), _grads(chunked, *trained))


def test_prompt_tuning_equals_the_plain_loss() -> None:
    model = tiny_llama(0)
    apply_peft(model, PromptTuning(num_virtual_tokens=3))
    assert check_head_is_last(model, _batch()) is None
    _assert_same(*_plain_and_chunked(model, _batch()))


def test_a_4bit_base_equals_the_plain_loss() -> None:
    model = tiny_llama(0, hidden_size=64, intermediate_size=128)
    quantize_model(model, Quantization(compute_dtype="float32"))
    apply_peft(model, LoRA(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_adapters(model)
    assert is_quantized_linear(model.model.layers[0].mlp.down_proj.base_layer)
    assert lean_loss_obstacle(model) is None
    _assert_same(*_plain_and_chunked(model, _batch()))


def test_what_the_chunked_loss_cannot_stand_in_for_is_named() -> None:
    adapted_head = tiny_llama(0)
    apply_peft(adapted_head, LoRA(r=2, target_modules=["lm_head"]))
    assert "not a plain nn.Linear" in lean_loss_obstacle(adapted_head)
    quantized_head = tiny_llama(0, hidden_size=64, intermediate_size=128)
    quantize_model(quantized_head, Quantization(compute_dtype="float32"))
    import bitsandbytes as bnb  # a 4-bit head, as a user's own quantization might leave it

    head = bnb.nn.Linear4bit(64, VOCAB, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    head.weight = bnb.nn.Params4bit(quantized_head.lm_head.weight.data, requires_grad=False, quant_type="nf4")._quantize("cpu")
    quantized_head.lm_head = head
    assert "Linear4bit" in lean_loss_obstacle(quantized_head)
    router = tiny_llama(0)
    router.config.output_router_logits = True
    assert "router loss" in lean_loss_obstacle(router)
    # A model that rescales its logits after the head (as Gemma 2's soft-capping does) is caught on a batch.
    scaled = tiny_llama(0)
    scaled.register_forward_hook(lambda module, args, output: output.__setitem__("logits", output["logits"] * 2.0))
    assert "changes its logits after the output head" in check_head_is_last(scaled, _batch())


# -- in CausalLMTask ------------------------------------------------------------------------------------------
class _Batches(L.LightningDataModule):
    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)


def _sgd(params) -> torch.optim.Optimizer:  # module level: ddp_spawn pickles the task
    return torch.optim.SGD(params, lr=0.5)


def _fit(tmp_path, path: str, loss: str, batches: list, **trainer_kwargs) -> CausalLMTask:
    task = CausalLMTask(path, loss=loss, optimizer=_sgd)
    trainer = make_trainer(tmp_path / loss, max_steps=len(batches), **trainer_kwargs)
    trainer.fit(task, datamodule=_Batches(batches))
    return task


def test_task_chunked_and_plain_train_the_same_weights(tmp_path) -> None:
    path = save_tiny_llama(tmp_path / "llama")
    batches = [_batch(seed) for seed in range(3)]
    chunked, plain = _fit(tmp_path, path, "chunked", batches), _fit(tmp_path, path, "plain", batches)
    assert chunked._chunked is True and plain._chunked is False
    for (name, ours), theirs in zip(chunked.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6, msg=name)
    assert chunked.trainer.logged_metrics["train_loss"] == pytest.approx(plain.trainer.logged_metrics["train_loss"].item(), rel=1e-5)


def test_task_auto_falls_back_and_chunked_refuses_where_not_exact(tmp_path) -> None:
    path = save_tiny_llama(tmp_path / "llama")
    task = CausalLMTask(path, loss="chunked")
    task.configure_model()
    task.model.config.output_router_logits = True
    with pytest.raises(ValueError, match=r"loss='chunked' cannot be exact for .*router loss.*Use loss='plain'"):
        task._loss(_batch())
    auto = CausalLMTask(path, loss="auto")
    auto.configure_model()
    auto.model.config.output_router_logits = True
    assert auto._loss(_batch()).item() == pytest.approx(auto(_batch()).loss.item()) and auto._chunked is False
    with pytest.raises(ValueError, match=r"loss='fused'; choose 'auto'"):
        CausalLMTask(path, loss="fused")  # type: ignore[arg-type]


class _ExpectWeights(L.Callback):
    def __init__(self, expected: dict[str, torch.Tensor]) -> None:
        self.expected = expected

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert trainer.world_size == 2 and pl_module._chunked is True
        for name, param in pl_module.model.named_parameters():
            torch.testing.assert_close(param.detach(), self.expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_under_ddp_the_chunked_loss_trains_as_one_process_on_the_whole_batch(tmp_path) -> None:
    # Two rows with the same number of scored tokens, one per rank: DDP's mean of the two ranks' gradients is
    # the one-process gradient of the two-row batch.
    path = save_tiny_llama(tmp_path / "llama")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    reference = CausalLMTask(path, loss="plain")
    reference.configure_model()
    loss = reference({"input_ids": ids, "labels": ids}).loss
    loss.backward()
    expected = {n: (p - 0.5 * p.grad).detach() for n, p in reference.model.named_parameters()}
    rows = [{"input_ids": ids[i : i + 1], "labels": ids[i : i + 1]} for i in range(2)]
    task = CausalLMTask(path, loss="chunked", optimizer=_sgd)
    trainer = make_trainer(
        tmp_path / "ddp", strategy="ddp_spawn", devices=2, max_steps=1, callbacks=[_ExpectWeights(expected), DestroyProcessGroupAtTeardown()]
    )
    trainer.fit(task, train_dataloaders=DataLoader(rows, batch_size=None))


def test_the_gpu_qlora_benchmark_smoke_runs_on_the_cpu_with_both_implementations(tmp_path) -> None:
    # benchmarks/bench_qlora_gpu.py is what measures the GPU targets; its CPU mode keeps it from rotting here.
    # One step from B = 0: both implementations score the same NF4 base, ours with the chunked loss.
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_qlora_gpu.py"
    out = tmp_path / "result.json"
    command = [sys.executable, str(script), "--device", "cpu", "--shape", "tiny", "--seq", "32", "--warmup", "0", "--steps", "1", "--json", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "ours / peft: tokens/s ratio" in completed.stdout.splitlines()[-1]
    import json

    results = json.loads(out.read_text())
    assert results["ours"]["loss"] == "chunked" and results["peft"]["loss"] == "plain"
    assert results["ours"]["trainable"] == results["peft"]["trainable"] == 65_536  # the same LoRA: r=16 on all 14 linears
    assert results["ours"]["last_loss"] == pytest.approx(results["peft"]["last_loss"], rel=1e-3)

"""Inference-time intervention (ITI): the fitted heads, directions and sigma against an independent float64
recomputation from the base model's own activations, alpha=0 as the base exactly, the shift against a hand-made
hook, the merge into biases (in memory and saved, reloaded by transformers in a process that never imports
lightning_peft), the adapter file, the Trainer path, DDP and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import lightning.pytorch as L
import pytest
import torch
from lightning_helpers import DestroyProcessGroupAtTeardown, make_trainer
from safetensors.torch import load_file, save_file
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from torch.utils.data import DataLoader
from transformers import MistralConfig, MistralForCausalLM

from lightning_peft import ITI, PEFTCallback, apply_peft, load_adapter, merge_adapters, save_adapter
from lightning_peft.core.adapter_layer import adapter_layers
from lightning_peft.formats.merged import save_merged
from lightning_peft.methods.iti import ITILayer, steering_strength

SEED = 3


def labelled_batches(n_batches: int = 6, batch_size: int = 16, length: int = 6, seed: int = 0, pad: bool = True) -> list[dict]:
    """Random sentences whose class is told by a marker token before the last one (and a little noise), with
    right padding of random length, so the heads at the last token can (partly) separate the classes."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(5, 60, (batch_size, length), generator=generator)
        labels = torch.randint(0, 2, (batch_size,), generator=generator)
        lengths = torch.randint(3, length + 1, (batch_size,), generator=generator) if pad else torch.full((batch_size,), length)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        marker = torch.where(labels == 1, 3, 4)
        ids[torch.arange(batch_size), lengths - 2] = marker
        ids = ids.masked_fill(mask == 0, 0)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def o_proj_inputs(model: nn.Module, batches: list[dict], projection: str) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Independent of the package: the inputs of every ``projection`` at each row's last real token, read by plain
    forward pre-hooks on the base model: (N, layers, width) float64, the labels, and the batch sizes."""
    layers = [m for n, m in model.named_modules() if n.endswith(projection)]
    rows: list[list[torch.Tensor]] = [[] for _ in layers]
    current: dict[str, torch.Tensor] = {}

    def hook(i):
        def read(module, args):
            x = args[0]
            rows[i].append(x[torch.arange(x.shape[0]), current["last"]].double())

        return read

    handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for batch in batches:
                current["last"] = batch["attention_mask"].sum(1) - 1  # right padding
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    x = torch.stack([torch.cat(r) for r in rows], dim=1)
    labels = torch.cat([b["labels"] for b in batches])
    return x, labels, [b["labels"] for b in batches]


def reference_fit(x: torch.Tensor, labels: torch.Tensor, held: torch.Tensor, heads: int, ridge: float, k: int, direction: str):
    """Float64 recomputation, head by head from the stacked activations: ridge least squares on +-1, its held-out
    accuracy, the top-k (ties to the lower index), the direction and the std along it."""
    n, layers, width = x.shape
    d = width // heads
    per_head = x.reshape(n, layers * heads, d)
    train, test = ~held, held
    accuracy, directions, sigma = [], [], []
    for g in range(layers * heads):
        a = torch.cat([per_head[train, g], torch.ones(int(train.sum()), 1, dtype=torch.float64)], dim=1)
        y = labels[train].double() * 2 - 1
        penalty = torch.eye(d + 1, dtype=torch.float64)
        penalty[d, d] = 0
        lam = ridge * (per_head[train, g] ** 2).sum() / d
        w = torch.linalg.solve(a.T @ a + lam * penalty, a.T @ y)
        scores = per_head[test, g] @ w[:d] + w[d]
        accuracy.append(((scores > 0) == (labels[test] == 1)).double().mean())
        if direction == "mass_mean":
            theta = per_head[train, g][labels[train] == 1].mean(0) - per_head[train, g][labels[train] == 0].mean(0)
        else:
            theta = w[:d]
        theta = theta / theta.norm()
        directions.append(theta)
        sigma.append((per_head[train, g] @ theta).std(unbiased=False))
    accuracy = torch.stack(accuracy)
    order = sorted(range(len(accuracy)), key=lambda g: (-float(accuracy[g]), g))
    return accuracy, torch.stack(directions), torch.stack(sigma), sorted(order[:k])


def held_out_rows(method: ITI, batch_labels: list[torch.Tensor]) -> torch.Tensor:
    """The documented draw: per batch, ``torch.rand`` from ``seed * 1_000_003 + batch index`` below the fraction."""
    return torch.cat(
        [
            torch.rand(len(labels), generator=torch.Generator().manual_seed(method.seed * 1_000_003 + i)) < method.validation_fraction
            for i, labels in enumerate(batch_labels)
        ]
    )


def fitted_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{b}": getattr(layer, b).clone() for name, layer in adapter_layers(model) for b in ("iti_directions", "iti_sigma", "iti_selected")}


def selected_heads(model: nn.Module) -> list[int]:
    layers = [layer for _, layer in adapter_layers(model) if isinstance(layer, ITILayer)]
    return sorted(i * layer.heads + h for i, layer in enumerate(layers) for h in layer.iti_selected.nonzero().reshape(-1).tolist())


def fitted_llama(num_heads: int = 3, alpha: float = 4.0, direction: str = "mass_mean", **kwargs) -> tuple[nn.Module, ITI, list[dict]]:
    model = tiny_llama(SEED)
    batches = labelled_batches()
    method = ITI(num_heads=num_heads, alpha=alpha, direction=direction, **kwargs)
    method.fit(model, batches)
    return model, method, batches


def run_base_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# -- the fit against an independent recomputation ----------------------------------------------------
@pytest.mark.parametrize("direction", ["mass_mean", "probe"])
def test_selected_heads_directions_and_sigma_match_a_float64_recomputation(direction: str) -> None:
    base = tiny_llama(SEED)
    batches = labelled_batches()
    x, labels, per_batch = o_proj_inputs(base, batches, "o_proj")
    method = ITI(num_heads=3, alpha=2.0, direction=direction)
    held = held_out_rows(method, per_batch)
    accuracy, directions, sigma, top = reference_fit(x, labels, held, 4, method.ridge, 3, direction)
    assert len(set(accuracy.tolist())) > 2, "the check needs probes of different accuracy"

    method.fit(base, batches)
    layers = [layer for _, layer in adapter_layers(base)]
    assert selected_heads(base) == top
    ours_accuracy = torch.cat([layer.iti_probe_accuracy for layer in layers]).double()
    torch.testing.assert_close(ours_accuracy, accuracy, atol=1e-6, rtol=0)
    ours_directions = torch.cat([layer.iti_directions for layer in layers]).double()
    torch.testing.assert_close(ours_directions, directions, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([layer.iti_sigma for layer in layers]).double(), sigma, atol=1e-5, rtol=1e-5)


def test_the_shift_is_alpha_sigma_theta_on_the_selected_heads_input_of_o_proj() -> None:
    model, _, batches = fitted_llama(num_heads=3, alpha=4.0)
    reference = tiny_llama(SEED)  # the base, with the shift added by a plain hook built from the fitted buffers
    handles = []
    for name, layer in adapter_layers(model):
        shift = torch.zeros(layer.heads, layer.head_dim)
        for h in layer.iti_selected.nonzero().reshape(-1).tolist():
            shift[h] = 4.0 * layer.iti_sigma[h] * layer.iti_directions[h]
        handles.append(reference.get_submodule(name).register_forward_pre_hook(lambda m, args, s=shift.reshape(-1): (args[0] + s,)))
    expected = run_base_logits(reference, batches[0])
    for handle in handles:
        handle.remove()
    assert not torch.allclose(expected, run_base_logits(reference, batches[0]))  # the steering does something
    torch.testing.assert_close(run_base_logits(model, batches[0]), expected, atol=1e-6, rtol=0)


def test_alpha_zero_is_the_base_model_exactly() -> None:
    base = tiny_llama(SEED)
    batch = labelled_batches(1)[0]
    expected = run_base_logits(base, batch)
    model, _, _ = fitted_llama(alpha=0.0)
    assert torch.equal(run_base_logits(model, batch), expected)
    steered, _, _ = fitted_llama(alpha=6.0)
    assert not torch.allclose(run_base_logits(steered, batch), expected)
    with steering_strength(steered, 0.0):
        assert torch.equal(run_base_logits(steered, batch), expected)
    assert not torch.allclose(run_base_logits(steered, batch), expected)  # alpha is back


def test_an_unfitted_intervention_is_the_base_model() -> None:
    base = tiny_llama(SEED)
    batch = labelled_batches(1)[0]
    expected = run_base_logits(base, batch)
    apply_peft(base, ITI(num_heads=2))
    assert torch.equal(run_base_logits(base, batch), expected)


# -- merging into biases ------------------------------------------------------------------------------
def test_merge_adapters_gives_a_plain_llama_with_attention_biases_that_matches() -> None:
    model, _, batches = fitted_llama(alpha=5.0)
    expected = run_base_logits(model, batches[0])
    merged = merge_adapters(model)
    assert not any(True for _ in adapter_layers(merged))
    assert merged.config.attention_bias is True
    attention = merged.model.layers[0].self_attn
    assert all(isinstance(getattr(attention, p).bias, torch.Tensor) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert not attention.q_proj.bias.any()  # zeros: the switch covers them, the merge needs only o_proj's
    torch.testing.assert_close(run_base_logits(merged, batches[0]), expected, atol=1e-5, rtol=0)


def test_merge_without_unloading_adds_and_removes_the_bias() -> None:
    model, _, batches = fitted_llama(alpha=5.0)
    expected = run_base_logits(model, batches[0])
    merge_adapters(model, unload=False)
    o_proj = model.model.layers[0].self_attn.o_proj.base_layer
    assert isinstance(o_proj.bias, torch.Tensor)
    torch.testing.assert_close(run_base_logits(model, batches[0]), expected, atol=1e-5, rtol=0)
    from lightning_peft import unmerge_adapters

    unmerge_adapters(model)
    assert o_proj.bias is None
    torch.testing.assert_close(run_base_logits(model, batches[0]), expected, atol=1e-5, rtol=0)


LOAD_WITHOUT_LIGHTNING_PEFT = """
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
kind, directory, batch_file, out = sys.argv[1:]
cls = {"causal": AutoModelForCausalLM, "classifier": AutoModelForSequenceClassification}[kind]
model = cls.from_pretrained(directory).eval()
batch = load_file(batch_file)
with torch.no_grad():
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
assert "lightning_peft" not in sys.modules
save_file({"logits": logits.contiguous()}, out)
"""


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_save_merged_loads_in_plain_transformers_and_matches(tmp_path, arch: str) -> None:
    builder = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}[arch]
    model = builder(SEED)
    batches = labelled_batches()
    ITI(num_heads=3, alpha=5.0).fit(model, batches)
    expected = run_base_logits(model, batches[0])
    with torch.no_grad():
        base = run_base_logits(builder(SEED), batches[0])
    assert not torch.allclose(expected, base, atol=1e-4)
    save_merged(model, tmp_path / "merged")
    assert any(True for _ in adapter_layers(model))  # the training model is untouched
    if arch == "llama":
        assert json.loads((tmp_path / "merged" / "config.json").read_text())["attention_bias"] is True
        assert model.config.attention_bias is False
    save_file({k: batches[0][k] for k in ("input_ids", "attention_mask")}, tmp_path / "batch.safetensors")
    kind = "classifier" if arch == "bert" else "causal"
    args = [sys.executable, "-c", LOAD_WITHOUT_LIGHTNING_PEFT, kind, str(tmp_path / "merged"), str(tmp_path / "batch.safetensors"), str(tmp_path / "out.safetensors")]
    result = subprocess.run(args, check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["logits"], expected, atol=1e-5, rtol=0)


def tiny_mistral() -> MistralForCausalLM:
    torch.manual_seed(SEED)
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return MistralForCausalLM(config).eval()


def test_merging_an_architecture_without_a_bias_switch_is_refused_and_changes_nothing(tmp_path) -> None:
    model = tiny_mistral()
    batches = labelled_batches()
    ITI(num_heads=2, alpha=5.0).fit(model, batches)
    expected = run_base_logits(model, batches[0])
    with pytest.raises(ValueError, match="'mistral' architecture builds without one"):
        merge_adapters(model)
    with pytest.raises(ValueError, match="'mistral' architecture builds without one"):
        save_merged(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert len(list(adapter_layers(model))) == 2
    assert model.model.layers[0].self_attn.o_proj.base_layer.bias is None
    assert torch.equal(run_base_logits(model, batches[0]), expected)


# -- files ----------------------------------------------------------------------------------------------
def test_the_adapter_file_holds_the_heads_and_alpha_and_reloads(tmp_path) -> None:
    model, _, batches = fitted_llama(num_heads=3, alpha=4.0)
    expected = run_base_logits(model, batches[0])
    save_adapter(model, tmp_path / "iti")
    config = json.loads((tmp_path / "iti" / "adapter_config.json").read_text())
    assert config["method"]["init_args"]["alpha"] == 4.0 and config["method"]["init_args"]["num_heads"] == 3
    tensors = load_file(tmp_path / "iti" / "adapter_model.safetensors")
    assert sum(int(t.sum()) for k, t in tensors.items() if k.endswith("iti_selected")) == 3
    fresh = load_adapter(tiny_llama(SEED), tmp_path / "iti")
    assert torch.equal(run_base_logits(fresh, batches[0]), expected)
    assert selected_heads(fresh) == selected_heads(model)
    merged = merge_adapters(fresh)  # a reloaded intervention merges too
    torch.testing.assert_close(run_base_logits(merged, batches[0]), expected, atol=1e-5, rtol=0)


# -- through a Trainer ------------------------------------------------------------------------------------
class LitClassifierData(L.LightningModule):
    """A user's own module: a causal LM that ITI steers, and labelled batches for it to fit on."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama(SEED)

    def training_step(self, batch, batch_idx):
        raise AssertionError("ITI takes no training step")

    def configure_optimizers(self):
        return None  # nothing trains


def test_trainer_fit_installs_the_standalone_intervention_and_exports_it(tmp_path) -> None:
    batches = labelled_batches()
    module = LitClassifierData()
    method = ITI(num_heads=3, alpha=4.0, init_batches=6)
    trainer = make_trainer(tmp_path, max_steps=5, callbacks=[PEFTCallback(method, export_dir=str(tmp_path / "out"))])
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert trainer.global_step == 0
    standalone = ITI(num_heads=3, alpha=4.0, init_batches=6).fit(tiny_llama(SEED), batches)
    ours, theirs = fitted_buffers(module.model), fitted_buffers(standalone)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0)
    fresh = load_adapter(tiny_llama(SEED), tmp_path / "out" / "adapter")
    assert torch.equal(run_base_logits(fresh, batches[0]), run_base_logits(standalone, batches[0]))


def test_init_batches_limits_what_the_trainer_reads(tmp_path) -> None:
    batches = labelled_batches()
    module = LitClassifierData()
    trainer = make_trainer(tmp_path, callbacks=[PEFTCallback(ITI(num_heads=3, init_batches=4))])
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    standalone = ITI(num_heads=3).fit(tiny_llama(SEED), batches[:4])
    assert selected_heads(module.model) == selected_heads(standalone)


# -- distributed ------------------------------------------------------------------------------------------
class _SameInterventionOnEveryRank(L.Callback):
    """At fit end (no training step ran, so no DDP broadcast could hide a rank that fitted its own): every rank
    holds the same heads, directions and sigma, though the ranks read different examples."""

    def on_fit_end(self, trainer, pl_module):
        flat = torch.cat([t.float().reshape(-1) for t in fitted_buffers(pl_module.model).values()])
        gathered = trainer.strategy.all_gather(flat)
        assert torch.equal(gathered[0], gathered[1]), "the ranks fitted different interventions"
        assert len(selected_heads(pl_module.model)) == 3
        first = next(iter(trainer.train_dataloader))["input_ids"]
        shards = trainer.strategy.all_gather(first)
        assert not torch.equal(shards[0], shards[1]), "both ranks saw the same batch"
        assert trainer.global_step == 0


def test_every_ddp_rank_fits_the_same_intervention(tmp_path) -> None:
    examples = [{key: batch[key][i] for key in batch} for batch in labelled_batches(8) for i in range(16)]
    trainer = make_trainer(
        tmp_path,
        strategy="ddp_spawn",
        devices=2,
        callbacks=[PEFTCallback(ITI(num_heads=3, alpha=4.0, init_batches=4)), _SameInterventionOnEveryRank(), DestroyProcessGroupAtTeardown()],
    )
    trainer.fit(LitClassifierData(), train_dataloaders=DataLoader(examples, batch_size=8))


# -- bad input --------------------------------------------------------------------------------------------
def test_more_heads_than_the_model_has_is_named() -> None:
    model = tiny_llama(SEED)
    with pytest.raises(ValueError, match=r"num_heads=9, but the 2 steerable layers have 8 attention heads \(4 each\); choose at most 8"):
        apply_peft(model, ITI(num_heads=9))
    assert not any(True for _ in adapter_layers(model))
    with pytest.raises(ValueError, match=r"num_heads=5, but the 1 steerable layers have 4 attention heads"):
        apply_peft(model, ITI(num_heads=5, layers=[1]))


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf")])
def test_alpha_that_is_not_finite_is_named(alpha: float) -> None:
    with pytest.raises(ValueError, match=r"alpha=(nan|inf|-inf): the steering strength must be a finite number"):
        ITI(alpha=alpha)


def test_layer_index_out_of_range_is_named() -> None:
    with pytest.raises(ValueError, match=r"layers=\[0, 2\]: \[2\] out of range; this model has blocks 0 .. 1"):
        apply_peft(tiny_llama(SEED), ITI(num_heads=1, layers=[0, 2]))


def test_a_single_class_is_refused() -> None:
    batches = labelled_batches()
    for batch in batches:
        batch["labels"] = torch.ones_like(batch["labels"])
    model = tiny_llama(SEED)
    with pytest.raises(ValueError, match=r"ITI needs examples of both classes \(labels 0 and 1\); the probes' training rows hold only class \[1\]"):
        ITI(num_heads=2).fit(model, batches)


def test_no_data_is_refused() -> None:
    with pytest.raises(ValueError, match="ITI got no batches of labelled examples to fit on"):
        ITI(num_heads=2).fit(tiny_llama(SEED), [])


def test_language_modelling_labels_are_refused() -> None:
    batch = labelled_batches(1)[0]
    batch["labels"] = batch["input_ids"]
    with pytest.raises(ValueError, match=r"ITI needs one class label per example \(labels of shape \(16,\)\), got labels of shape \(16, 6\)"):
        ITI(num_heads=2).fit(tiny_llama(SEED), [batch])


def test_more_than_two_classes_are_refused() -> None:
    batch = labelled_batches(1)[0]
    batch["labels"][0] = 2
    with pytest.raises(ValueError, match=r"ITI steers between two classes labelled 0 and 1; the batch has labels \[2\]"):
        ITI(num_heads=2).fit(tiny_llama(SEED), [batch])


def test_an_empty_trainer_dataloader_is_refused(tmp_path) -> None:
    trainer = make_trainer(tmp_path, callbacks=[PEFTCallback(ITI(num_heads=2, init_batches=4))])
    with pytest.raises(ValueError, match="init_batches=4 is larger than the train dataloader, which has 0 batches"):
        trainer.fit(LitClassifierData(), train_dataloaders=DataLoader([], batch_size=2))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_heads": 0}, r"num_heads=0: give how many attention heads to steer, an integer >= 1"),
    ({"direction": "pca"}, r"direction='pca'; choose one of \['mass_mean', 'probe'\]"),
    ({"validation_fraction": 1.0}, r"validation_fraction=1.0: the held-out share must be in \(0, 1\)"),
])
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ITI(**kwargs)

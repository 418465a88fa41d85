"""InCA: the backbone gets no gradient and stays bit-identical, each adapter reads exactly the backbone's own hidden
states of its block, N adapters trained together equal N separate runs, subsets export and reload, the Trainer
logs each adapter, DDP, and bad input."""

from __future__ import annotations

import copy
import csv

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning_helpers import DestroyProcessGroupAtTeardown, make_trainer
from tiny_models import tiny_bert, tiny_llama, tiny_llama_classifier
from torch.utils.data import DataLoader

from lightning_peft import InCA, LoRA, PEFTCallback, apply_peft, load_adapter, save_adapter
from lightning_peft.methods.inca import CrossAttentionAdapter, inca_adapters, keep_adapters

SEED = 5


def labelled_batches(n_batches: int = 4, batch_size: int = 8, length: int = 7, classes: int = 3, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(5, 60, (batch_size, length), generator=generator)
        lengths = torch.randint(3, length + 1, (batch_size,), generator=generator)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        labels = torch.randint(0, classes, (batch_size,), generator=generator)
        ids[:, 0] = 3 + labels  # the class is readable from the first token
        batches.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels})
    return batches


def train(model, batches, steps: int, lr: float = 1e-2) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def adapter_state(model, layer: int) -> dict[str, torch.Tensor]:
    adapter = inca_adapters(model).adapters[f"layer_{layer}"]
    return {k: v.detach().clone() for k, v in adapter.state_dict().items()}


# -- the backbone ---------------------------------------------------------------------------------------------
def test_the_backbone_gets_no_gradient_and_stays_bit_identical() -> None:
    model = tiny_bert(SEED, num_labels=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_peft(model, InCA(layers=[0, 1], heads=2))
    batches = labelled_batches()
    loss = model(**batches[0]).loss
    loss.backward()
    backbone = {n: p for n, p in model.named_parameters() if not n.startswith("lightning_peft_inca.")}
    assert all(p.grad is None and not p.requires_grad for p in backbone.values())
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("lightning_peft_inca."))
    train(model, batches, 5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_backbone_keeps_no_graph_and_runs_in_eval_mode_while_the_adapters_train() -> None:
    model = tiny_bert(SEED, num_labels=3)  # hidden dropout 0.1: train mode would change the activations
    apply_peft(model, InCA(layers=[1], heads=2))
    model.train()
    batch = labelled_batches()[0]
    first, second = model(**batch), model(**batch)
    assert torch.equal(first["inca_logits"], second["inca_logits"])
    assert model.bert.encoder.layer[0].training and inca_adapters(model).training  # modes restored after the call
    # Every backbone module runs with autograd off (so it saves nothing for backward); the adapters with it on.
    grad_on: dict[str, bool] = {}
    handles = [
        module.register_forward_pre_hook(lambda m, a, name=name: grad_on.__setitem__(name, torch.is_grad_enabled()))
        for name, module in model.named_modules() if name and not name.startswith("lightning_peft_inca")
    ]
    model(**batch).loss.backward()
    for handle in handles:
        handle.remove()
    assert grad_on and not any(grad_on.values()), [n for n, on in grad_on.items() if on]


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_each_adapter_reads_the_backbones_own_hidden_states_of_its_block(arch: str) -> None:
    model = tiny_bert(SEED, num_labels=3) if arch == "bert" else tiny_llama_classifier(SEED, num_labels=3)
    batch = labelled_batches()[0]
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states
    layers = [0, 1] if arch == "bert" else [0]  # Llama's last hidden_states entry has the final norm applied
    apply_peft(model, InCA(layers=layers, heads=2))
    seen: dict[int, torch.Tensor] = {}
    for layer in layers:
        adapter = inca_adapters(model).adapters[f"layer_{layer}"]
        adapter.register_forward_pre_hook(lambda m, args, layer=layer: seen.__setitem__(layer, args[0]))
    model(**batch)
    for layer in layers:
        assert torch.equal(seen[layer], hidden[layer + 1]), f"adapter of block {layer}"


# -- parallel equals separate ---------------------------------------------------------------------------------
def test_parallel_adapters_train_exactly_as_separate_runs() -> None:
    batches = labelled_batches()
    together = tiny_bert(SEED, num_labels=3)
    apply_peft(together, InCA(layers=[0, 1], heads=2, seed=1))
    train(together, batches, 6)
    for layer in (0, 1):
        alone = tiny_bert(SEED, num_labels=3)
        apply_peft(alone, InCA(layers=[layer], heads=2, seed=1))
        start = adapter_state(alone, layer)
        train(alone, batches, 6)
        ours, theirs = adapter_state(together, layer), adapter_state(alone, layer)
        assert any(not torch.equal(start[k], theirs[k]) for k in start), "nothing trained"
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0, msg=f"layer {layer}: {key}")


# -- files and subsets ----------------------------------------------------------------------------------------
def test_export_reloads_and_any_subset_can_be_kept(tmp_path) -> None:
    batches = labelled_batches()
    model = tiny_bert(SEED, num_labels=3)
    apply_peft(model, InCA(layers=[0, 1], heads=2))
    train(model, batches, 3)
    model.eval()
    with torch.no_grad():
        expected = model(**batches[0])["inca_logits"]
    save_adapter(model, tmp_path / "both")
    fresh = load_adapter(tiny_bert(SEED, num_labels=3), tmp_path / "both")
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(**batches[0])["inca_logits"], expected)
    keep_adapters(fresh, [1])
    with torch.no_grad():
        only = fresh(**batches[0])
    assert torch.equal(only["inca_logits"], expected[1:]) and torch.equal(only.logits, expected[1])
    save_adapter(fresh, tmp_path / "one")  # a file of the subset alone, which reloads as such
    again = load_adapter(tiny_bert(SEED, num_labels=3), tmp_path / "one").eval()
    assert list(inca_adapters(again).adapters) == ["layer_1"]
    with torch.no_grad():
        assert torch.equal(again(**batches[0])["inca_logits"], expected[1:])


# -- through a Trainer -----------------------------------------------------------------------------------------
class LitClassifier(L.LightningModule):
    def __init__(self, num_labels: int = 3) -> None:
        super().__init__()
        self.model = tiny_bert(SEED, num_labels=num_labels)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_the_callback_logs_each_adapter_and_picks_the_best(tmp_path) -> None:
    batches = labelled_batches(6)
    module = LitClassifier()
    trainer = make_trainer(tmp_path, max_steps=6, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1,
                           callbacks=[PEFTCallback(InCA(layers=[0, 1], heads=2))])
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None), val_dataloaders=DataLoader(batches[:2], batch_size=None))
    (metrics,) = (tmp_path / "run").glob("version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    logged = {k for row in rows for k, v in row.items() if v != ""}
    assert {"train_loss/inca_layer_0", "train_loss/inca_layer_1", "val_accuracy/inca_layer_0", "val_accuracy/inca_layer_1", "inca_best_layer"} <= logged
    # The accuracies are those of a manual evaluation of each adapter on the validation batches.
    model = module.model.eval()
    with torch.no_grad():
        correct = sum((model(**b)["inca_logits"].argmax(-1) == b["labels"]).sum(-1) for b in batches[:2])
    accuracy = correct.double() / 16
    last = [row for row in rows if row.get("val_accuracy/inca_layer_0")][-1]
    assert [float(last["val_accuracy/inca_layer_0"]), float(last["val_accuracy/inca_layer_1"])] == pytest.approx(accuracy.tolist())
    best = int(torch.argmax(accuracy))
    assert float(last["inca_best_layer"]) == best and inca_adapters(model).active == best


# -- DDP ------------------------------------------------------------------------------------------------------
class _SameAdaptersOnEveryRank(L.Callback):
    def on_fit_end(self, trainer, pl_module):
        adapters = inca_adapters(pl_module.model)
        flat = torch.cat([p.detach().reshape(-1) for p in adapters.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        assert torch.equal(gathered[0], gathered[1]), "the ranks' adapters differ"
        assert trainer.global_step == 4
        active = trainer.strategy.all_gather(torch.tensor(adapters.active))
        assert int(active[0]) == int(active[1])


def test_ddp_trains_the_same_adapters_on_both_ranks(tmp_path) -> None:
    examples = [{k: b[k][i] for k in b} for b in labelled_batches(8) for i in range(8)]
    trainer = make_trainer(tmp_path, strategy="ddp_spawn", devices=2, max_steps=4,
                           callbacks=[PEFTCallback(InCA(layers=[0, 1], heads=2)), _SameAdaptersOnEveryRank(), DestroyProcessGroupAtTeardown()])
    trainer.fit(LitClassifier(), train_dataloaders=DataLoader(examples, batch_size=4), val_dataloaders=DataLoader(examples[:16], batch_size=4))


# -- bad input ------------------------------------------------------------------------------------------------
def test_a_layer_that_does_not_exist_is_named() -> None:
    model = tiny_bert(SEED)
    with pytest.raises(ValueError, match=r"InCA layers=\[0, 7\]: \[7\] out of range; this model has blocks 0 .. 1"):
        apply_peft(model, InCA(layers=[0, 7], heads=2))
    assert not hasattr(model, "lightning_peft_inca")


def test_a_language_model_is_refused() -> None:
    with pytest.raises(ValueError, match="InCA classifies sequences; LlamaForCausalLM is a language model"):
        apply_peft(tiny_llama(SEED), InCA(heads=2))


def test_regression_is_refused() -> None:
    with pytest.raises(ValueError, match=r"InCA classifies into 2 or more classes; this model is set up for regression"):
        apply_peft(tiny_bert(SEED, num_labels=1), InCA(heads=2))
    with pytest.raises(ValueError, match=r"num_classes=1: InCA classifies into 2 or more classes"):
        InCA(num_classes=1)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"layers": []}, r"layers=\[\]: give 'all' or a non-empty list of block indices"),
    ({"layers": [1, 1]}, r"layers=\[1, 1\] names a block twice"),
    ({"heads": 0}, r"heads=0: must be an integer >= 1"),
    ({"hidden": 30, "heads": 4}, r"hidden=30: the adapters' width must be a positive multiple of heads=4"),
])
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InCA(**kwargs)


def test_heads_that_do_not_divide_the_width_are_named() -> None:
    with pytest.raises(ValueError, match=r"InCA heads=3 does not divide the adapters' width 32"):
        apply_peft(tiny_bert(SEED), InCA(heads=3))


def test_composing_inca_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="InCA cannot be composed with LoRA: InCA runs the backbone without gradient"):
        PEFTCallback([InCA(heads=2), LoRA(r=2, target_modules=["query"])])


def test_keep_adapters_refuses_a_layer_it_does_not_have() -> None:
    model = tiny_bert(SEED)
    apply_peft(model, InCA(layers=[0], heads=2))
    before = copy.deepcopy(adapter_state(model, 0))
    with pytest.raises(ValueError, match=r"keep_adapters\(layers=\[1\]\): this model's InCA adapters read layers \[0\]"):
        keep_adapters(model, [1])
    assert all(torch.equal(before[k], v) for k, v in adapter_state(model, 0).items())
    assert isinstance(inca_adapters(model).adapters["layer_0"], CrossAttentionAdapter)

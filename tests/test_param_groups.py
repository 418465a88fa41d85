"""Optimizer parameter groups (``lightning_peft.operations.param_groups``): LoRA+ against HF peft, layer-wise lr decay in closed
form, learning rates through optimizers and schedulers, the tasks, and the YAML command line."""

from __future__ import annotations

import copy
import math
import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
import yaml
from lightning_helpers import make_trainer
from tiny_models import VOCAB, input_ids, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from torch.utils.data import DataLoader

from lightning_peft import (
    LoRA,
    ParamGroups,
    PEFTCallback,
    apply_lr_scales,
    apply_peft,
    build_param_groups,
    lr_multipliers,
    param_groups,
)
from lightning_peft.core.adapter_layer import AdapterLayer
from lightning_peft.operations.param_groups import check_scheduler_keeps_scales
from lightning_peft.recipes.tasks import CausalLMTask

TARGETS = ["q_proj", "v_proj"]


def lora_llama(**lora: Any) -> nn.Module:
    model = tiny_llama(0, **lora.pop("config", {}))
    apply_peft(model, LoRA(**{"r": 4, "alpha": 8, "target_modules": TARGETS, **lora}))
    return model


def lr_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, prefix: str = "") -> dict[str, float]:
    """Every parameter the optimizer holds, by its name in ``model``, with its group's lr."""
    names = {id(p): name.removeprefix(prefix) for name, p in model.named_parameters()}
    result = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert names[id(p)] not in result, f"{names[id(p)]} is in two groups"
            result[names[id(p)]] = float(group["lr"])
    return result


# ------------------------------------------------------------------------------------------------
# LoRA+
# ------------------------------------------------------------------------------------------------
def _peft_to_ours(name: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` -> ``model.layers.0...q_proj.lora_A``."""
    name = name.removeprefix("base_model.model.")
    for matrix in ("lora_A", "lora_B"):
        name = name.replace(f".{matrix}.default.weight", f".{matrix}")
    return name


def test_loraplus_groups_equal_peft_create_loraplus_optimizer():
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    base = tiny_llama(0)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    peft_optimizer = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    expected = {_peft_to_ours(name): lr for name, lr in lr_by_name(peft_model, peft_optimizer).items()}

    ours = base
    apply_peft(ours, LoRA(r=4, alpha=8, target_modules=TARGETS))
    optimizer = apply_lr_scales(torch.optim.AdamW(build_param_groups(ours, ParamGroups(loraplus_ratio=16)), lr=1e-3))
    assert lr_by_name(ours, optimizer) == expected
    # Not vacuous: 2 layers x (q, v) x (A, B), half of them at 16x.
    assert len(expected) == 8 and sorted(set(expected.values())) == [1e-3, 1e-3 * 16]
    assert {name for name, lr in expected.items() if lr == 1e-3 * 16} == {n for n in expected if n.endswith(".lora_B")}

    # The convenience for a hand-written configure_optimizers gives the same absolute rates.
    assert lr_by_name(ours, torch.optim.AdamW(param_groups(ours, lr=1e-3, loraplus_ratio=16))) == expected


class _Magnitude(AdapterLayer):
    """An adapter with a 1-D tensor beside A and B, as DoRA's magnitude vector."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.Parameter(torch.zeros(2, base_layer.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, 2))
        self.lora_magnitude_vector = nn.Parameter(torch.ones(base_layer.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)


def test_loraplus_which_tensors_get_the_ratio():
    # Embedding adapters: B gets the ratio too (peft instead fixes both at lr 1e-6; see the module docstring).
    model = lora_llama(target_modules=["embed_tokens", *TARGETS])
    multipliers = lr_multipliers(model, ParamGroups(loraplus_ratio=4))
    assert multipliers["model.embed_tokens.lora_B"] == 4 and multipliers["model.embed_tokens.lora_A"] == 1

    # 1-D adapter tensors (DoRA's magnitude) get it; a trained head's bias (not an adapter) keeps the base rate.
    head = nn.Sequential()
    head.add_module("proj", _Magnitude(nn.Linear(3, 5)))
    head.add_module("out", nn.Linear(5, 2))
    for p in head.proj.base_layer.parameters():
        p.requires_grad_(False)
    assert lr_multipliers(head, ParamGroups(loraplus_ratio=4)) == {
        "proj.lora_A": 1.0, "proj.lora_B": 4.0, "proj.lora_magnitude_vector": 4.0, "out.weight": 1.0, "out.bias": 1.0,
    }  # fmt: skip

    # Frozen parameters are not listed at all.
    assert set(lr_multipliers(model, ParamGroups())) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_loraplus_without_adapters_warns_and_keeps_the_base_rate():
    model = nn.Linear(3, 3)
    with pytest.warns(UserWarning, match="no adapter layers"):
        assert lr_multipliers(model, ParamGroups(loraplus_ratio=16)) == {"weight": 1.0, "bias": 1.0}


# ------------------------------------------------------------------------------------------------
# Layer-wise decay
# ------------------------------------------------------------------------------------------------
def test_layer_decay_closed_form_on_a_4_layer_llama():
    d = 0.8
    model = lora_llama(config={"num_hidden_layers": 4}, target_modules=["embed_tokens", *TARGETS, "lm_head"], modules_to_save=["norm"])
    expected = {"model.embed_tokens.lora_A": d**4, "model.embed_tokens.lora_B": d**4}
    for i in range(4):
        for proj in TARGETS:
            for matrix in ("lora_A", "lora_B"):
                expected[f"model.layers.{i}.self_attn.{proj}.{matrix}"] = d ** (3 - i)
    expected.update({"model.norm.weight": 1.0, "lm_head.lora_A": 1.0, "lm_head.lora_B": 1.0})
    assert lr_multipliers(model, ParamGroups(layer_decay=d)) == expected

    # With LoRA+ too, the two multiply.
    both = lr_multipliers(model, ParamGroups(loraplus_ratio=16, layer_decay=d))
    assert both == {name: m * (16 if name.endswith("lora_B") else 1) for name, m in expected.items()}
    # layer_decay=1 changes nothing.
    assert set(lr_multipliers(model, ParamGroups(layer_decay=1.0)).values()) == {1.0}


def test_layer_decay_gpt2_and_bert_naming():
    d = 0.5
    gpt2 = tiny_gpt2(0)
    apply_peft(gpt2, LoRA(r=2, target_modules=["wte", "c_attn"], modules_to_save=["ln_f"]))
    assert lr_multipliers(gpt2, ParamGroups(layer_decay=d)) == {
        "transformer.wte.lora_A": d**2, "transformer.wte.lora_B": d**2,
        "transformer.h.0.attn.c_attn.lora_A": d, "transformer.h.0.attn.c_attn.lora_B": d,
        "transformer.h.1.attn.c_attn.lora_A": 1.0, "transformer.h.1.attn.c_attn.lora_B": 1.0,
        "transformer.ln_f.weight": 1.0, "transformer.ln_f.bias": 1.0,
    }  # fmt: skip

    bert = tiny_bert(0)
    apply_peft(bert, LoRA(r=2, target_modules=["word_embeddings", "query"], modules_to_save=["classifier"]))
    assert lr_multipliers(bert, ParamGroups(layer_decay=d)) == {
        "bert.embeddings.word_embeddings.lora_A": d**2, "bert.embeddings.word_embeddings.lora_B": d**2,
        "bert.encoder.layer.0.attention.self.query.lora_A": d, "bert.encoder.layer.0.attention.self.query.lora_B": d,
        "bert.encoder.layer.1.attention.self.query.lora_A": 1.0, "bert.encoder.layer.1.attention.self.query.lora_B": 1.0,
        "classifier.weight": 1.0, "classifier.bias": 1.0,
    }  # fmt: skip


def test_build_param_groups_one_group_per_multiplier_in_a_fixed_order():
    model = lora_llama(config={"num_hidden_layers": 3})
    groups = build_param_groups(model, ParamGroups(loraplus_ratio=16, layer_decay=0.5))
    names = {id(p): n for n, p in model.named_parameters()}
    multipliers = lr_multipliers(model, ParamGroups(loraplus_ratio=16, layer_decay=0.5))
    # Layers 0..2, A and B: 6 multipliers; every trainable parameter in exactly one group with its multiplier.
    assert [g["lr_scale"] for g in groups] == [0.25, 4.0, 0.5, 8.0, 1.0, 16.0]
    assert sorted(names[id(p)] for g in groups for p in g["params"]) == sorted(multipliers)
    for group in groups:
        assert {multipliers[names[id(p)]] for p in group["params"]} == {group["lr_scale"]}
    # The same model gives the same groups again (optimizer checkpoints rely on the order).
    again = build_param_groups(model, ParamGroups(loraplus_ratio=16, layer_decay=0.5))
    assert [[names[id(p)] for p in g["params"]] for g in again] == [[names[id(p)] for p in g["params"]] for g in groups]
    # weight_decay: on matrices, not on 1-D tensors.
    bert = tiny_bert(0)
    apply_peft(bert, LoRA(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    decayed = build_param_groups(bert, ParamGroups(), weight_decay=0.1)
    bert_names = {id(p): n for n, p in bert.named_parameters()}
    by_decay = {g["weight_decay"]: sorted(bert_names[id(p)] for p in g["params"]) for g in decayed}
    assert len(decayed) == 2
    assert by_decay[0.0] == ["classifier.bias"] and "classifier.weight" in by_decay[0.1]


# ------------------------------------------------------------------------------------------------
# Optimizers and schedulers
# ------------------------------------------------------------------------------------------------
def _scaled_optimizer(lr: float = 1e-3) -> torch.optim.Optimizer:
    groups = build_param_groups(lora_llama(), ParamGroups(loraplus_ratio=16))
    return apply_lr_scales(torch.optim.AdamW(groups, lr=lr))


@pytest.mark.parametrize("kind", ["lambda", "cosine"])
def test_schedulers_built_afterwards_start_from_the_scaled_rates(kind: str):
    optimizer = _scaled_optimizer(1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-3 * 16]
    if kind == "lambda":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / 10)  # linear warmup
        factors = [0.1, 0.2]
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
        factors = [1.0, (1 + math.cos(math.pi / 10)) / 2]
    assert scheduler.base_lrs == [1e-3, 1e-3 * 16]
    check_scheduler_keeps_scales(scheduler)
    for factor in factors:
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3 * factor, 16e-3 * factor], rel=1e-12)
        optimizer.step()
        scheduler.step()


def test_apply_lr_scales_once_and_before_the_scheduler():
    optimizer = _scaled_optimizer(1e-3)
    apply_lr_scales(optimizer)  # a second call does not scale again
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 16e-3]

    groups = build_param_groups(lora_llama(), ParamGroups(loraplus_ratio=16))
    late = torch.optim.AdamW(groups, lr=1e-3)
    torch.optim.lr_scheduler.LambdaLR(late, lambda step: 1.0)
    with pytest.raises(RuntimeError, match="apply_lr_scales first, then build the scheduler"):
        apply_lr_scales(late)


def test_scheduler_with_absolute_rates_is_refused():
    optimizer = _scaled_optimizer(1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=10)
    with pytest.raises(ValueError, match="OneCycleLR .* would undo LoRA\\+"):
        check_scheduler_keeps_scales(scheduler)
    # A max_lr per group in the right proportion is fine.
    optimizer = _scaled_optimizer(1e-3)
    check_scheduler_keeps_scales(torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[1e-2, 16e-2], total_steps=10))


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0, -2.0, float("inf"), float("nan"), True])
def test_bad_loraplus_ratio_is_named(ratio):
    with pytest.raises(ValueError, match=f"loraplus_ratio={ratio!r} is not allowed: it must be a finite number > 0"):
        ParamGroups(loraplus_ratio=ratio)


@pytest.mark.parametrize("decay", [1.5, 0, -0.5, 0.0])
def test_bad_layer_decay_is_named(decay):
    with pytest.raises(ValueError, match=rf"layer_decay={decay!r} is not allowed: it must be in \(0, 1\]"):
        ParamGroups(layer_decay=decay)


def test_good_values_are_floats():
    assert ParamGroups(16, 1) == ParamGroups(loraplus_ratio=16.0, layer_decay=1.0)
    assert isinstance(ParamGroups(16).loraplus_ratio, float)
    with pytest.raises(ValueError, match="lr=0"):
        param_groups(nn.Linear(2, 2), lr=0)


class _Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 3), nn.Linear(3, 1)


class _TwoStacks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleList([nn.Linear(3, 3) for _ in range(2)])
        self.decoder = nn.ModuleList([nn.Linear(3, 3) for _ in range(3)])


def test_layer_decay_needs_one_list_of_numbered_blocks():
    with pytest.raises(ValueError, match="layer_decay is set but _Flat has no numbered blocks"):
        lr_multipliers(_Flat(), ParamGroups(layer_decay=0.9))
    with pytest.raises(ValueError, match=r"has several: decoder \(3 blocks\), encoder \(2 blocks\)"):
        build_param_groups(_TwoStacks(), ParamGroups(layer_decay=0.9))
    # Without layer_decay a flat model is fine.
    assert lr_multipliers(_Flat(), ParamGroups()) == dict.fromkeys(["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"], 1.0)


# ------------------------------------------------------------------------------------------------
# The tasks and the command line
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny Llama (tests/tiny_models) with a word-level tokenizer, and a text to train on."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny_param_groups")
    tiny_llama(0).save_pretrained(root / "llama")
    vocab = {token: i for i, token in enumerate(["[pad]", "[bos]", "[eos]", "[unk]"] + [f"w{i}" for i in range(60)])}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(WordLevel(vocab, unk_token="[unk]"))
    backend.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[pad]", unk_token="[unk]", eos_token="[eos]", bos_token="[bos]").save_pretrained(root / "llama")
    (root / "text.txt").write_text("\n".join([" ".join(f"w{i}" for i in range(12))] * 20))
    return root


class _RecordStep(L.Callback):
    """Adapter tensors and their gradients just before the optimizer step."""

    def on_train_start(self, trainer, pl_module) -> None:
        randomize_adapters(pl_module)  # B starts at zero, which would give A no gradient in the first step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}


def test_task_with_loraplus_and_a_scheduler_steps_b_at_16x(tiny_dir, tmp_path):
    lr = 0.1
    task = CausalLMTask(
        str(tiny_dir / "llama"),
        optimizer=lambda p: torch.optim.SGD(p, lr=lr),
        # Constant: after the first step it puts each group back at its base rate, which is only the scaled
        # rate if the scales were applied before the scheduler was built.
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        param_groups=ParamGroups(loraplus_ratio=16),
    )
    ids = input_ids(batch=2, length=8)
    record = _RecordStep()
    trainer = make_trainer(tmp_path, callbacks=[PEFTCallback(LoRA(r=4, alpha=8, target_modules=TARGETS)), record], max_steps=1, enable_checkpointing=True)
    trainer.fit(task, DataLoader([{"input_ids": ids, "labels": ids}], batch_size=None))

    (optimizer,) = trainer.optimizers
    rates = lr_by_name(task, optimizer)
    assert len(rates) == 8 and sum(p.numel() for p in task.parameters() if p.requires_grad) == 896
    for name, rate in rates.items():
        assert rate == (lr * 16 if name.endswith("lora_B") else lr), name
    after = dict(task.named_parameters())
    for name, rate in rates.items():
        grad = record.grads[name]
        assert torch.count_nonzero(grad), f"{name} got no gradient"
        torch.testing.assert_close(after[name].detach(), record.before[name] - rate * grad, rtol=1e-6, atol=1e-9)

    # The hyperparameters keep the ParamGroups (picklable), and the checkpoint reloads with it.
    assert task.hparams.param_groups == ParamGroups(loraplus_ratio=16)
    pickle.loads(pickle.dumps(dict(task.hparams)))
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    restored = CausalLMTask.load_from_checkpoint(checkpoint)
    assert restored.param_groups == ParamGroups(loraplus_ratio=16)


def test_task_refuses_a_scheduler_that_undoes_the_scales(tiny_dir):
    task = CausalLMTask(
        str(tiny_dir / "llama"),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10),
        param_groups={"loraplus_ratio": 16},  # a mapping is turned into ParamGroups
    )
    task.peft_method = LoRA(r=4, target_modules=TARGETS)
    task.configure_model()
    with pytest.raises(ValueError, match="OneCycleLR set the groups' learning rates"):
        task.configure_optimizers()
    with pytest.raises(TypeError, match="unexpected keyword argument 'loraplus_ration'"):
        CausalLMTask(str(tiny_dir / "llama"), param_groups={"loraplus_ration": 16})


def _cli_config(tiny_dir: Path, tmp_path: Path) -> str:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1, "num_sanity_val_steps": 0, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path / "run")},
        "model": {"class_path": "lightning_peft.recipes.tasks.CausalLMTask", "init_args": {
            "model_name_or_path": str(tiny_dir / "llama"),
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}},
            "param_groups": {"layer_decay": 0.5}}},
        "data": {"class_path": "lightning_peft.recipes.data.TextFileDataModule", "init_args": {
            "tokenizer": str(tiny_dir / "llama"), "train_file": str(tiny_dir / "text.txt"), "block_size": 8, "batch_size": 2}},
        "peft": {"method": {"class_path": "lightning_peft.LoRA", "init_args": {"r": 4, "alpha": 8, "target_modules": TARGETS}}},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def test_yaml_param_groups_build_the_optimizer(tiny_dir, tmp_path, monkeypatch):
    from lightning_peft.recipes.cli import run_cli

    monkeypatch.setattr("sys.argv", ["lightning-peft"])
    # layer_decay from the YAML's nested dict, loraplus_ratio from the command line.
    cli = run_cli(["fit", "--config", _cli_config(tiny_dir, tmp_path), "--model.init_args.param_groups.loraplus_ratio=16"])
    assert cli.model.param_groups == ParamGroups(loraplus_ratio=16, layer_decay=0.5)
    (optimizer,) = cli.trainer.optimizers
    assert isinstance(optimizer, torch.optim.AdamW)
    rates = lr_by_name(cli.model, optimizer)
    assert len(rates) == 8
    for name, rate in rates.items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        assert rate == 1e-2 * (16 if name.endswith("lora_B") else 1) * 0.5 ** (1 - layer), name
    assert len(optimizer.param_groups) == 4


def test_yaml_param_groups_typo_is_named(tiny_dir, tmp_path, monkeypatch, capsys):
    from lightning_peft.recipes.cli import main

    monkeypatch.setattr("sys.argv", ["lightning-peft"])
    assert main(["fit", "--config", _cli_config(tiny_dir, tmp_path), "--model.init_args.param_groups.loraplus_ration=16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "loraplus_ration" in err.splitlines()[0], err[-2000:]
    assert "Traceback" not in err


def test_yaml_param_groups_bad_value_is_named(tiny_dir, tmp_path, monkeypatch):
    """Values are checked by ParamGroups itself when jsonargparse builds it (after parsing, before training)."""
    from lightning_peft.recipes.cli import run_cli

    monkeypatch.setattr("sys.argv", ["lightning-peft"])
    with pytest.raises(ValueError, match=r"layer_decay=1.5 is not allowed: it must be in \(0, 1\]"):
        run_cli(["fit", "--config", _cli_config(tiny_dir, tmp_path), "--model.init_args.param_groups.layer_decay=1.5"])

"""The ``lightning-peft`` command line, the task modules, and every YAML config in ``configs/``.

Everything except :func:`test_config_runs` uses tiny random-init models saved (with a word-level
tokenizer built here) into a temporary directory, so it needs no assets and runs in seconds.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
import yaml
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lightning_peft import disable_adapters, load_adapter, save_adapter
from lightning_peft.core.adapter_layer import adapter_layers, adapter_modules
from lightning_peft.core.transformers_compat import cache_argument
from lightning_peft.formats.peft_format import read_adapter_dir
from lightning_peft.methods import method_from_dict
from lightning_peft.recipes.cli import PEFTLightningCLI, main, run_cli
from lightning_peft.recipes.tasks import CausalLMTask, SequenceClassificationTask

REPO_ROOT = Path(__file__).resolve().parent.parent
# Recursive: a config in a sub-folder must not escape the test.
CONFIGS = sorted(REPO_ROOT.glob("configs/**/*.yaml"))
LORA_CONFIG = REPO_ROOT / "configs" / "lora.yaml"

SPECIALS = ["[pad]", "[unk]", "[eos]", "[bos]"]
WORDS = [f"w{i}" for i in range(60)] + ["good", "bad"]
VOCAB = {token: i for i, token in enumerate(SPECIALS + WORDS)}
HIDDEN = 32


# ------------------------------------------------------------------------------------------------
# Tiny models, data and configs
# ------------------------------------------------------------------------------------------------
def _save_tokenizer(path: Path) -> None:
    backend = Tokenizer(WordLevel(VOCAB, unk_token="[unk]"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[pad]", unk_token="[unk]", eos_token="[eos]", bos_token="[bos]"
    )
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """Tiny Llama and BERT directories (weights + tokenizer) and data files for them."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(VOCAB), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            pad_token_id=0, eos_token_id=2, bos_token_id=3, tie_word_embeddings=False,
        )
    )
    llama.save_pretrained(root / "llama")
    _save_tokenizer(root / "llama")
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=len(VOCAB), hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=2 * HIDDEN, max_position_embeddings=64, pad_token_id=0, num_labels=2,
        )
    )
    bert.save_pretrained(root / "bert")
    _save_tokenizer(root / "bert")
    # A text the tiny LM can learn quickly: the same 12-word phrase over and over.
    phrase = " ".join(f"w{i}" for i in range(12))
    (root / "text.txt").write_text("\n".join([phrase] * 60))
    # Sentiment the tiny classifier can learn: the label says whether the sentence contains "good".
    generator = torch.Generator().manual_seed(0)
    for split, n in (("train", 96), ("validation", 32)):
        with open(root / f"{split}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            for i in range(n):
                words = [f"w{int(j)}" for j in torch.randint(0, 60, (5,), generator=generator)]
                label = i % 2
                words.insert(int(torch.randint(0, 5, (1,), generator=generator)), "good" if label else "bad")
                writer.writerow([" ".join(words), label])
    return {key: str(root / name) for key, name in {
        "llama": "llama", "bert": "bert", "text": "text.txt", "train_csv": "train.csv", "val_csv": "validation.csv", "root": ".",
    }.items()}


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when it gets both ``args`` and a non-empty ``sys.argv`` (pytest's own)."""
    monkeypatch.setattr("sys.argv", ["lightning-peft"])


def _trainer(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    trainer = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 1,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "default_root_dir": str(tmp_path / "run"),
    }
    trainer.update(overrides)
    return trainer


def _lora(**overrides: Any) -> dict[str, Any]:
    init_args = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    init_args.update(overrides)
    return {"class_path": "lightning_peft.LoRA", "init_args": init_args}


def _causal_lm_config(tiny: dict[str, str], tmp_path: Path, method: Any = "lora", lr: float = 1e-2, **trainer: Any) -> dict[str, Any]:
    return {
        "seed_everything": 0,
        "trainer": _trainer(tmp_path, **trainer),
        "model": {
            "class_path": "lightning_peft.recipes.tasks.CausalLMTask",
            "init_args": {
                "model_name_or_path": tiny["llama"],
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr}},
            },
        },
        "data": {
            "class_path": "lightning_peft.recipes.data.TextFileDataModule",
            "init_args": {"tokenizer": tiny["llama"], "train_file": tiny["text"], "block_size": 16, "batch_size": 4},
        },
        "peft": {"method": _lora() if method == "lora" else method, "export_dir": str(tmp_path / "export")},
    }


def _write(config: dict[str, Any], path: Path) -> str:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def _run(config: dict[str, Any], tmp_path: Path, *extra: str) -> PEFTLightningCLI:
    return run_cli(["fit", "--config", _write(config, tmp_path / "config.yaml"), *extra])


# ------------------------------------------------------------------------------------------------
# (a) every config in configs/ runs (real assets)
# ------------------------------------------------------------------------------------------------
def test_configs_are_found():
    assert LORA_CONFIG in CONFIGS, CONFIGS
    assert (REPO_ROOT / "configs" / "lora_classification.yaml") in CONFIGS


@pytest.mark.assets
@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(REPO_ROOT / "configs")) for c in CONFIGS])
def test_config_runs(config: Path, assets_dir: Path, tmp_path: Path, monkeypatch, capsys):
    """Parse and run each config for 2 steps, then reload what it exported."""
    if config.name == "prefix_tuning_classification.yaml" and cache_argument(BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))) is None:
        pytest.skip("this transformers' BertForSequenceClassification takes no key/value cache (5.x passes one through): prefix tuning is refused there with a clear error, tested in test_prompt_methods.py")
    # Configs use paths relative to the repo root (assets/..., outputs/...): run in a scratch directory
    # whose `assets` points at the prepared assets, so nothing is written into the repository.
    (tmp_path / "assets").symlink_to(assets_dir.resolve(), target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    logs, export = tmp_path / "logs", tmp_path / "export"
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(logs), "name": "run"}}
    overrides = [
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        f"--trainer.logger={json.dumps(logger)}",
        f"--peft.export_dir={export}",
    ]
    assert main(["fit", "--config", str(config), *overrides]) == 0

    out = capsys.readouterr().out
    assert "held-out val_loss:" in out, out[-2000:]
    (metrics_file,) = logs.glob("run/version_*/metrics.csv")
    with open(metrics_file) as fh:
        rows = list(csv.DictReader(fh))
    logged = {key for row in rows for key, value in row.items() if value != ""}
    raw = yaml.safe_load(config.read_text())
    method = (raw.get("peft") or {}).get("method")
    trains = method is None or isinstance(method, list) or method_from_dict(method).trains_parameters  # ITI is fitted from data, with no step
    assert ({"train_loss", "val_loss"} if trains else {"val_loss"}) <= logged, logged
    assert logged & {"val_perplexity", "val_accuracy"}, logged

    if (raw.get("trainer") or {}).get("enable_checkpointing"):
        assert list(tmp_path.rglob("*.ckpt")), "checkpointing is on but no checkpoint was written"
    if method is None:
        assert not (export / "adapter").exists()
        return
    # The adapter reloads into a fresh base built from the same config, and it was trained.
    cli = PEFTLightningCLI(args=["--config", str(config), *overrides], run=False)  # run=False: no subcommand
    cli.model.configure_model()
    load_adapter(cli.model, export / "adapter")
    model = cli.model.model.eval()
    assert dict(adapter_modules(model)), "no adapters after load_adapter"
    # Every method here starts as the identity, so adapters that change the output have trained.
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with disable_adapters(model):
            base = model(input_ids=ids).logits
    assert not torch.allclose(adapted, base), "the loaded adapters do not change the output: nothing trained"
    # The file holds exactly the loaded model's view of its adapters (peft's, e.g. rank 2r for inits that
    # keep initial factors, or lightning_peft's own format): saving them again writes the same tensors.
    save_adapter(model, tmp_path / "again")
    _, tensors, _ = read_adapter_dir(export / "adapter")
    _, again, _ = read_adapter_dir(tmp_path / "again")
    assert set(again) == set(tensors)
    for key, tensor in tensors.items():
        torch.testing.assert_close(again[key], tensor, msg=key)


# ------------------------------------------------------------------------------------------------
# (b) a typo'd key is an error that names it, not a traceback
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "typo, bad_key",
    [
        ("trainer:\n  max_stepz: 2\n", "max_stepz"),
        ("peft:\n  method:\n    init_args:\n      rr: 8\n", "rr"),
        ("peft:\n  export_dirr: outputs\n", "export_dirr"),
        ("model:\n  init_args:\n    model_name_or_pat: x\n", "model_name_or_pat"),
    ],
    ids=["trainer", "peft-method", "peft", "model"],
)
def test_typo_in_yaml_names_the_key(typo: str, bad_key: str, tmp_path: Path, capsys):
    typo_file = tmp_path / "typo.yaml"
    typo_file.write_text(typo)
    assert main(["fit", "--config", str(LORA_CONFIG), "--config", str(typo_file)]) == 2
    err = capsys.readouterr().err
    first = err.strip().splitlines()[0]
    assert first.startswith("error: ") and bad_key in first, err  # the first line is the cause
    assert "Traceback" not in err and "usage:" not in err


def test_unknown_method_class_is_named(tmp_path: Path, capsys):
    typo_file = tmp_path / "typo.yaml"
    typo_file.write_text("peft:\n  method:\n    class_path: lightning_peft.LoRAA\n")
    assert main(["fit", "--config", str(LORA_CONFIG), "--config", str(typo_file)]) == 2
    first = capsys.readouterr().err.strip().splitlines()[0]
    assert first.startswith("error: ") and "class_path 'lightning_peft.LoRAA' does not exist; the methods are lightning_peft." in first
    assert "lightning_peft.LoRA," in first and "PEFTMethod" not in first


def test_an_unknown_method_argument_lists_the_accepted_ones(tmp_path: Path, capsys):
    typo_file = tmp_path / "typo.yaml"
    typo_file.write_text("peft:\n  method:\n    init_args:\n      rr: 8\n")
    assert main(["fit", "--config", str(LORA_CONFIG), "--config", str(typo_file)]) == 2
    first = capsys.readouterr().err.strip().splitlines()[0]
    # jsonargparse's own words changed ("Option 'rr' is not accepted" now, "Key 'rr' is not expected" in 4.35).
    assert re.fullmatch(r"error: peft\.method: .*'rr' is not (accepted|expected)\. LoRA takes: r, alpha, dropout, target_modules, "
                        r"exclude_modules, modules_to_save, rslora, init, svd_niter, init_batches, lora_ga_gamma", first), first


def test_a_bad_value_is_one_line_with_the_methods_own_message(tmp_path: Path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("peft:\n  method:\n    init_args:\n      r: 0\n")
    assert main(["fit", "--config", str(LORA_CONFIG), "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[0] == "error: LoRA rank r must be a positive integer, got r=0" and "Traceback" not in err


def test_a_repeated_key_is_refused_with_both_lines(tmp_path: Path, capsys):
    config = tmp_path / "twice.yaml"
    text = LORA_CONFIG.read_text().replace("peft:\n", "peft:\n  method:\n    class_path: lightning_peft.IA3\n", 1)
    config.write_text(text)
    first_line = text.splitlines().index("  method:") + 1
    second_line = [i for i, line in enumerate(text.splitlines(), 1) if line == "  method:"][1]
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[0]
    assert err == (
        f"error: {config}:{second_line}: key 'method' appears twice in one mapping (first on line {first_line}); YAML would "
        "silently keep only the second. Keep one of them"
    )


def test_help_lists_only_methods_that_can_be_used(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    listed = " ".join(capsys.readouterr().out.split())
    assert "lightning_peft.LoRA," in listed and "lightning_peft.PromptTuning" in listed
    assert "lightning_peft.PEFTMethod" not in listed and "VirtualTokenMethod" not in listed


# ------------------------------------------------------------------------------------------------
# (c) --print_config
# ------------------------------------------------------------------------------------------------
def test_print_config_shows_the_method_and_round_trips(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(LORA_CONFIG), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["peft"]["method"]["class_path"] == "lightning_peft.LoRA"
    assert config["peft"]["method"]["init_args"]["target_modules"] == ["q_proj", "v_proj"]
    assert config["model"]["init_args"]["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert "optimizer" not in config  # no LightningCLI automatic optimizer (it would miss the adapters)
    # The printed config is a complete config: feeding it back prints the same thing.
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert capsys.readouterr().out == printed


def test_method_is_optional_in_the_parser(tmp_path: Path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(LORA_CONFIG), "--peft.method=null", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["peft"]["method"] is None


# ------------------------------------------------------------------------------------------------
# (d) the optimizer holds exactly the trainable parameters; tiny end-to-end runs
# ------------------------------------------------------------------------------------------------
def test_optimizer_is_built_from_trainable_params_only(tiny, tmp_path: Path):
    cli = _run(_causal_lm_config(tiny, tmp_path), tmp_path)
    model = cli.model
    (optimizer,) = cli.trainer.optimizers
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in in_optimizer} == {id(p) for p in trainable}
    assert len(in_optimizer) == len(trainable)  # no duplicates
    # LoRA r=4 on q (32->32) and v (32->16) in 2 layers: 2 * 4 * ((32 + 32) + (32 + 16)) = 896.
    assert sum(p.numel() for p in in_optimizer) == 896
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and not {id(p) for p in frozen} & {id(p) for p in in_optimizer}
    assert (tmp_path / "export" / "adapter" / "adapter_model.safetensors").is_file()


def test_full_fine_tuning_without_method(tiny, tmp_path: Path):
    cli = _run(_causal_lm_config(tiny, tmp_path, method=None), tmp_path)
    (optimizer,) = cli.trainer.optimizers
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in cli.model.parameters()}
    assert all(p.requires_grad for p in cli.model.parameters())
    assert not any(True for _ in adapter_layers(cli.model.model))
    assert not (tmp_path / "export").exists()  # no PEFTCallback, so no export


def test_fit_prints_held_out_metrics_before_and_after(tiny, tmp_path: Path, capsys):
    cli = _run(_causal_lm_config(tiny, tmp_path, max_steps=10), tmp_path)
    before, after = cli.metrics_before, cli.metrics_after
    assert {"val_loss", "val_perplexity"} <= set(before) and {"val_loss", "val_perplexity"} <= set(after)
    assert math.exp(before["val_loss"]) == pytest.approx(before["val_perplexity"], rel=1e-4)
    assert after["val_perplexity"] < before["val_perplexity"]  # the adapters trained
    out = capsys.readouterr().out
    assert f"held-out val_perplexity: {before['val_perplexity']:.2f} -> {after['val_perplexity']:.2f}" in out


def test_classification_task_with_lora_and_head(tiny, tmp_path: Path):
    """validate -> fit (with validation each epoch) -> validate, on a tiny BERT."""
    config = {
        "seed_everything": 0,
        "trainer": _trainer(tmp_path, max_steps=-1, max_epochs=2, check_val_every_n_epoch=1),
        "model": {
            "class_path": "lightning_peft.recipes.tasks.SequenceClassificationTask",
            "init_args": {
                "model_name_or_path": tiny["bert"],
                "num_labels": 2,
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}},
                "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.LinearLR", "init_args": {"start_factor": 0.5, "total_iters": 4}},
            },
        },
        "data": {
            "class_path": "lightning_peft.recipes.data.ClassificationDataModule",
            "init_args": {"tokenizer": tiny["bert"], "train_file": tiny["train_csv"], "val_file": tiny["val_csv"], "batch_size": 8},
        },
        "peft": {"method": _lora(target_modules=["query", "value"], modules_to_save=["classifier"]), "export_dir": str(tmp_path / "export")},
    }
    cli = _run(config, tmp_path)
    assert {"val_loss", "val_accuracy"} <= set(cli.metrics_before) and {"val_loss", "val_accuracy"} <= set(cli.metrics_after)
    assert cli.trainer.global_step == 24  # 96 examples / 8 per batch, 2 epochs
    assert cli.trainer.lr_scheduler_configs[0].interval == "step"
    trainable = {n for n, p in cli.model.named_parameters() if p.requires_grad}
    assert {"model.classifier.weight", "model.classifier.bias"} <= trainable
    _, tensors, _ = read_adapter_dir(tmp_path / "export" / "adapter")
    assert "base_model.model.classifier.weight" in tensors


def test_checkpoint_reloads_with_load_from_checkpoint(tiny, tmp_path: Path):
    """save_hyperparameters: an adapter-only checkpoint made by the CLI rebuilds the module."""
    cli = _run(_causal_lm_config(tiny, tmp_path, max_steps=2, enable_checkpointing=True), tmp_path)
    (checkpoint,) = (tmp_path / "run").rglob("*.ckpt")
    restored = CausalLMTask.load_from_checkpoint(checkpoint)
    ours = dict(cli.model.named_parameters())
    for name, param in restored.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, ours[name])
    assert restored.hparams.model_name_or_path == tiny["llama"]


def test_task_outside_the_cli_with_default_optimizer(tiny, tmp_path: Path):
    """The default (lambda) optimizer is kept out of hparams, so checkpointing still works."""
    model = CausalLMTask(tiny["llama"])
    assert "optimizer" not in model.hparams and model.hparams.model_name_or_path == tiny["llama"]
    batches = [{"input_ids": torch.randint(4, len(VOCAB), (2, 8)), "labels": torch.randint(4, len(VOCAB), (2, 8))}]
    trainer = L.Trainer(**_trainer(tmp_path, max_steps=1, enable_checkpointing=True))
    trainer.fit(model, DataLoader(batches, batch_size=None))
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is torch.optim.AdamW and optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)
    (checkpoint,) = (tmp_path / "run").rglob("*.ckpt")
    CausalLMTask.load_from_checkpoint(checkpoint)


def test_val_loss_is_token_weighted(tiny, tmp_path: Path):
    """Two batches with 3 and 15 scored tokens: val_loss is the mean over tokens, not over batches."""
    model = CausalLMTask(tiny["llama"])
    model.configure_model()
    generator = torch.Generator().manual_seed(0)
    batches = []
    for scored_positions in ([(0, 1), (0, 2), (1, 5)], [(row, t) for row in range(2) for t in range(1, 9)][:15]):
        ids = torch.randint(4, len(VOCAB), (2, 9), generator=generator)
        labels = torch.full_like(ids, -100)
        for row, t in scored_positions:
            labels[row, t] = ids[row, t]
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    assert [int((b["labels"][:, 1:] != -100).sum()) for b in batches] == [3, 15]
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model.model(input_ids=batch["input_ids"]).logits[:, :-1]
            target = batch["labels"][:, 1:]
            nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum").item()
            tokens += int((target != -100).sum())
    trainer = L.Trainer(**_trainer(tmp_path))
    (result,) = trainer.validate(model, DataLoader(batches, batch_size=None), verbose=False)
    assert result["val_loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert result["val_perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_task_arguments_are_validated(tiny):
    with pytest.raises(ValueError, match="num_labels"):
        SequenceClassificationTask(tiny["bert"], num_labels=1)
    with pytest.raises(ValueError, match="dtype"):
        CausalLMTask(tiny["llama"], dtype="float8")  # type: ignore[arg-type]


@pytest.mark.assets
def test_prepare_assets_subcommand(assets_dir: Path, capsys):
    """`lightning-peft prepare-assets` dispatches to lightning_peft.recipes.assets (already prepared: quick)."""
    assert main(["prepare-assets", "--root", str(assets_dir)]) == 0
    assert "smollm2" in capsys.readouterr().out


def test_peft_key_and_callback_in_trainer_callbacks_is_an_error(tiny, tmp_path: Path):
    config = _causal_lm_config(tiny, tmp_path)
    config["trainer"]["callbacks"] = [{"class_path": "lightning_peft.PEFTCallback", "init_args": {"method": _lora()}}]
    with pytest.raises(ValueError, match="both under `peft:` and in `trainer.callbacks`"):
        _run(config, tmp_path)
    # With `peft.method: null` the callback in trainer.callbacks is the one used.
    config["peft"]["method"] = None
    cli = _run(config, tmp_path)
    assert sum(p.numel() for p in cli.model.parameters() if p.requires_grad) == 896


def test_merged_export_carries_the_tokenizer(tiny, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = _causal_lm_config(tiny, tmp_path, max_steps=2)
    config["peft"]["export_merged"] = True
    cli = _run(config, tmp_path)
    merged = tmp_path / "export" / "merged"
    AutoTokenizer.from_pretrained(merged)
    reloaded = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = torch.tensor([[VOCAB["w1"], VOCAB["w2"], VOCAB["w3"]]])
    cli.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, cli.model.model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)

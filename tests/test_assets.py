"""The offline assets: layout, that each output loads as what it claims to be, and idempotence.

Tests marked ``assets`` use the session-shared ``assets_dir`` fixture (tests/conftest.py), which
prepares the assets on first use (~40 s, mostly converting SmolLM2).
"""

from __future__ import annotations

import csv
import json
import math
import shutil

import pytest
import torch

from lightning_peft.recipes.assets import LAYOUT, asset_paths, main, prepare_assets

STEPS = ["smollm2", "minilm", "hamlet", "rotten_tomatoes", "chat"]


def test_asset_paths_follow_the_layout_without_touching_disk(tmp_path):
    paths = asset_paths(tmp_path / "a")
    assert paths == {key: tmp_path / "a" / rel for key, rel in LAYOUT.items()}
    assert not (tmp_path / "a").exists()


def test_main_skips_steps_whose_marker_and_outputs_exist(tmp_path, capsys):
    (tmp_path / ".done").mkdir()
    for step in STEPS:
        (tmp_path / ".done" / step).write_text("done\n")
    for path in asset_paths(tmp_path).values():  # stand-ins: existence is all that is checked
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("stand-in")
    assert main(["--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("already prepared") == len(STEPS)
    assert str(tmp_path / "data" / "hamlet.txt") in out
    assert (tmp_path / "data" / "hamlet.txt").read_text() == "stand-in"  # nothing was redone


@pytest.mark.assets
def test_prepare_assets_returns_existing_paths_and_markers(assets_dir):
    paths = prepare_assets(assets_dir)
    assert set(paths) == set(LAYOUT)
    for key, path in paths.items():
        assert path.exists(), key
    assert sorted(p.name for p in (assets_dir / ".done").iterdir()) == sorted(STEPS)


@pytest.mark.assets
def test_smollm2_reloads_as_a_plain_causal_lm(assets_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare_assets(assets_dir)["smollm2"]
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert config["dtype"] == "bfloat16"  # stored at half the size; float32 below is faster on CPU
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    assert not getattr(model, "is_quantized", False)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6  # 134.5M with tied embeddings

    batch = tokenizer("The cat sat on the mat and looked out of the window at the rain.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss.item()
    assert loss < 0.6 * math.log(49152)  # ~3 nats for the real model, ~10.8 for a uniform guess

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )  # fmt: skip
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])


@pytest.mark.assets
def test_minilm_loads_as_a_sequence_classifier(assets_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = prepare_assets(assets_dir)["minilm"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    batch = tokenizer(["A wonderful film.", "Dull and far too long."], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == tokenizer.cls_token_id
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


@pytest.mark.assets
def test_rotten_tomatoes_splits(assets_dir):
    paths = prepare_assets(assets_dir)

    def read(key):
        with open(paths[key], encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            assert reader.fieldnames == ["text", "label"]
            return [(row["text"], int(row["label"])) for row in reader]

    train, val = read("rotten_tomatoes_train"), read("rotten_tomatoes_validation")
    assert (len(train), len(val)) == (11752, 1000)  # 12,752 unique fresh/rotten sentences
    texts = [t for t, _ in train + val]
    assert len(set(texts)) == len(texts) and all(texts)
    assert {label for _, label in train + val} == {0, 1}
    fresh = sum(label for _, label in val) / len(val)
    assert 0.5 < fresh < 0.7  # ~58% fresh overall; a seeded shuffle keeps val near it


@pytest.mark.assets
def test_chat_splits(assets_dir):
    paths = prepare_assets(assets_dir)

    def read(key):
        return [json.loads(line) for line in paths[key].read_text(encoding="utf-8").splitlines()]

    train, val = read("chat_train"), read("chat_validation")
    assert len(train) + len(val) == 2026 and len(val) == round(0.1 * 2026)
    for record in train + val:
        roles = [m["role"] for m in record["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        assert all(isinstance(m["content"], str) and m["content"] for m in record["messages"])


@pytest.mark.assets
def test_hamlet_text(assets_dir):
    text = prepare_assets(assets_dir)["hamlet"].read_text(encoding="utf-8")
    assert len(text) > 170_000 and "To be, or not to be" in text


@pytest.mark.assets
def test_redo_after_interruption_and_deterministic_splits(assets_dir, tmp_path):
    # Pretend the two model steps are done (marker + output), so only the cheap data steps run here.
    root = tmp_path / "assets"
    (root / ".done").mkdir(parents=True)
    for step in ["smollm2", "minilm"]:
        (root / ".done" / step).write_text("done\n")
        asset_paths(root)[step].mkdir()
    paths = prepare_assets(root)
    shared = asset_paths(assets_dir)
    for key in ["rotten_tomatoes_train", "rotten_tomatoes_validation", "chat_train", "chat_validation", "hamlet"]:
        assert paths[key].read_bytes() == shared[key].read_bytes(), key  # same seed, same split

    # An interrupted chat step leaves no marker: the next run redoes it and repairs the file.
    (root / ".done" / "chat").unlink()
    paths["chat_train"].write_text("half-written")
    mtime_hamlet = paths["hamlet"].stat().st_mtime_ns
    prepare_assets(root)
    assert paths["chat_train"].read_bytes() == shared["chat_train"].read_bytes()
    assert paths["hamlet"].stat().st_mtime_ns == mtime_hamlet  # its marker was there: not redone

    # Outputs deleted after a finished run are recreated too, not trusted to the marker alone.
    shutil.rmtree(root / "data")
    prepare_assets(root)
    assert paths["rotten_tomatoes_validation"].read_bytes() == shared["rotten_tomatoes_validation"].read_bytes()

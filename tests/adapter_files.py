"""Rewriting an adapter directory's files in tests, the way another writer would.

An edit that keeps our safetensors metadata as it was would also keep a checksum that no longer matches, and
the file would be refused as damaged before any other check: these helpers refresh the checksum (a file
written whole with other tensors) or drop our metadata (a file written by HF peft).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lightning_peft.formats.adapter_dir import CHECKSUM_KEY, CONFIG_COPY_KEY, CONFIG_NAME, WEIGHTS_NAME, tensors_checksum


def rewrite_tensors(path: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> None:
    """Change the tensors in place (``change`` edits the dict) and write them back with a fresh checksum."""
    file = Path(path) / WEIGHTS_NAME
    with safe_open(str(file), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors = load_file(str(file))
    change(tensors)
    if CHECKSUM_KEY in metadata:
        metadata[CHECKSUM_KEY] = tensors_checksum(tensors)
    save_file(tensors, file, metadata=metadata)


def rewrite_metadata(path: Path, change: Callable[[dict[str, str]], object]) -> None:
    file = Path(path) / WEIGHTS_NAME
    with safe_open(str(file), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors = load_file(str(file))
    change(metadata)
    save_file(tensors, file, metadata=metadata)


def as_peft_written(path: Path, **config_changes: object) -> None:
    """Drop all of our metadata, as a file written by HF peft lacks it, and change adapter_config.json fields
    (a value of None removes the field)."""
    rewrite_metadata(path, lambda metadata: [metadata.pop(k) for k in list(metadata) if k.startswith("lightning_peft.")])
    edit_config(path, **config_changes)


def edit_config(path: Path, **changes: object) -> None:
    config_file = Path(path) / CONFIG_NAME
    config = json.loads(config_file.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    config_file.write_text(json.dumps(config))


def rewrite_recorded_config(path: Path) -> None:
    """Make the config copy in the metadata agree with adapter_config.json again (a consistent rewrite)."""
    text = (Path(path) / CONFIG_NAME).read_text()
    rewrite_metadata(path, lambda metadata: metadata.update({CONFIG_COPY_KEY: json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"}))

"""An adapter directory on disk: its two files, written and read with every check in one place.

Both file formats (HF peft's, :mod:`~lightning_peft.formats.peft_format`, and ours,
:mod:`~lightning_peft.formats.native_format`) are the same two files::

    adapter_config.json          what the adapter is (peft's fields, or our method config)
    adapter_model.safetensors    the tensors; the header metadata holds {"format": "pt"} and ours:
        lightning_peft.method             the exact method config (peft's config cannot hold all of it)
        lightning_peft.base_fingerprint   what the base model looked like (core/fingerprint.py)
        lightning_peft.tensors_sha256     a checksum of every tensor's name, dtype, shape and bytes
        lightning_peft.adapter_config     adapter_config.json exactly as it was written

Why the last two: a safetensors file whose header is intact but whose data is damaged loads without
complaint and gives garbage logits, so the data is checksummed; and a directory must mean one model to
every reader, but peft reads ``adapter_config.json`` while we read the method from the metadata, so an
edited ``lora_alpha`` would give different logits in the two libraries. The copy of the config lets a load
find such a contradiction and name both values instead of picking one. Files without our metadata (written
by peft) are read as peft reads them, with a warning that nothing ties them to a base model.

Reading never runs code: only safetensors and JSON are parsed; a pickled ``adapter_model.bin`` is refused
without being opened. Non-finite tensors (a diverged run) are refused on write and on read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from lightning_peft.formats.atomic import atomic_directory, recover_interrupted_write, write_adapter_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
METHOD_KEY = "lightning_peft.method"
FINGERPRINT_KEY = "lightning_peft.base_fingerprint"
CHECKSUM_KEY = "lightning_peft.tensors_sha256"
CONFIG_COPY_KEY = "lightning_peft.adapter_config"


class AdapterFileError(ValueError):
    """An adapter directory that is incomplete, corrupt, unsafe, contradicts itself or does not fit the model."""


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and raw bytes, in name order (CPU copies)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        # A copy, never the caller's storage: .numpy() marks a storage as not resizable for good, and FSDP1
        # frees the gathered parameters it lent us by resizing theirs to 0 (one tensor at a time: no peak).
        tensor = tensors[name].detach().to("cpu", copy=True).contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(name for name, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all())


def config_text(config: dict[str, Any]) -> str:
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def write_adapter_dir(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict[str, Any], metadata: dict[str, str]) -> Path:
    """Write ``config`` and ``tensors`` (with ``metadata`` plus our checksum and config copy) to ``path``, atomically."""
    bad = non_finite(tensors)
    if bad:
        raise ValueError(
            f"refusing to write an adapter with non-finite values (NaN or inf) in {len(bad)} tensors (e.g. {bad[:3]}): the "
            f"training run diverged. Lower the learning rate or enable gradient clipping, and resume from an earlier checkpoint"
        )
    text = config_text(config)
    metadata = {**metadata, CHECKSUM_KEY: tensors_checksum(tensors), CONFIG_COPY_KEY: text}
    with atomic_directory(path) as staging:
        write_adapter_tensors(tensors, staging / WEIGHTS_NAME, metadata)
        (staging / CONFIG_NAME).write_text(text)
    return Path(path)


def read_adapter_dir(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """(config, tensors, safetensors metadata) of an adapter directory, after every check that needs no model:
    no pickles, valid JSON and safetensors, the tensors match their checksum and are finite, and the config
    agrees with the one recorded when the directory was written."""
    directory = Path(path)
    try:
        recover_interrupted_write(directory)  # an export killed after its commit mark: finish it first
    except OSError as err:  # a read-only copy: read what is in place, and say why it may be behind
        rank_zero_warn(f"could not finish an interrupted export in {directory} ({err}); reading the files in place")
    if not directory.is_dir():
        raise AdapterFileError(f"adapter path {str(directory)!r} is not a directory (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not weights_file.exists():
        pickles = [name for name in PICKLE_NAMES if (directory / name).exists()]
        if pickles:
            raise AdapterFileError(
                f"{directory / pickles[0]} is a pickle, which can run arbitrary code when loaded; lightning_peft "
                f"reads only {WEIGHTS_NAME}. Convert it once in a trusted environment: "
                f"safetensors.torch.save_file(torch.load(f, weights_only=True), '{WEIGHTS_NAME}')"
            )
        raise AdapterFileError(f"{directory} has no {WEIGHTS_NAME}")
    if not config_file.exists():
        raise AdapterFileError(f"{directory} has no {CONFIG_NAME}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{config_file} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise AdapterFileError(f"{config_file} must hold a JSON object, got {type(config).__name__}")
    try:
        with safe_open(str(weights_file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"{weights_file} is not a valid safetensors file ({err}); it may be corrupt or a renamed pickle") from err
    _check_integrity(directory, config, tensors, metadata)
    return config, tensors, metadata


def _check_integrity(directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    recorded = metadata.get(CHECKSUM_KEY)
    if recorded is not None and tensors_checksum(tensors) != recorded:
        raise AdapterFileError(
            f"{directory / WEIGHTS_NAME}: the tensors do not match the checksum recorded when they were written; the file "
            f"is damaged (a partial copy, a bad disk) or was edited. Restore it from a good copy or export again"
        )
    bad = non_finite(tensors)
    if bad:
        raise AdapterFileError(
            f"{directory / WEIGHTS_NAME} holds non-finite values (NaN or inf) in {len(bad)} tensors (e.g. {bad[:3]}); an adapter "
            f"trained into NaN would turn every output into NaN. Use an earlier checkpoint's adapter"
        )
    written = metadata.get(CONFIG_COPY_KEY)
    if written is not None:
        differences = _differences(json.loads(written), config)
        if differences:
            shown = "; ".join(f"{key}: {CONFIG_NAME} says {now!r}, the adapter was written with {then!r}" for key, now, then in differences[:3])
            raise AdapterFileError(
                f"{directory / CONFIG_NAME} contradicts the config recorded in {WEIGHTS_NAME} when the adapter was written "
                f"({shown}); HF peft would read one and lightning_peft the other. Restore the written values, or load the "
                f"adapter, change the method and save it again"
            )
    if FINGERPRINT_KEY not in metadata:
        rank_zero_warn(
            f"adapter in {directory} carries no base-model fingerprint ({FINGERPRINT_KEY} in the {WEIGHTS_NAME} metadata; "
            f"files written by HF peft have none), so nothing checks that it was trained on this base model: check "
            f"its base_model_name_or_path ({config.get('base_model_name_or_path')!r}) yourself"
        )


def _differences(written: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    keys = sorted(set(written) | set(now))
    return [(key, now.get(key), written.get(key)) for key in keys if now.get(key) != written.get(key)]


def check_tensors_fit(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: Any, model: nn.Module) -> None:
    """Raise :class:`AdapterFileError` unless ``tensors`` has exactly the keys of ``expected``, with their shapes."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(
            f"adapter in {source} does not fit {type(model).__name__}: "
            + (f"{len(missing)} tensors missing (e.g. {missing[:3]}) " if missing else "")
            + (f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})" if unexpected else "")
        )
    wrong_shape = [(k, list(tensors[k].shape), list(v.shape)) for k, v in expected.items() if tensors[k].shape != v.shape]
    if wrong_shape:
        key, got, want = wrong_shape[0]
        raise AdapterFileError(f"adapter in {source}: tensor {key} has shape {got}, the model needs {want} ({len(wrong_shape)} tensors differ)")

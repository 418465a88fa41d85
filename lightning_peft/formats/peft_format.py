"""Adapters in HF peft's file format: ``adapter_config.json`` + ``adapter_model.safetensors``.

The format is what HF peft, vLLM's multi-LoRA serving and most hubs read:

- tensor keys are ``base_model.model.<module path>.<suffix>`` with peft's suffixes (``lora_A.weight``,
  ``lora_embedding_A``, ...) and no adapter name; fully trained ``modules_to_save`` appear under their
  plain parameter names;
- the safetensors metadata holds ``{"format": "pt"}``; we add a fingerprint of the base weights
  (``lightning_peft.base_fingerprint``), which peft ignores and we use to refuse a wrong base.

Methods peft does not have (bottleneck adapters, Compacter, BitFit) are written in lightning_peft's own
format in the same two files (:mod:`lightning_peft.formats.native_format`); ``load_adapter`` reads both.

Loading is strict where peft is lenient: a missing or unexpected tensor is an error (peft only warns
and leaves the layer at its random init), and only safetensors are read: a pickled ``adapter_model.bin``
can execute code on load and is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft.core.adapter_layer import PEFT_KEY_PREFIX, adapter_layers, adapter_modules
from lightning_peft.core.fingerprint import base_fingerprint, check_fingerprint
from lightning_peft.core.injection import apply_peft, injected_method, injection_rolled_back_on_error, modules_to_save_parameters
from lightning_peft.core.model_lookup import resolve_model
from lightning_peft.core.sharding import state_dict_name
from lightning_peft.core.targets import matches, name_matches, exact_names_pattern, find_targets
from lightning_peft.formats.adapter_dir import FINGERPRINT_KEY, METHOD_KEY, check_tensors_fit, read_adapter_dir, write_adapter_dir
from lightning_peft.formats.native_format import is_native_config, load_native_adapter, save_native_adapter
from lightning_peft.methods import PEFTMethod, method_for_peft_config, method_from_dict

PREFIX = PEFT_KEY_PREFIX


def _task_type(model: nn.Module) -> str | None:
    architectures = getattr(getattr(model, "config", None), "architectures", None) or [type(model).__name__]
    name = architectures[0]
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None


def _target_modules_field(model: nn.Module, targets: list[str]) -> list[str] | str:
    """Leaf names when they select exactly ``targets`` (what vLLM and peft expect), else an exact regex."""
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    # In the state-dict spelling of ``targets``: an FSDP1 unit and the module it wraps are then one name.
    names = {state_dict_name(n) for n, _ in model.named_modules()}
    selected = [n for n in names if n.rsplit(".", 1)[-1] in leaves and ".base_layer" not in n]
    if sorted(selected) == sorted(targets):
        return leaves
    return exact_names_pattern(targets)


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """All adapter tensors of ``model`` (a transformers model with adapters) under peft's keys."""
    method = injected_method(model)
    if method is None:
        raise ValueError(f"{type(model).__name__} has no adapters (apply a method with PEFTCallback or apply_peft first)")
    tensors: dict[str, torch.Tensor] = {}
    for name, adapter in adapter_modules(model):
        for suffix, tensor in adapter.peft_state_dict().items():
            tensors[adapter.peft_key(name, suffix)] = tensor
    tensors.update({PREFIX + name: param for name, param in modules_to_save_parameters(model, method).items()})
    return tensors


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapters of ``model`` (or of the transformers model inside a LightningModule) to ``path``.

    The directory loads with ``peft.PeftModel.from_pretrained(base, path)``. The write is atomic.
    """
    model = resolve_model(model)
    method = injected_method(model)
    if method is None:
        raise ValueError(f"{type(model).__name__} has no adapters (apply a method with PEFTCallback or apply_peft first)")
    # Ours, beside peft's fields and ignored by peft: the exact method config (peft warns about unknown
    # keys in adapter_config.json, so it lives in the safetensors header) and the base fingerprint. The
    # method is the one the file describes: P-tuning's encoder, for one, is folded into the prompt it made.
    exported = method.exported()
    if exported is None:
        raise ValueError(
            f"{method!r} trains no adapter tensors, so there is no adapter to save: the model itself is the result "
            f"(save it with save_pretrained, or PEFTCallback(export_merged=True))"
        )
    metadata = {
        "format": "pt",
        METHOD_KEY: json.dumps(exported.to_dict()),
        FINGERPRINT_KEY: json.dumps(base_fingerprint(model)),
    }
    if not method.writes_peft_format(model):
        return save_native_adapter(model, path, _task_type(model), metadata)
    tensors = adapter_tensors(model)
    targets = [name for name, _ in adapter_layers(model)]
    config: dict[str, Any] = {
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "task_type": _task_type(model),
        "modules_to_save": exported.modules_to_save or None,
        "inference_mode": True,
        "revision": None,
    }
    if targets:  # prompt-learning configs have no target modules: their adapters wrap no layer
        config["target_modules"] = _target_modules_field(model, targets)
    config.update(method.peft_config(model, targets))
    return write_adapter_dir(path, tensors, config, metadata)


def method_from_adapter_config(config: dict[str, Any], model: nn.Module | None = None, metadata: dict[str, str] | None = None) -> PEFTMethod:
    """Our exact method config when the file carries it, else the method peft's ``peft_type`` maps to."""
    if metadata and METHOD_KEY in metadata:
        return method_from_dict(json.loads(metadata[METHOD_KEY]))
    if model is not None:
        config = _prune_peft_names(config, model)
    return method_for_peft_config(config).from_peft_config(config)


def _prune_peft_names(config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Drop the names in a peft-written config that match nothing in ``model``, as peft itself does.

    Our own configs treat such a name as a typo and refuse it; peft's are lenient and its files rely on
    that: it adds both "classifier" and "score" to ``modules_to_save`` of every SEQ_CLS adapter whichever
    head the model has, keeps ``exclude_modules`` entries that exclude nothing, and accepts a
    ``target_modules`` list of which only some entries match. Nothing is lost by pruning: the loader still
    checks that every tensor in the file has a place in the model and every adapter a tensor.
    """
    names = [name for name, _ in model.named_modules() if name]
    config = dict(config)
    targets = config.get("target_modules")
    if isinstance(targets, list):
        config["target_modules"] = [t for t in targets if any(name_matches(n, t) for n in names)] or targets
    if config.get("modules_to_save"):
        kept = [m for m in config["modules_to_save"] if any(name_matches(n, m) for n in names)]
        config["modules_to_save"] = list(dict.fromkeys(kept)) or None
    exclude = config.get("exclude_modules")
    if exclude:
        try:
            selected = find_targets(model, config.get("target_modules"), supports=lambda module: True)
        except ValueError:
            return config  # let the method report the bad targets
        if isinstance(exclude, str):
            config["exclude_modules"] = exclude if any(matches(n, exclude) for n in selected) else None
        else:
            config["exclude_modules"] = [e for e in exclude if any(name_matches(n, e) for n in selected)] or None
    return config


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter directory (ours or HF peft's) into ``model``; returns the model.

    A model without adapters gets them injected from the file's config first. Every tensor must be
    present and of the right shape, and the base must match the fingerprint when the file has one.
    """
    model = resolve_model(model)
    config, tensors, metadata = read_adapter_dir(path)
    if FINGERPRINT_KEY in metadata:
        check_fingerprint(json.loads(metadata[FINGERPRINT_KEY]), model, what=f"adapter in {path}")
    with injection_rolled_back_on_error(model):  # a file that does not fit leaves the model as it was
        if is_native_config(config):
            return load_native_adapter(model, config, tensors, str(path))
        return _load_peft_adapter(model, config, tensors, metadata, path)


def _load_peft_adapter(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Any) -> nn.Module:
    method = injected_method(model) or method_from_adapter_config(config, model, metadata)
    apply_peft(model, method)
    expected = adapter_tensors(model)
    layers = dict(adapter_layers(model))
    adapters = dict(adapter_modules(model))
    # peft writes the full input/output embedding matrix beside adapters on ``embed_tokens`` or
    # ``lm_head`` (``save_embedding_layers``, for resized vocabularies); it is part of the base, so it is
    # loaded into the base weight as peft does. ``lm_head`` is an nn.Linear, so go by the model's own
    # embedding accessors rather than by layer type.
    embedding_modules = [
        getter() for getter in (getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)) if callable(getter)
    ]
    embedding_bases = {
        f"{PREFIX}{name}.base_layer.weight": layer.base_layer.weight
        for name, layer in layers.items()
        if (isinstance(layer.base_layer, nn.Embedding) or any(m is layer or m is layer.base_layer for m in embedding_modules))
        and f"{PREFIX}{name}.base_layer.weight" in tensors
    }
    expected.update(embedding_bases)
    check_tensors_fit(expected, tensors, path, model)
    with torch.no_grad():
        for key, weight in embedding_bases.items():
            weight.copy_(tensors[key].to(weight.dtype))
        for name, adapter in adapters.items():
            adapter.load_peft_state_dict({s: tensors[adapter.peft_key(name, s)] for s in adapter.peft_state_dict()})
        for name, param in modules_to_save_parameters(model, method).items():
            param.copy_(tensors[PREFIX + name].to(param.dtype))
    return model

"""Merged 16-bit export of a model whose base is quantized, from the ORIGINAL weights.

A k-bit model no longer holds its full-precision weights, and dequantizing them gives back an
approximation (NF4: ~9% relative error per matrix), not the model the adapters were trained for. So
the merged export re-reads each original weight from the checkpoint the base was loaded from, adds
the adapter's delta in float32 and writes the sum in 16 bits::

    W_merged = W_original + s * B @ A          (nothing is quantized or requantized)

It streams like the loader: output shards mirror the source's and are written tensor by tensor, so
host memory holds one tensor at a time. Every quantized weight read back is checked against the
signature recorded when it was quantized (or, for a model quantized elsewhere, against its
dequantized weight): a source holding other weights is an error, not a silent merge into another model.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lightning_peft.core.adapter_layer import BASE_LAYER, AdapterLayer, adapter_layers, base_parameter_name
from lightning_peft.operations.merging import merged_bias_plan
from lightning_peft.quantization.layers import dequantized_weight, is_quantized_linear
from lightning_peft.quantization.loading import _checkpoint_name_map
from lightning_peft.quantization.merge import relative_error
from lightning_peft.quantization.record import QuantizationRecord, quantization_record, resolve_source, source_of
from lightning_peft.quantization.safetensors_stream import INDEX_NAME, checkpoint_files, checkpoint_index, read_tensor, write_streaming

# A source weight further than this from the model's dequantized weight is a different weight: NF4 is
# off by ~0.1 (FP4 ~0.12), unrelated matrices of the same scale by ~1.4.
_SAME_WEIGHT_TOLERANCE = 0.5


class QuantizedExportError(ValueError):
    """A merged export of a k-bit model whose original weights cannot be found or do not match."""


def resolve_export_source(model: nn.Module, source: str | os.PathLike | None) -> Path | None:
    """The directory to read original weights from: ``source``, else where the model was loaded from."""
    if source is not None:
        path = resolve_source(source)
        if path is None:
            raise QuantizedExportError(f"source={str(source)!r} is not a directory (nor a cached Hub id) with safetensors weights")
        return path
    record = quantization_record(model)
    return resolve_source(record.source if record is not None and record.source else source_of(model))


def check_merged_export_possible(model: nn.Module) -> None:
    """A merged export of a k-bit model needs its original checkpoint, and biases a merge adds need a config that
    can carry them: fail at setup, not after training."""
    merged_bias_plan(model)
    kbit = any(is_quantized_linear(m) for m in model.modules())
    if kbit and any(layer.adds_bias for _, layer in adapter_layers(model)):
        raise NotImplementedError(
            "a merged export of a k-bit model whose merge adds biases (an inference-time intervention) is not supported: "
            "export the adapter, or load the base in 16 bits"
        )
    if kbit and resolve_export_source(model, None) is None:
        raise QuantizedExportError(
            "export_merged=True with a quantized base needs the original weights, but the checkpoint this model was "
            f"loaded from is unknown (config._name_or_path={getattr(getattr(model, 'config', None), '_name_or_path', None)!r} "
            "is no local directory). Load the model from a local safetensors directory, or export the adapter only"
        )


def write_config(model: nn.Module, directory: Path, dtype: torch.dtype) -> None:
    """config.json (and generation_config.json) describing a plain, unquantized model in ``dtype``."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # set by transformers' own quantized loading
        del config.quantization_config
    config.dtype = dtype
    config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(directory)


def _out_dtype(tensor_dtype: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    if not tensor_dtype.is_floating_point:
        return tensor_dtype
    if dtype is not None:
        return dtype
    # 16-bit by default: the source's own 16-bit dtype, else bf16 (a float32 checkpoint is halved).
    return tensor_dtype if tensor_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def _check_same_weight(name: str, original: torch.Tensor, layer: nn.Module, record: QuantizationRecord | None) -> None:
    recorded = record.weights.get(name) if record is not None else None
    if recorded is not None:
        if not recorded.matches(original):
            raise QuantizedExportError(
                f"the source holds a different {name} (shape {list(original.shape)}) than the one this model was "
                f"quantized from (shape {list(recorded.shape)}); pass the checkpoint the model was loaded from"
            )
        return
    # Quantized elsewhere (e.g. transformers' BitsAndBytesConfig): compare with the dequantized weight.
    dequantized = dequantized_weight(layer).to("cpu")
    if dequantized.shape != original.shape or relative_error(dequantized, original.float()) > _SAME_WEIGHT_TOLERANCE:
        raise QuantizedExportError(f"the source's {name} does not match the model's quantized weight; pass the checkpoint the model was loaded from")


@torch.no_grad()
def save_merged_from_source(model: nn.Module, source: Path, directory: Path, dtype: torch.dtype | None = None) -> None:
    """Write ``model`` with its adapters merged into the original weights of ``source`` (a safetensors
    directory) to ``directory``, which must exist. ``dtype=None`` writes 16 bits (see :func:`_out_dtype`)."""
    layers = dict(adapter_layers(model))

    def is_adapter_tensor(name: str) -> bool:
        owner = next((layer for layer in layers if name.startswith(layer + ".")), None)
        return owner is not None and not name[len(owner) + 1 :].startswith(BASE_LAYER + ".")

    # The base model's parameters by their plain names (tied duplicates dropped, as save_pretrained does).
    params = {base_parameter_name(n): p for n, p in model.named_parameters() if not is_adapter_tensor(n)}
    names = {base_parameter_name(n) for n, _ in model.named_parameters(remove_duplicate=False) if not is_adapter_tensor(n)}
    names |= {base_parameter_name(n) for n, _ in model.named_buffers()}
    kbit = {base_parameter_name(f"{n}.weight"): m for n, m in model.named_modules() if is_quantized_linear(m)}
    # The base parameters each adapter changes when merged: the weight, and the bias for (IA)3 and BitFit.
    adapters: dict[str, AdapterLayer] = {f"{n}.{kind}": layer for n, layer in layers.items() if not layer.disabled for kind in ("weight", "bias")}
    trainable = {n for n, p in params.items() if p.requires_grad}
    record = quantization_record(model)

    index = checkpoint_index(source)
    mapping = _checkpoint_name_map(names, getattr(model, "base_model_prefix", ""), index)
    covered = set(mapping.values())
    missing = sorted(set(kbit) - covered)
    if missing:
        raise QuantizedExportError(
            f"{source} has no original weights for the quantized {missing[:3]}; pass the checkpoint the model was loaded from"
        )
    # Not in the source: trained in full or newly initialised (e.g. a classifier head): from the model.
    extra = sorted(set(params) - covered)

    def from_source(key: str) -> torch.Tensor:
        name = mapping[key]
        if name in trainable:
            return params[name].detach().to("cpu")  # modules_to_save: the trained values
        tensor = read_tensor(index[key])
        if name in kbit:
            _check_same_weight(name, tensor, kbit[name], record)
        if name in adapters:  # the original W, so the exact delta, whether or not the layer is merged
            tensor = adapters[name].merged_parameter(name.rsplit(".", 1)[1], tensor.float())
        return tensor

    def from_model(name: str) -> torch.Tensor:
        tensor = params[name].detach().to("cpu")
        if name in adapters and not adapters[name].merged:
            tensor = adapters[name].merged_parameter(name.rsplit(".", 1)[1], tensor.float())
        return tensor

    files = checkpoint_files(source)
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, file in enumerate(files):
        keys = sorted((k for k in mapping if index[k].file == file), key=lambda k: index[k].begin)
        tail = extra if i == len(files) - 1 else []
        layout = [(k, _out_dtype(index[k].dtype, dtype), index[k].shape) for k in keys]
        layout += [(n, _out_dtype(params[n].dtype, dtype), tuple(params[n].shape)) for n in tail]

        def stream(keys: list[str] = keys, tail: list[str] = tail) -> Iterator[tuple[str, torch.Tensor]]:
            for key in keys:
                yield key, from_source(key).to(_out_dtype(index[key].dtype, dtype))
            for name in tail:
                yield name, from_model(name).to(_out_dtype(params[name].dtype, dtype))

        write_streaming(directory / file.name, layout, stream())
        for key, kind, shape in layout:
            weight_map[key] = file.name
            total_size += torch.Size(shape).numel() * torch.empty((), dtype=kind).element_size()
    if len(files) > 1 or (source / INDEX_NAME).exists():
        (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))
    floating = next((e.dtype for e in index.values() if e.dtype.is_floating_point), torch.bfloat16)
    write_config(model, directory, _out_dtype(floating, dtype))

"""Loading a checkpoint directory straight into a k-bit model, one tensor at a time.

``from_pretrained`` followed by in-place quantization holds the whole model in 16/32 bits first: 16 GB
of host memory for an 8B model in bf16 before a single byte is saved. Here the peak is the quantized
model plus the largest single tensor:

1. build the model's skeleton with every parameter on the meta device (no memory; buffers such as
   rotary frequencies are computed for real, they are small);
2. read the safetensors shards tensor by tensor (:mod:`.safetensors_stream`, no memory map);
3. put each tensor in place as it arrives; the weight of a linear layer that is to be quantized
   becomes a bitsandbytes layer right away and its full-precision copy is dropped;
4. tie shared weights, initialise what the checkpoint does not have (e.g. a new classification head)
   and say so, as transformers does.

The quantized layers are exactly what :func:`~lightning_peft.quantization.quantize_model` makes from
the same weights (same selection, same bitsandbytes call), so the logits match in-place quantization
bit for bit. The model remembers its source directory for a merged export from the original weights.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_peft.core.injection import set_submodule
from lightning_peft.quantization.backend import check_backend
from lightning_peft.quantization.config import Quantization
from lightning_peft.quantization.layers import is_quantized_linear, quantized_linear
from lightning_peft.quantization.rank0_loading import empty_quantized_model, share_from_rank0
from lightning_peft.quantization.record import (
    OriginalWeight,
    QuantizationRecord,
    quantization_record,
    resolve_source,
    set_quantization_record,
)
from lightning_peft.quantization.replace import quantizable_linears, release_host_memory
from lightning_peft.quantization.safetensors_stream import checkpoint_index, iter_tensors


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every ``nn.Parameter`` registered inside goes to the meta device; buffers stay real.

    Buffers are left alone because many are computed in ``__init__`` and never saved (rotary
    frequencies, position ids): on the meta device they would be lost.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and type(param) is nn.Parameter and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def empty_model(config: Any, model_class: Any, dtype: torch.dtype) -> nn.Module:
    """A transformers model built from ``config`` with all parameters on the meta device."""
    with parameters_on_meta():
        if hasattr(model_class, "from_config"):  # the Auto* classes
            return model_class.from_config(config, dtype=dtype)
        return model_class._from_config(config, dtype=dtype)


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    quantized: list[str] = field(default_factory=list)
    # In the checkpoint, not in the model (e.g. an LM head when loading a classifier): ignored.
    unexpected: list[str] = field(default_factory=list)
    # In the model, not in the checkpoint: tied to another weight, or freshly initialised.
    initialised: list[str] = field(default_factory=list)


def _fp32_patterns(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Modules transformers keeps in float32 for this dtype (``_keep_in_fp32_modules[_strict]``)."""
    names = set(getattr(model, "_keep_in_fp32_modules_strict", None) or []) if dtype in (torch.float16, torch.bfloat16) else set()
    if dtype == torch.float16:
        names |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    return [rf"(^|\.){re.escape(n)}(\.|$)" for n in names]


def _checkpoint_name_map(model_names: set[str], prefix: str, checkpoint_names: Iterable[str]) -> dict[str, str]:
    """checkpoint key -> model key, allowing for the base-model prefix (``model``, ``bert``, ...) being
    present on one side only (a ``LlamaForCausalLM`` checkpoint loaded into a ``LlamaModel`` and the like)."""
    mapping = {}
    for name in checkpoint_names:
        if name in model_names:
            mapping[name] = name
        elif prefix and f"{prefix}.{name}" in model_names:
            mapping[name] = f"{prefix}.{name}"
        elif prefix and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in model_names:
            mapping[name] = name[len(prefix) + 1 :]
    return mapping


def _place(module: nn.Module, attribute: str, tensor: torch.Tensor, device: torch.device) -> None:
    current = getattr(module, attribute)
    if tensor.shape != current.shape:
        raise ValueError(f"{type(module).__name__}.{attribute}: checkpoint shape {list(tensor.shape)} != model shape {list(current.shape)}")
    if attribute in module._parameters:
        module._parameters[attribute] = nn.Parameter(tensor.to(device), requires_grad=current.requires_grad)
    else:
        module._buffers[attribute] = tensor.to(device)


@torch.no_grad()
def load_streaming(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    quantization: Quantization,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    quantize: list[str] | None = None,
) -> LoadReport:
    """Fill a meta-device skeleton (:func:`empty_model`) from ``(name, tensor)`` pairs, quantizing the
    linear layers named in ``quantize`` (default: :func:`quantizable_linears`) as their weights arrive.

    ``tensors`` can be any iterable: a checkpoint read by :mod:`.safetensors_stream`, or weights made up
    on the fly (``benchmarks/bench_qlora_gpu.py`` initialises an 8B model this way on a GPU).
    Names are the model's own; a tensor whose name the model does not have is reported as unexpected.
    """
    device = torch.device(device)
    to_quantize = set(quantizable_linears(model, quantization) if quantize is None else quantize)
    check_backend(quantization, device)
    fp32 = _fp32_patterns(model, dtype)
    model_names = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}
    report = LoadReport()
    originals: dict[str, OriginalWeight] = {}
    for name, tensor in tensors:
        if name not in model_names:
            report.unexpected.append(name)
            continue
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32 if any(re.search(p, name) for p in fp32) else dtype)
        if module_name in to_quantize and attribute == "weight" and not is_quantized_linear(module):
            if tuple(tensor.shape) != (module.out_features, module.in_features):
                raise ValueError(f"{name}: checkpoint shape {list(tensor.shape)} != model shape {[module.out_features, module.in_features]}")
            originals[name] = OriginalWeight.of(tensor)
            bias = module.bias if module.bias is not None and not module.bias.is_meta else None
            layer = quantized_linear(tensor, bias, quantization, device)
            if module.bias is not None and module.bias.is_meta:
                layer.bias = nn.Parameter(torch.empty(module.out_features, device="meta"))  # arrives later
            set_submodule(model, module_name, layer)
            report.quantized.append(module_name)
        else:
            _place(module, attribute, tensor, device)
        report.loaded.append(name)
        del tensor  # before the next one is read: the peak is one tensor, not two
        release_host_memory()
    _finish(model, report, quantization, to_quantize, dtype, device)
    set_quantization_record(model, QuantizationRecord(quantization, originals, None))
    return report


def _finish(
    model: nn.Module, report: LoadReport, quantization: Quantization, to_quantize: set[str], dtype: torch.dtype, device: torch.device
) -> None:
    """Tie shared weights, move buffers, and initialise (and quantize) whatever the checkpoint lacked."""
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)
    missing = [(n, p) for n, p in model.named_parameters() if p.is_meta]
    if not missing:
        return
    owners = {n.rpartition(".")[0] for n, _ in missing}
    for owner in sorted(owners):
        module = model.get_submodule(owner)
        for attribute, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                kind = dtype if param.is_floating_point() else param.dtype
                module._parameters[attribute] = nn.Parameter(torch.empty(param.shape, dtype=kind, device=device), requires_grad=param.requires_grad)
        init = getattr(model, "_init_weights", None)
        if init is None:
            raise ValueError(f"the checkpoint has no weights for {owner!r} and {type(model).__name__} has no _init_weights to make them")
        if is_quantized_linear(module):  # a layer quantized before its bias arrived, and it never did
            raise ValueError(f"the checkpoint has a weight but no bias for {owner!r}")
        init(module)
        if owner in to_quantize:  # new, but still one of the layers to quantize: not silently left 16-bit
            layer = quantized_linear(module.weight, module.bias, quantization, device)
            set_submodule(model, owner, layer)
            report.quantized.append(owner)
    report.initialised = [n for n, _ in missing]
    rank_zero_warn(
        f"{type(model).__name__}: {len(missing)} weights are not in the checkpoint and were newly initialised: "
        f"{report.initialised[:5]}{' ...' if len(missing) > 5 else ''}. Train them (e.g. modules_to_save) before use."
    )


def load_quantized(
    model_name_or_path: str | os.PathLike,
    quantization: Quantization,
    model_class: Any = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    rank0_only: bool = False,
    **config_kwargs: Any,
) -> nn.Module:
    """A transformers model loaded from a safetensors directory straight into k-bit, layer by layer.

    Args:
        model_name_or_path: a local ``save_pretrained`` directory, or a Hub id already in the local cache.
        quantization: the k-bit format of the linear layers (the output head and ``skip_modules`` stay
            in ``dtype``).
        model_class: ``AutoModelForCausalLM`` (default), ``AutoModelForSequenceClassification``, or a
            concrete model class.
        dtype: dtype of everything not quantized (embeddings, norms, head), as ``from_pretrained(dtype=)``.
        device: where the weights go; bitsandbytes quantizes there.
        rank0_only: in a distributed run, only rank 0 reads and quantizes; the other ranks get the same model
            with every parameter on the meta device and the 4-bit layers' quantization state, and FSDP1 fills
            them from rank 0 when it wraps (see :mod:`.rank0_loading`). 4-bit only; 8-bit loads on every rank.
        config_kwargs: passed to ``AutoConfig.from_pretrained`` (e.g. ``num_labels=2``).

    Example::

        model = load_quantized("assets/smollm2-135m-instruct", Quantization(bits=4), dtype=torch.bfloat16)
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_source(model_name_or_path)
    if path is None:
        raise FileNotFoundError(
            f"{str(model_name_or_path)!r} is neither a local directory nor a Hub id in the local cache; "
            f"download it first (huggingface-cli download ...) to stream it into k-bit"
        )
    index = checkpoint_index(path)
    config = AutoConfig.from_pretrained(path, **config_kwargs)
    model = empty_model(config, model_class or AutoModelForCausalLM, dtype)
    sharing = rank0_only and quantization.bits == 4 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if sharing and dist.get_rank() != 0:
        model = empty_quantized_model(model, share_from_rank0(None), quantization, torch.device(device))
        return _named_and_ready(model, config, model_name_or_path, path)
    model_names = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}
    mapping = _checkpoint_name_map(model_names, getattr(model, "base_model_prefix", ""), index)
    if not mapping:
        raise ValueError(
            f"no tensor of {path} matches a parameter of {type(model).__name__} (checkpoint keys look like "
            f"{list(index)[:3]}); the checkpoint needs key conversions this loader does not do: load it with "
            f"from_pretrained and quantize in place (PEFTCallback(quantization=...))"
        )
    unexpected = [n for n in index if n not in mapping]
    tensors = ((mapping[name], tensor) for name, tensor in iter_tensors(index, [n for n in index if n in mapping]))
    report = load_streaming(model, tensors, quantization, device=device, dtype=dtype)
    report.unexpected += unexpected
    if report.unexpected:
        rank_zero_warn(f"{len(report.unexpected)} tensors of {path} have no place in {type(model).__name__} and were ignored: {report.unexpected[:5]}")
    # The source is the directory itself: a merged export re-reads the original weights from it.
    quantization_record(model).source = str(path.absolute())
    if sharing:
        share_from_rank0(model)
    return _named_and_ready(model, config, model_name_or_path, path)


def _named_and_ready(model: nn.Module, config: Any, model_name_or_path: str | os.PathLike, path: Any) -> nn.Module:
    from transformers import GenerationConfig

    config._name_or_path = str(model_name_or_path)
    if (path / "generation_config.json").exists() and getattr(model, "can_generate", lambda: False)():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()

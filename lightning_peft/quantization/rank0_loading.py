"""Low-memory k-bit loading for sharded training: rank 0 reads and quantizes, the other ranks start empty.

Answer.AI's FSDP + QLoRA recipe (Howard et al., 2024, "You can now train a 70b language model at home"): with
``N`` processes, loading the base on every rank costs ``N`` reads of the checkpoint and ``N`` copies of the
quantized model before FSDP shards it. Here only rank 0 streams the checkpoint into 4-bit
(:func:`~lightning_peft.quantization.loading.load_quantized`); every other rank builds the same model with its
parameters on the meta device (no memory). What FSDP cannot carry is sent now: the 4-bit layers' quantization
state (block scales and the NF4 code book, about 1/32 of the codes' size with double quantization), which
bitsandbytes keeps beside the weight, not as a parameter or buffer, together with the dtype of every parameter,
so the empty model matches rank 0's exactly. FSDP1 then materialises each unit (``param_init_fn``) and copies rank
0's values into it (``sync_module_states=True``) one unit at a time before sharding it:
:func:`lightning_peft.integration.strategies.configure_fsdp1` sets both when it sees a model with meta parameters.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_peft.core.injection import set_submodule
from lightning_peft.core.kbit_cpu_kernel import select_cpu_kernel
from lightning_peft.quantization.config import Quantization
from lightning_peft.quantization.record import QuantizationRecord, set_quantization_record


def quantized_layout(model: nn.Module) -> dict[str, Any]:
    """What another rank needs to build ``model`` empty: every parameter's shape and dtype, and for each 4-bit
    layer its packed weight's shape and dtype, bias, and quantization state (tensors moved to the CPU)."""
    import bitsandbytes as bnb

    layers: dict[str, Any] = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            layers[name] = {
                "in_features": module.in_features,
                "out_features": module.out_features,
                "weight": (tuple(module.weight.shape), module.weight.dtype),
                "bias": module.bias.dtype if module.bias is not None else None,
                "quant_state": {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.as_dict(packed=True).items()},
            }
    in_layers = tuple(name + "." for name in layers)
    parameters = {
        name: (tuple(param.shape), param.dtype)
        for name, param in model.named_parameters(remove_duplicate=False)
        if not name.startswith(in_layers)
    }
    return {"layers": layers, "parameters": parameters}


def empty_quantized_model(empty: nn.Module, layout: dict[str, Any], quantization: Quantization, device: torch.device) -> nn.Module:
    """Give ``empty`` (every parameter on the meta device) rank 0's layout: 4-bit layers with their quantization
    state on ``device`` and meta weights, and every other parameter in rank 0's dtype, still on the meta device."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    for name, spec in layout["layers"].items():
        layer = bnb.nn.Linear4bit(
            spec["in_features"], spec["out_features"], bias=False, compute_dtype=quantization.torch_compute_dtype,
            compress_statistics=quantization.double_quant, quant_type=quantization.quant_type,
            quant_storage=quantization.torch_quant_storage, device="meta",
        )  # fmt: skip
        state = QuantState.from_dict(spec["quant_state"], device=device)
        shape, dtype = spec["weight"]
        layer.weight = bnb.nn.Params4bit(
            torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False, quant_state=state,
            blocksize=quantization.block_size, compress_statistics=quantization.double_quant, quant_type=quantization.quant_type,
            quant_storage=quantization.torch_quant_storage, module=layer, bnb_quantized=True,
        )  # fmt: skip
        # FSDP1 replaces the weight by views of its flat parameter; bitsandbytes then reads the state from here.
        layer.quant_state = state
        if spec["bias"] is not None:
            layer.bias = nn.Parameter(torch.empty(spec["out_features"], dtype=spec["bias"], device="meta"))
        set_submodule(empty, name, layer)
    for name, (shape, dtype) in layout["parameters"].items():
        owner, _, attribute = name.rpartition(".")
        module = empty.get_submodule(owner)
        param = module._parameters.get(attribute)
        if param is None or not param.is_meta or (tuple(param.shape), param.dtype) == (shape, dtype):
            continue
        if tuple(param.shape) != shape:
            raise ValueError(f"{name}: rank 0 loaded shape {list(shape)}, this rank's model has {list(param.shape)}; every rank must load the same model")
        module._parameters[attribute] = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=param.requires_grad)
    if hasattr(empty, "tie_weights"):
        empty.tie_weights()
    select_cpu_kernel(empty, quantization.cpu_kernel)
    set_quantization_record(empty, QuantizationRecord(quantization, {}, None))  # no originals: rank 0 exports
    return empty


def share_from_rank0(model_on_rank0: nn.Module | None) -> dict[str, Any]:
    """Rank 0 sends :func:`quantized_layout` of its model; every rank returns it (one object broadcast)."""
    payload = [quantized_layout(model_on_rank0) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def has_meta_parameters(model: nn.Module) -> bool:
    return any(param.is_meta for param in model.parameters())

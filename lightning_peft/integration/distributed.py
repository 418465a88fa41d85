"""Adapters that start identical on every rank.

Data-parallel training is only correct when every rank starts from the same adapter. DDP broadcasts
rank 0's parameters when it wraps the model, but FSDP2 (``fully_shard``, Lightning's
``ModelParallelStrategy``) does not: each rank keeps whatever its own random initialisation drew, and the
ranks then train different adapters while averaging their gradients. Seeding every process the same way
would also work, but only as long as every rank consumes the global random stream identically before
injection (data loading, dropout at a sanity check, another library's init...). Broadcasting rank 0's
freshly initialised adapter tensors right after injection removes that assumption at the cost of one
collective over a few megabytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch.distributed as dist
from torch import nn

from lightning_peft.core.fingerprint import FINGERPRINT_ATTRIBUTE
from lightning_peft.core.sharding import state_dict_name
from lightning_peft.integration.checkpoints import adapter_state_names


def distributed_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def on_any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on at least one rank (a collective: every rank must call it, in the same order).
    Decisions that change which collectives follow (broadcast or not, sync or not) must agree across ranks."""
    if distributed_world_size() == 1:
        return flag
    transport = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([int(flag)], device=transport)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def adapter_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What an adapter-only checkpoint holds (:func:`~lightning_peft.integration.checkpoints.adapter_state_names`),
    in name order, so every rank lists the same tensors in the same order."""
    by_name = {state_dict_name(name): tensor for name, tensor in (*model.named_parameters(), *model.named_buffers())}
    return [by_name[name] for name in sorted(adapter_state_names(model))]


@torch.no_grad()
def broadcast_adapters(model: nn.Module, src: int = 0) -> int:
    """Copy rank ``src``'s adapter tensors to every rank; returns how many tensors were sent.

    One collective per dtype: the tensors are packed into a flat buffer (on the GPU for NCCL, which
    cannot send host memory; the model is still on the host at injection time). When any rank holds its
    adapters on the meta device (a model built empty, materialised later), nothing is sent: whoever
    materialises them must make them equal on every rank (FSDP1's ``sync_module_states``, or
    ``LoRALayer.reset_adapter`` after a seeded ``to_empty``).
    """
    if distributed_world_size() == 1:
        return 0
    tensors = adapter_tensors(model)
    # Every rank must make the same collectives. If any rank's adapters are still on the meta device (a base
    # loaded on rank 0 only, see quantization/rank0_loading.py), nobody sends: FSDP's sync_module_states will
    # copy rank 0's values into every rank when it materialises the model.
    if on_any_rank(any(t.is_meta for t in tensors)):
        return 0
    transport = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for dtype in sorted(by_dtype, key=str):  # the same collective order on every rank
        group = by_dtype[dtype]
        flat = torch.cat([t.detach().reshape(-1).to(transport) for t in group])
        dist.broadcast(flat, src=src)
        offset = 0
        for tensor in group:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()
    return len(tensors)


@contextmanager
def full_adapter_parameters(model: nn.Module) -> Iterator[None]:
    """Inside this context every rank holds the whole of every adapter parameter; enter it on *every* rank
    (it gathers), then read or export on one.

    Sharded strategies leave each rank a slice of each parameter, and reading one there gives an empty or
    partial tensor: DeepSpeed ZeRO-3 empties ``param.data`` (the known "ZeRO-3 saves empty adapters"
    failure), FSDP1 turns parameters into views of this rank's shard of a flat tensor, FSDP2 into DTensors.
    Only the adapters are gathered, never the frozen base: ZeRO-3 gathers the named parameters, FSDP1 the
    units that hold trainable parameters (adapters have units of their own, see fsdp_wrapping.py), and a
    DTensor adapter is swapped for its full tensor until the context ends.
    """
    trainable = [(module, name, param) for module in model.modules() for name, param in module._parameters.items() if param is not None and param.requires_grad]
    with ExitStack() as stack:
        zero3 = [param for _, _, param in trainable if hasattr(param, "ds_id")]
        if zero3:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(zero3, modifier_rank=None))
        for unit in _fsdp1_units_with_trainable_parameters(model):
            from torch.distributed.fsdp import FullyShardedDataParallel

            stack.enter_context(FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False))
        swapped = []
        try:
            for module, name, param in trainable:
                if hasattr(param, "full_tensor"):  # a DTensor (FSDP2): every rank takes part in full_tensor()
                    module._parameters[name] = nn.Parameter(param.full_tensor(), requires_grad=True)
                    swapped.append((module, name, param))
            yield
        finally:
            for module, name, param in swapped:
                module._parameters[name] = param


def _fsdp1_units_with_trainable_parameters(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    units = []
    for module in model.modules():
        handle = getattr(module, "_handle", None) if isinstance(module, FullyShardedDataParallel) else None
        if handle is not None and handle.flat_param.requires_grad:
            units.append(module)
    return units


def adopt_rank0_fingerprint(model: nn.Module) -> None:
    """Every rank keeps rank 0's base fingerprint (one small object broadcast, right after injection).

    A sharded model's fingerprint is the one taken at injection (core/fingerprint.py), and ranks can differ
    there: after a rank-0-only load the others hold meta tensors, and with ``sync_module_states`` the others'
    weights are random until FSDP copies rank 0's. A rank that then refused a checkpoint its peers accept would
    leave them waiting in the next collective; rank 0's weights are the ones every rank trains.
    """
    if distributed_world_size() == 1 or getattr(model, FINGERPRINT_ATTRIBUTE, None) is None:
        return
    payload = [getattr(model, FINGERPRINT_ATTRIBUTE)]
    dist.broadcast_object_list(payload, src=0)
    object.__setattr__(model, FINGERPRINT_ATTRIBUTE, payload[0])

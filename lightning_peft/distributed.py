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

import torch
import torch.distributed as dist
from torch import nn

from lightning_peft.checkpointing import adapter_state_names


def distributed_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def adapter_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What an adapter-only checkpoint holds (:func:`~lightning_peft.checkpointing.adapter_state_names`),
    in name order, so every rank lists the same tensors in the same order."""
    by_name = dict(model.named_parameters()) | dict(model.named_buffers())
    return [by_name[name] for name in sorted(adapter_state_names(model))]


@torch.no_grad()
def broadcast_adapters(model: nn.Module, src: int = 0) -> int:
    """Copy rank ``src``'s adapter tensors to every rank; returns how many tensors were sent.

    One collective per dtype: the tensors are packed into a flat buffer (on the GPU for NCCL, which
    cannot send host memory; the model is still on the host at injection time). Tensors on the meta
    device (a model built empty, materialised later) are skipped: whoever materialises them must
    initialise them the same way on every rank, which ``LoRALayer.reset_adapter`` after a seeded
    ``to_empty`` does.
    """
    if distributed_world_size() == 1:
        return 0
    tensors = [t for t in adapter_tensors(model) if not t.is_meta]
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

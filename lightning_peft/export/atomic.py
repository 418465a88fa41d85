"""Adapter files written safely: atomically (a crash mid-save must never leave a half-written adapter behind
a good name) and never with an empty tensor."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` by renames.

    The temporary directory sits in the same parent so the final ``os.replace`` is a same-filesystem
    rename. An existing ``path`` is moved aside first and deleted only after the new one is in place.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    backup = None
    try:
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, backup / target.name)
        os.replace(staging, target)
    except BaseException:
        # The swap itself failed (e.g. a permission or cross-device error): put the old directory back
        # and clean up, so a failed save still leaves exactly what was there before.
        if backup is not None and (backup / target.name).exists() and not target.exists():
            os.replace(backup / target.name, target)
        shutil.rmtree(staging, ignore_errors=True)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def write_adapter_tensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    """Write adapter tensors to a safetensors ``file``, refusing an empty one.

    An adapter tensor is never empty; one that is has been read on a rank that holds only its shard
    (DeepSpeed ZeRO-3 empties ``param.data``), and writing it would give a file that loads as garbage.
    """
    empty = [name for name, tensor in tensors.items() if tensor.numel() == 0]
    if empty:
        raise ValueError(
            f"adapter tensors {empty[:3]} are empty: their parameters are partitioned across ranks (DeepSpeed ZeRO-3 or "
            f"FSDP). Export with PEFTCallback(export_dir=...), which gathers them, or inside "
            f"lightning_peft.distributed.full_adapter_parameters(model) entered on every rank"
        )
    # safetensors refuses shared or non-contiguous storage; adapters are tiny, so copy.
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, file, metadata=metadata)

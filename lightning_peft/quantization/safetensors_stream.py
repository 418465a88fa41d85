"""Reading a safetensors checkpoint one tensor at a time, with bounded host memory.

``safetensors.safe_open`` memory-maps the whole file: every page a tensor was read from stays mapped
and counts in the process's resident memory until the file is closed, so streaming a 16 GB shard
through it still shows 16 GB of RSS. Here each tensor is read with plain ``readinto`` into its own
buffer: the page cache holds the file (the kernel may drop it), the process holds one tensor.

The format is simple enough to read directly: 8 bytes little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` (offsets from the end of the header),
then the raw little-endian data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in ``file``
    end: int


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors shards of a ``save_pretrained`` directory, in index order."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in dict.fromkeys(weight_map.values())]
    if (directory / SINGLE_NAME).exists():
        return [directory / SINGLE_NAME]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    raise FileNotFoundError(
        f"{directory} has no safetensors weights"
        + (f" (it has {pickles[:3]}: pickles are not streamed; convert them to safetensors once)" if pickles else "")
    )


def read_header(file: Path) -> dict[str, TensorEntry]:
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    start = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has dtype {info['dtype']}, which this reader does not handle")
        begin, end = info["data_offsets"]
        entries[name] = TensorEntry(file, _DTYPES[info["dtype"]], tuple(info["shape"]), start + begin, start + end)
    return entries


def checkpoint_index(directory: str | os.PathLike) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint in ``directory``: name -> where it is."""
    index: dict[str, TensorEntry] = {}
    for file in checkpoint_files(directory):
        index.update(read_header(file))
    return index


def read_tensor(entry: TensorEntry, handle=None) -> torch.Tensor:  # noqa: ANN001 - an open binary file
    """One tensor, in its own freshly allocated CPU buffer (nothing memory-mapped)."""
    size = entry.end - entry.begin
    buffer = bytearray(size)
    if handle is None:
        with open(entry.file, "rb") as own:
            own.seek(entry.begin)
            own.readinto(buffer)
    else:
        handle.seek(entry.begin)
        handle.readinto(buffer)
    if size == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    return torch.frombuffer(buffer, dtype=entry.dtype).reshape(entry.shape)


def iter_tensors(index: dict[str, TensorEntry], names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for ``names`` (default: all), file by file in on-disk order, one at a time."""
    wanted = list(index) if names is None else list(names)
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(index[name].file, []).append(name)
    for file, file_names in by_file.items():
        with open(file, "rb") as handle:
            for name in sorted(file_names, key=lambda n: index[n].begin):
                yield name, read_tensor(index[name], handle)


_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def write_streaming(
    file: str | os.PathLike,
    layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file whose tensors arrive one at a time, in ``layout`` order.

    The header needs every tensor's dtype and shape up front, and nothing else: so the file is written
    front to back with one tensor in memory at a time. Each arriving tensor must match its layout entry.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape in layout:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    expected = iter(layout)
    with open(file, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, tensor in tensors:
            want_name, want_dtype, want_shape = next(expected)
            if name != want_name or tensor.dtype != want_dtype or tuple(tensor.shape) != tuple(want_shape):
                raise ValueError(f"tensor {name} {tensor.dtype} {list(tensor.shape)} does not match the layout entry {want_name} {want_dtype} {list(want_shape)}")
            data = tensor.detach().to("cpu").contiguous()
            # Through uint8, since numpy has no bfloat16.
            if data.numel():
                handle.write(data.reshape(-1).view(torch.uint8).numpy())
    if next(expected, None) is not None:
        raise ValueError(f"{file}: fewer tensors arrived than the layout lists")

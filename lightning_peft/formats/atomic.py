"""Export directories written so that nothing is ever lost: only our own files, and every instant loadable.

Promises, each tested in tests/test_export_writes.py:

- **Only our files.** An export writes its files into the target directory beside whatever else is there
  (a README, a tokenizer someone put there) and deletes only files an earlier export of ours wrote (listed
  in ``.lightning_peft-files.json``; e.g. the shards of a larger merged model). A path that is a file is
  refused: we never turn a file into a directory.
- **Old or new, never half.** New files are written and fsynced in a staging folder *inside* the target
  (same filesystem: each move is one atomic rename). A ``COMMITTED`` list, fsynced, marks the staged set
  complete; only then are the files renamed into place. A crash before the mark leaves the old files
  untouched (the stale staging folder is removed by the next call); a crash after it is rolled forward by
  the next write or read of the directory (:func:`recover_interrupted_write`), so the pair of files a
  reader sees is always one export's.
- **Failures leave what was there.** A failed write (disk full, permission denied, a read-only parent)
  raises :class:`ExportWriteError` naming the path and the cause; the previous files are intact and no
  staging folder or newly created empty directory is left.
- Directories and files get the user's umask (``tempfile.mkdtemp``'s 0700 made exports unreadable to a
  serving container running as another user).

Directories written by the previous scheme (``.NAME.tmp-*`` / ``.NAME.old-*`` siblings, renamed whole)
are recovered too: a lost final name is restored from ``.NAME.old-*``, stale siblings are removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

STAGING_PREFIX = ".lightning_peft-staging-"
COMMIT_MARK = "COMMITTED"
MANIFEST = ".lightning_peft-files.json"


class ExportWriteError(OSError):
    """Writing an export failed; the directory holds what it held before."""


class ExportPathError(ValueError):
    """An export path that can never work (a file, or a parent that cannot be written)."""


def check_export_target(path: str | os.PathLike) -> Path:
    """Refuse, before any work, an export path that cannot be written: a file, or no writable directory to
    create it in. Returns the path. (``PEFTCallback`` calls this at ``setup``, not after hours of training.)"""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ExportPathError(
            f"export path {str(target)!r} is a file; an export is a directory (adapter_config.json + adapter_model.safetensors) "
            f"and lightning_peft never replaces a file with one: choose a directory path"
        )
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ExportPathError(f"cannot create export directory {str(target)!r}: {str(existing)!r} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExportPathError(f"cannot write export directory {str(target)!r}: {str(existing)!r} is not writable by this user")
    return target


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's contents to disk (a rename is durable only once its directory is)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _staged_files(staging: Path) -> list[str]:
    return sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file() and not p.name.startswith(COMMIT_MARK))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _owned_files(target: Path) -> list[str]:
    try:
        return list(json.loads((target / MANIFEST).read_text()))
    except (OSError, ValueError):
        return []


def _roll_forward(target: Path, staging: Path) -> None:
    """Move a committed staging folder's files into place (idempotent: a second run skips what moved)."""
    names = json.loads((staging / COMMIT_MARK).read_text())
    for name in names:
        source, destination = staging / name, target / name
        if source.exists():
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, destination)
    for stale in set(_owned_files(target)) - set(names):  # ours from the previous export, not in this one
        (target / stale).unlink(missing_ok=True)
    manifest = target / f"{MANIFEST}.{uuid.uuid4().hex[:8]}"
    manifest.write_text(json.dumps(sorted(names)))
    _fsync(manifest)
    os.replace(manifest, target / MANIFEST)
    _fsync(target)
    shutil.rmtree(staging, ignore_errors=True)


def recover_interrupted_write(path: str | os.PathLike) -> None:
    """Finish or discard what a killed export left in ``path`` (see the module docstring). Cheap when clean."""
    target = Path(path)
    _recover_legacy_siblings(target)
    if not target.is_dir():
        return
    for staging in sorted(target.glob(STAGING_PREFIX + "*")):
        if (staging / COMMIT_MARK).is_file():
            _roll_forward(target, staging)
        else:
            shutil.rmtree(staging, ignore_errors=True)


def _recover_legacy_siblings(target: Path) -> None:
    if not target.parent.is_dir():
        return
    olds = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    for old in reversed(olds):
        if not target.exists() and (old / target.name).is_dir():
            os.replace(old / target.name, target)
    for stale in [*olds, *target.parent.glob(f".{target.name}.tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder; files written there replace their namesakes in ``path`` on success.

    Files of ``path`` that the block does not write are kept, except files our previous export wrote there
    (see the module docstring). On any error nothing in ``path`` changes and the error propagates (an
    ``OSError`` as :class:`ExportWriteError` naming the path).
    """
    target = check_export_target(path)
    created = not target.exists()
    staging = None
    try:
        target.mkdir(parents=True, exist_ok=True)  # mode 0777 & ~umask, as the user's own mkdir
        recover_interrupted_write(target)
        staging = target / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
        staging.mkdir()
        yield staging
        names = _staged_files(staging)
        mode = 0o666 & ~_umask()
        for name in names:
            os.chmod(staging / name, mode)  # some writers (safetensors) create 0600 files regardless of the umask
            _fsync(staging / name)
        pending = staging / f"{COMMIT_MARK}.pending"
        pending.write_text(json.dumps(names))
        _fsync(pending)
        os.replace(pending, staging / COMMIT_MARK)  # the commit point: one rename, so the mark is whole or absent
        _fsync(staging)
    except BaseException as err:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(target, ignore_errors=True)  # ours and empty: no partial directory left behind
        if isinstance(err, OSError) and not isinstance(err, ExportWriteError):
            raise ExportWriteError(
                err.errno, f"writing the export to {str(target)!r} failed ({err.strerror or err}); nothing in it was changed"
            ) from err
        raise
    try:
        _roll_forward(target, staging)
    except OSError as err:  # committed: the next write or read of the directory finishes the move
        raise ExportWriteError(
            err.errno, f"moving the written export into {str(target)!r} failed ({err.strerror or err}); it is complete in "
            f"{staging.name} and is put in place by the next save or load of this directory"
        ) from err


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
            f"lightning_peft.integration.distributed.full_adapter_parameters(model) entered on every rank"
        )
    # safetensors refuses shared or non-contiguous storage; adapters are tiny, so copy.
    try:
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, file, metadata=metadata)
    except SafetensorError as err:  # its I/O failures (disk full, file too large) are not OSErrors
        # "... (os error 27)" in safetensors 0.5+, "IoError(Os { code: 27, ... })" in 0.4.
        code = re.search(r"os error (\d+)|Os \{ code: (\d+)", str(err))
        if code is None:
            raise
        number = int(code.group(1) or code.group(2))
        raise OSError(number, os.strerror(number), str(file)) from err

"""Atomic directory writes: a crash mid-save must never leave a half-written adapter behind a good name."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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

"""Shared pytest fixtures."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    """The offline assets root, prepared (idempotently) once per session.

    ``$LIGHTNING_PEFT_ASSETS`` if set, else ``<repo>/assets``: a fixed place rather than a tmp dir
    because converting SmolLM2 takes ~40 s and every later session reuses the result.
    """
    from lightning_peft.recipes.assets import prepare_assets

    root = Path(os.environ.get("LIGHTNING_PEFT_ASSETS") or REPO_ROOT / "assets")
    root.mkdir(parents=True, exist_ok=True)
    # pytest-xdist workers (the test command runs two) share this directory: one prepares, the other waits.
    with open(root / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        prepare_assets(root)
    return root

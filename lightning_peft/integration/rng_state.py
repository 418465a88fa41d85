"""The random number generators a training step draws from, saved in and restored from checkpoints.

LoRA's dropout (and P-tuning's encoder dropout, and any dropout of the user's) draws from torch's global
generator. Lightning checkpoints do not hold it, so a run resumed from a checkpoint drew other dropout
masks than the uninterrupted run, even at an epoch boundary. The states are stored as plain tensors and
ints, so the checkpoint still loads with ``torch.load(weights_only=True)``.

Each rank restores its own states where the checkpoint has them (a full checkpoint is written by rank 0:
other ranks restore rank 0's, which equals theirs when every rank was seeded alike, as
``seed_everything`` does).
"""

from __future__ import annotations

import random
from typing import Any

import torch


def _words(values) -> torch.Tensor:
    """Mersenne Twister state words (each < 2**32) as an int32 tensor, wrapped into its range: 2.5 KB per
    generator, and a dtype every checkpoint loader knows (Lightning's lazy loader fails on uint32 storages)."""
    wide = torch.tensor(list(values), dtype=torch.int64)
    return torch.where(wide >= 2**31, wide - 2**32, wide).to(torch.int32)


def _unwords(tensor: torch.Tensor) -> list[int]:
    return [(int(v) + 2**32) % 2**32 for v in tensor.tolist()]


def rng_states() -> dict[str, Any]:
    """torch (CPU and every CUDA device), Python's ``random`` and NumPy's global generator, as plain values."""
    version, internal, gauss = random.getstate()
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, _words(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return states
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states["numpy"] = {"kind": kind, "keys": _words(keys.tolist()), "position": int(position), "has_gauss": int(has_gauss), "cached": float(cached)}
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put back what :func:`rng_states` returned (missing entries are left as they are)."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(_unwords(internal)), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy as np

        saved = states["numpy"]
        np.random.set_state((saved["kind"], np.array(_unwords(saved["keys"]), dtype=np.uint32), saved["position"], saved["has_gauss"], saved["cached"]))

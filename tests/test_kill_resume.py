"""Hard kills: a training job that checkpoints every step is SIGKILLed after a step (before its
checkpoint) or in the middle of writing a checkpoint (LoRA with dropout, QLoRA NF4, a bottleneck adapter, (IA)3,
prompt tuning; LoRA under 2-process DDP and 2-process FSDP2, mid-epoch and at epoch boundaries); resuming from the
last checkpoint on disk gives bitwise the uninterrupted run's losses and adapters (dropout masks, data order
mid-epoch on every rank, optimizer state).

Each kill point is a separate process (tests/scripts/kill_resume_run.py). Together with the export kill
points of tests/test_export_writes.py these are the suite's kill-and-resume checks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_helpers import clean_environment

SCRIPT = Path(__file__).parent / "scripts" / "kill_resume_run.py"


def run(out: Path, *args: str) -> subprocess.CompletedProcess:
    # A session of its own: a kill takes down the run's process group (both DDP ranks), never pytest.
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *args], capture_output=True, text=True, timeout=600, env=clean_environment(), start_new_session=True
    )


def losses(out: Path) -> dict[int, float]:
    recorded: dict[int, float] = {}
    for line in (out / "losses.json").read_text().splitlines():
        entry = json.loads(line)
        recorded[entry["step"]] = entry["loss"]  # a resumed step overwrites nothing: it is the next step
    return recorded


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, tuple[dict[int, float], dict[str, torch.Tensor]]]:
    results = {}
    for method in ("lora", "houlsby", "ia3", "prompt", "qlora", "lora-ddp", "lora-fsdp2"):
        out = tmp_path_factory.mktemp(f"whole-{method}")
        done = run(out, *arguments(method))
        assert done.returncode == 0, done.stderr[-3000:]
        results[method] = (losses(out), load_file(out / "adapter.safetensors"))
    return results


def arguments(method: str) -> list[str]:
    """``lora-ddp``/``lora-fsdp2``: LoRA in 2 processes (2 batches per rank and epoch: steps 2, 4, 6 end one)."""
    if method in ("lora-ddp", "lora-fsdp2"):
        return ["--method", "lora", "--devices", "2", "--strategy", method.removeprefix("lora-")]
    return ["--method", method]


def resume_arguments(out: Path) -> list[str]:
    """What a user resumes from after a crash: last.ckpt (Lightning writes it through a temporary file and a
    rename, so a kill mid-write leaves the previous one), or a fresh start when none was written yet."""
    last = out / "ckpt" / "last.ckpt"  # FSDP2: a link to the newest complete sharded checkpoint (a directory)
    if not last.exists():
        (out / "losses.json").unlink()
        return []
    torch.load(last / "meta.pt" if last.is_dir() else last, weights_only=True)  # loads: not torn
    return ["--resume", str(last)]


KILLS = [("lora", "step", k) for k in (1, 2, 3, 4, 6, 7)] + [("lora", "checkpoint", k) for k in (2, 3, 5)] + [
    ("houlsby", "step", 4), ("ia3", "checkpoint", 4), ("prompt", "step", 5), ("qlora", "step", 3), ("qlora", "checkpoint", 5),
    # Two processes, resumed mid-epoch (from steps 1, 3) and at epoch boundaries (2, 4): each rank's shard resumes.
    ("lora-ddp", "step", 2), ("lora-ddp", "step", 5), ("lora-ddp", "checkpoint", 4),
    ("lora-fsdp2", "step", 2), ("lora-fsdp2", "step", 3), ("lora-fsdp2", "checkpoint", 5),
]  # fmt: skip


@pytest.mark.parametrize(("method", "where", "step"), KILLS, ids=[f"{m}-{w}-{s}" for m, w, s in KILLS])
def test_a_killed_run_resumes_to_the_same_losses_and_adapters(tmp_path, uninterrupted, method, where, step):
    done = run(tmp_path, *arguments(method), "--kill-at-step", str(step), "--kill-in", where)
    assert done.returncode == -9, (done.returncode, done.stderr[-3000:])
    before = losses(tmp_path)
    assert max(before) == step
    resumed = run(tmp_path, *arguments(method), *resume_arguments(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole_losses, whole_adapter = uninterrupted[method]
    assert losses(tmp_path) == whole_losses  # every step, bitwise (steps redone after the kill replace theirs)
    adapter = load_file(tmp_path / "adapter.safetensors")
    assert adapter.keys() == whole_adapter.keys() and all(torch.equal(adapter[k], whole_adapter[k]) for k in adapter)

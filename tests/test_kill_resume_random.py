"""Kills at random moments (slow): the job of tests/scripts/kill_resume_run.py is SIGKILLed from outside at moments
drawn over its training window, whatever it is doing (a step, a checkpoint write, an export), and resumed.
A file of its own so pytest-xdist (``--dist loadfile``) runs it beside the fixed kill points."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_helpers import clean_environment, tiny_llama
from test_kill_resume import SCRIPT, losses, resume_arguments, run

RANDOM_KILLS = 10


def start(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=clean_environment(), start_new_session=True,
    )  # fmt: skip


def wait_for_first_step(job: subprocess.Popen, out: Path) -> float:
    """Seconds until the job recorded its first step (after the imports and the setup, which no kill needs to hit)."""
    began = time.monotonic()
    while not (out / "losses.json").exists():
        assert job.poll() is None, job.stderr.read()[-3000:]
        time.sleep(0.005)
    return time.monotonic() - began


def exported(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The fit-end export's tensors and metadata (not its bytes: safetensors writes the metadata in hash order,
    which differs between processes)."""
    from safetensors import safe_open

    file = out / "export" / "adapter" / "adapter_model.safetensors"
    with safe_open(str(file), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


@pytest.mark.slow
def test_kills_at_random_moments_resume_to_the_same_losses_adapters_and_exports(tmp_path):
    """SIGKILL from outside at a moment drawn uniformly over the training window of the uninterrupted run: it
    lands during a step, a checkpoint write or an export (``export_on="both"``), whatever is running. After each
    kill every export on disk loads under its final name; the resumed run ends with the uninterrupted losses,
    adapter and exported files, bitwise, and no staging left behind."""
    from lightning_peft import load_adapter
    from lightning_peft.formats.atomic import STAGING_PREFIX, recover_interrupted_write

    whole = tmp_path / "whole"
    job = start(whole, "--export-dir", str(whole / "export"))
    wait_for_first_step(job, whole)
    window_began = time.monotonic()
    assert job.wait(timeout=600) == 0, job.stderr.read()[-3000:]
    window = time.monotonic() - window_began
    whole_export = exported(whole)
    draws = random.Random(20261203)
    landed = []
    # A draw past the end of a run (rc 0) means the window measured on the uninterrupted run was longer than this
    # run took: the machine was busier then. The window shrinks to that draw, and another run takes its place, so
    # the kills land inside runs however the load varies between runs (the bound: 2 x RANDOM_KILLS runs).
    for kill in range(2 * RANDOM_KILLS):
        if sum(entry[2] == -9 for entry in landed) == RANDOM_KILLS:
            break
        out = tmp_path / f"kill-{kill}"
        job = start(out, "--export-dir", str(out / "export"))
        wait_for_first_step(job, out)
        delay = draws.uniform(0, window)
        time.sleep(delay)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
        landed.append((round(delay, 3), max(losses(out)), job.returncode))
        for export in sorted((out / "export").glob("step-*/adapter")) + sorted((out / "export").glob("adapter")):
            recover_interrupted_write(export)  # what the next read or write does first: roll a committed move forward
            if (export / "adapter_config.json").exists() or (export / "adapter_model.safetensors").exists():
                load_adapter(tiny_llama(0), export)  # the old or the new export, whole, under its final name
            else:  # a first export of this step killed before its commit mark: only its staging, no adapter yet
                assert all(p.name.startswith(STAGING_PREFIX) for p in export.iterdir()), sorted(export.iterdir())
        if job.returncode == 0:
            window = delay  # the draw came after the end: nothing to resume; later draws stay inside this run's length
            continue
        resumed = run(out, "--export-dir", str(out / "export"), *resume_arguments(out))
        assert resumed.returncode == 0, (kill, landed[-1], resumed.stderr[-3000:])
        assert losses(out) == losses(whole), (kill, landed[-1])
        adapter, whole_adapter = load_file(out / "adapter.safetensors"), load_file(whole / "adapter.safetensors")
        assert all(torch.equal(adapter[k], whole_adapter[k]) for k in whole_adapter), (kill, landed[-1])
        resumed_export = exported(out)
        assert resumed_export[1] == whole_export[1] and resumed_export[0].keys() == whole_export[0].keys()
        assert all(torch.equal(resumed_export[0][k], whole_export[0][k]) for k in whole_export[0])
        assert not [p for p in (out / "export").rglob("*") if p.name.startswith(STAGING_PREFIX) or ".tmp-" in p.name]
    killed = [entry for entry in landed if entry[2] == -9]
    assert len(killed) == RANDOM_KILLS, landed  # the draws hit the runs, not their exits
    print(f"random kills (delay s, last step recorded, exit): {landed}")

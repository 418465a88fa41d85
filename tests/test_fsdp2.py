"""FSDP2 through Lightning's ModelParallelStrategy (data-parallel size 2, gloo, CPU), with the adapters
injected by PEFTMixin before the module's own ``fully_shard`` in ``parallelize``:

- the trained adapters equal a single-process run with the same global batch (every rank starts from
  rank 0's adapter: FSDP2 does not broadcast, lightning_peft.integration.distributed does);
- Lightning's sharded (distributed checkpoint) save is adapter-only, a small fraction of the model;
- resuming from it gives the uninterrupted run's losses and adapters exactly.

Each run is a separate script (tests/scripts/fsdp2_run.py): the strategy starts its second rank by
re-running the command line.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_helpers import clean_environment

SCRIPT = Path(__file__).parent / "scripts" / "fsdp2_run.py"


def run(out: Path, devices: int, *extra: str) -> dict:
    command = [sys.executable, str(SCRIPT), "--devices", str(devices), "--steps", "4", "--out", str(out), *extra]
    done = subprocess.run(command, cwd=out.parent, capture_output=True, text=True, timeout=600, env=clean_environment())
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fsdp2")
    checkpoints = root / "checkpoints"
    results = {
        "single": run(root / "single.pt", 1),
        "fsdp2": run(root / "fsdp2.pt", 2),
        "qlora_single": run(root / "qlora_single.pt", 1, "--qlora"),
        "qlora": run(root / "qlora.pt", 2, "--qlora"),
        "large": run(root / "large.pt", 2, "--shape", "large", "--ckpt-dir", str(checkpoints)),
    }
    first = checkpoints / "epoch=0-step=2.ckpt"
    results["resumed"] = run(root / "resumed.pt", 2, "--shape", "large", "--resume", str(first))
    results["checkpoint"] = first
    results["full_model"] = checkpoints / "full-model"
    return results


@pytest.mark.parametrize("single_run, sharded_run", [("single", "fsdp2"), ("qlora_single", "qlora")], ids=["lora", "qlora-nf4"])
def test_fsdp2_trains_the_same_adapters_as_one_process(runs, single_run, sharded_run):
    """QLoRA too: fully_shard shards the 4-bit codes (stored as float32, FSDP's parameter dtype here) like any
    parameter; bitsandbytes reads the quantization state from the layer when the gathered codes arrive."""
    single, fsdp2 = runs[single_run]["trainable"], runs[sharded_run]["trainable"]
    assert single.keys() == fsdp2.keys() and len(single) == 8  # q and v LoRA A, B in 2 layers
    for key, value in single.items():
        torch.testing.assert_close(fsdp2[key], value, rtol=0, atol=1e-5, msg=key)
    assert max(v.abs().max().item() for k, v in fsdp2.items() if "lora_B" in k) > 1e-3  # B trained away from 0


def test_sharded_checkpoint_is_adapter_only_and_small(runs):
    directory = runs["checkpoint"]
    assert directory.is_dir()  # a distributed checkpoint: one shard file per rank
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    model_keys = {k.removeprefix("state_dict.") for k in keys if k.startswith("state_dict.")}
    assert model_keys == set(runs["large"]["trainable"])  # no frozen weight was written
    size = sum(f.stat().st_size for f in directory.iterdir())
    full = sum(f.stat().st_size for f in runs["full_model"].iterdir())  # the model's weights alone, same format
    assert full >= runs["large"]["model_bytes"]
    assert size <= 0.02 * full, (size, full)


def test_resuming_the_sharded_checkpoint_reproduces_the_run(runs):
    uninterrupted, resumed = runs["large"], runs["resumed"]
    assert sorted(resumed["losses"]) == [3, 4]
    for step in (3, 4):
        assert resumed["losses"][step] == uninterrupted["losses"][step], step
    for key, value in uninterrupted["trainable"].items():
        assert torch.equal(resumed["trainable"][key], value), key

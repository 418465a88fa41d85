"""DeepSpeed ZeRO-2 and ZeRO-3 (Lightning's ``DeepSpeedStrategy`` with ``exclude_frozen_parameters=True``)
with PEFTCallback, 2 processes on CPU (gloo):

- the exported adapter is never empty: under ZeRO-3 a rank holds only its partition of each parameter and
  ``param.data`` is empty (the known "ZeRO-3 saves empty adapters" failure); the export gathers first;
- the exported adapters equal a single-process run with the same global batch;
- checkpoints hold the adapter tensors only, and a ZeRO-2 checkpoint resumes to the uninterrupted run.

Each run is a separate script (tests/scripts/deepspeed_run.py, which explains the CPU stand-in strategy).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_peft.formats.atomic import write_adapter_tensors

from lightning_helpers import clean_environment

SCRIPT = Path(__file__).parent / "scripts" / "deepspeed_run.py"
ADAPTER_FILE = Path("adapter") / "adapter_model.safetensors"


def run(root: Path, name: str, devices: int, *extra: str) -> dict:
    out = root / f"{name}.pt"
    command = [sys.executable, str(SCRIPT), "--devices", str(devices), "--out", str(out), "--export-dir", str(root / name), *extra]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600, env=clean_environment())
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(out, weights_only=False)
    result["adapter"] = load_file(root / name / ADAPTER_FILE)
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    pytest.importorskip("deepspeed", reason="deepspeed is in the test extra: pip install -e '.[test]'")
    root = tmp_path_factory.mktemp("deepspeed")
    results = {
        "single": run(root, "single", 1),
        "zero2": run(root, "zero2", 2, "--stage", "2", "--ckpt-dir", str(root / "zero2-ckpt")),
        "zero3": run(root, "zero3", 2, "--stage", "3", "--ckpt-dir", str(root / "zero3-ckpt")),
    }
    results["zero2_resumed"] = run(root, "zero2-resumed", 2, "--stage", "2", "--resume", str(root / "zero2-ckpt" / "epoch=0-step=2.ckpt"))
    results["root"] = root
    return results


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_exported_adapter_is_whole_and_equals_one_process(runs, stage):
    reference, exported = runs["single"]["adapter"], runs[stage]["adapter"]
    assert exported.keys() == reference.keys() and len(reference) == 8
    for key, value in reference.items():
        assert exported[key].shape == value.shape and value.numel() > 0, key  # not the empty tensor of a ZeRO-3 partition
        torch.testing.assert_close(exported[key], value, rtol=0, atol=1e-5, msg=key)
    assert max(v.abs().max().item() for k, v in exported.items() if "lora_B" in k) > 1e-3  # trained


def test_zero3_export_loads_onto_its_base(runs):
    """The export's base fingerprint is the one taken before ZeRO-3 partitioned the base (a partitioned
    parameter reads as an empty tensor): the file loads onto the real base and rebuilds the trained adapter."""
    from lightning_helpers import tiny_llama

    from lightning_peft import load_adapter

    model = load_adapter(tiny_llama(0), runs["root"] / "zero3" / "adapter")
    loaded = {f"base_model.model.{n}.weight": p for n, p in model.named_parameters() if "lora_" in n}
    for key, value in runs["zero3"]["adapter"].items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("stage, states", [("zero2", "mp_rank_00_model_states.pt"), ("zero3", "zero_pp_rank_0_mp_rank_00_model_states.pt")])
def test_checkpoint_holds_only_the_adapters(runs, stage, states):
    # DeepSpeed's own checkpoint files are pickles, written by the run above.
    saved = torch.load(runs["root"] / f"{stage}-ckpt" / "epoch=0-step=2.ckpt" / "checkpoint" / states, weights_only=False)
    names = {key.removeprefix("base_model.model.").replace(".weight", "") for key in runs["single"]["adapter"]}
    assert {key.removeprefix("model.") for key in saved["module"]} == names
    assert saved["lightning_peft"]["method"]["class_path"].endswith(".LoRA")  # our metadata travels with DeepSpeed's files


def test_zero2_checkpoint_resumes_to_the_uninterrupted_run(runs):
    uninterrupted, resumed = runs["zero2"], runs["zero2_resumed"]
    assert sorted(resumed["losses"]) == [3, 4]
    for step in (3, 4):
        assert resumed["losses"][step] == pytest.approx(uninterrupted["losses"][step], abs=1e-6), step
    for key, value in uninterrupted["adapter"].items():
        torch.testing.assert_close(resumed["adapter"][key], value, rtol=0, atol=1e-6, msg=key)


def test_an_empty_adapter_tensor_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\['lora_A'\] are empty: their parameters are partitioned"):
        write_adapter_tensors({"lora_A": torch.empty(0), "lora_B": torch.ones(2, 2)}, tmp_path / "a.safetensors", {})
    assert not (tmp_path / "a.safetensors").exists()

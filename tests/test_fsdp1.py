"""FSDP1 (Lightning's ``FSDPStrategy``) with PEFTCallback, 2 processes on CPU (gloo):

- the adapter-aware auto-wrap policy gives every unit parameters of one dtype and one requires_grad
  (checked on the units FSDP actually built), for LoRA and for QLoRA with bfloat16-stored 4-bit codes
  under bf16-mixed (FSDP's parameter dtype = ``quant_storage``);
- the trained adapters equal a single-process run with the same global batch (LoRA, and QLoRA NF4 with
  float32-stored codes);
- full and sharded state dicts both give adapter-only checkpoints that resume to the uninterrupted run's
  losses and adapters exactly; the sharded one is under 2% of the model's weights;
- the exported adapter is the whole trained adapter, not rank 0's slices.

Each run is a separate script (tests/scripts/fsdp1_run.py, which explains the CPU stand-in strategy):
the strategy starts its second rank by re-running the command line. The planner itself is also tested
directly on a model, without processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_helpers import clean_environment, save_tiny_llama, tiny_llama
from lightning_peft import IA3, LoRA, PromptTuning
from lightning_peft.core.injection import apply_peft
from lightning_peft.integration.fsdp_wrapping import AdapterWrapPolicy, natural_units, plan_wrap_units

SCRIPT = Path(__file__).parent / "scripts" / "fsdp1_run.py"


def run(out: Path, devices: int, *extra: str) -> dict:
    command = [sys.executable, str(SCRIPT), "--devices", str(devices), "--steps", "4", "--out", str(out), *extra]
    done = subprocess.run(command, cwd=out.parent, capture_output=True, text=True, timeout=600, env=clean_environment())
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(out, weights_only=False)
    result["log"] = done.stderr
    result["path"] = out
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fsdp1")
    full, sharded = root / "full", root / "sharded"
    results = {
        "single": run(root / "single.pt", 1),
        "full": run(root / "full.pt", 2, "--ckpt-dir", str(full), "--export-dir", str(root / "export")),
        "large": run(root / "large.pt", 2, "--shape", "large", "--state-dict", "sharded", "--ckpt-dir", str(sharded)),
        # Equality with float32-stored codes: under bf16-mixed, one process computes with autocast while FSDP
        # casts the parameters themselves, and the two roundings differ by far more than the reduction order.
        "qlora_single": run(root / "qlora_single.pt", 1, "--qlora"),
        "qlora": run(root / "qlora.pt", 2, "--qlora"),
        "qlora_bf16": run(root / "qlora_bf16.pt", 2, "--qlora", "--precision", "bf16-mixed"),
    }
    # QLoRA streamed from a saved model in configure_model, by every rank or by rank 0 alone.
    model_dir = save_tiny_llama(root / "tiny-llama")
    results["streamed"] = run(root / "streamed.pt", 2, "--streamed-qlora", model_dir)
    results["rank0_only"] = run(root / "rank0_only.pt", 2, "--streamed-qlora", model_dir, "--rank0-only")
    results["model_dir"] = model_dir
    results["export"] = root / "export" / "adapter" / "adapter_model.safetensors"
    results["full_checkpoint"] = full / "epoch=0-step=2.ckpt"
    results["sharded_checkpoint"] = sharded / "epoch=0-step=2.ckpt"
    results["full_resumed"] = run(root / "full_resumed.pt", 2, "--resume", str(results["full_checkpoint"]))
    results["sharded_resumed"] = run(
        root / "sharded_resumed.pt", 2, "--shape", "large", "--state-dict", "sharded", "--resume", str(results["sharded_checkpoint"])
    )
    return results


@pytest.mark.parametrize("name", ["full", "qlora_bf16"])
def test_every_wrap_unit_holds_one_dtype_and_one_requires_grad(runs, name):
    root = runs[name]["units"][0]
    assert root["name"] == "" and root["numel"] == 0  # the root unit owns nothing (FSDP's root state-dict hook)
    units = [u for u in runs[name]["units"] if u["numel"]]
    assert units, "no FSDP unit was built"
    for unit in units:
        assert len(unit["dtypes"]) == 1 and len(unit["requires_grad"]) == 1, unit
    trainable_units = [u for u in units if u["requires_grad"] == {True}]
    assert len(trainable_units) == 4  # q and v LoRA factors in 2 layers, each its own unit
    if name == "qlora_bf16":  # 4-bit codes stored in bfloat16 beside float32 norms and adapters
        assert {"torch.bfloat16"} in [u["dtypes"] for u in units] and {"torch.float32"} in [u["dtypes"] for u in units]
        losses = runs[name]["losses"]
        assert sorted(losses) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())


@pytest.mark.parametrize("single, sharded, atol", [("single", "full", 1e-5), ("qlora_single", "qlora", 1e-5)])
def test_fsdp1_trains_the_same_adapters_as_one_process(runs, single, sharded, atol):
    one, two = runs[single]["trainable"], runs[sharded]["trainable"]
    assert one.keys() == two.keys() and len(one) == 8  # q and v LoRA A, B in 2 layers
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=0, atol=atol, msg=key)
    assert max(v.abs().max().item() for k, v in two.items() if "lora_B" in k) > 1e-3  # B trained away from 0


def test_full_state_dict_checkpoint_is_adapter_only_and_resumes_exactly(runs):
    checkpoint = torch.load(runs["full_checkpoint"], weights_only=False)
    assert set(checkpoint["state_dict"]) == set(runs["full"]["trainable"])  # no frozen weight, clean names
    uninterrupted, resumed = runs["full"], runs["full_resumed"]
    assert sorted(resumed["losses"]) == [3, 4]
    for step in (3, 4):
        assert resumed["losses"][step] == uninterrupted["losses"][step], step
    for key, value in uninterrupted["trainable"].items():
        assert torch.equal(resumed["trainable"][key], value), key


def test_sharded_checkpoint_is_adapter_only_small_and_resumes_exactly(runs):
    import torch.distributed.checkpoint as dcp

    directory = runs["sharded_checkpoint"]
    keys = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    model_keys = {k.removeprefix("model.") for k in keys if not k.startswith("optimizer_")}
    assert model_keys == set(runs["large"]["trainable"])
    size = sum(f.stat().st_size for f in directory.iterdir())
    assert size <= 0.02 * runs["large"]["model_bytes"], (size, runs["large"]["model_bytes"])
    uninterrupted, resumed = runs["large"], runs["sharded_resumed"]
    assert sorted(resumed["losses"]) == [3, 4]
    for step in (3, 4):
        assert resumed["losses"][step] == uninterrupted["losses"][step], step
    for key, value in uninterrupted["trainable"].items():
        assert torch.equal(resumed["trainable"][key], value), key
    # FSDP1 warns once per parameter it does not find in a sharded state dict; the frozen ones are absent by design.
    assert "Did not find param with FQN" not in resumed["log"]


# -- the planner, without processes ---------------------------------------------------------------
def _unit_contents(root: nn.Module, units: set[nn.Module]) -> dict[str, set]:
    """For each unit (and the root): the (dtype, requires_grad) kinds of the parameters it would flatten."""
    contents: dict[str, set] = {}

    def walk(module: nn.Module, owner: str, names: dict[nn.Module, str]) -> None:
        for param in module.parameters(recurse=False):
            contents.setdefault(owner, set()).add((param.dtype, param.requires_grad))
        for child in module.children():
            walk(child, names[child] if child in units else owner, names)

    names = {module: name for name, module in root.named_modules()}
    walk(root, "<root>", names)
    return contents


@pytest.mark.parametrize(
    "method",
    [LoRA(r=4, target_modules=["q_proj", "v_proj"]), IA3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), PromptTuning(num_virtual_tokens=4)],
    ids=["lora", "ia3", "prompt-tuning"],
)
def test_planned_units_are_homogeneous_and_keep_blocks(method):
    model = tiny_llama(0)
    apply_peft(model, method)
    model.model.layers[0].input_layernorm.to(torch.bfloat16)  # a second frozen dtype inside a block, as QLoRA has
    root = nn.Module()
    root.model = model
    units = plan_wrap_units(root, natural_units(root))
    assert set(model.model.layers) <= units  # the transformer blocks stay units
    contents = _unit_contents(root, units)
    assert "<root>" not in contents  # the root owns nothing (FSDP's root state-dict hook)
    for name, kinds in contents.items():
        assert len(kinds) == 1, (name, kinds)
    trainable = {name for name, kinds in contents.items() if next(iter(kinds))[1]}
    assert trainable  # the adapters sit in units of their own


def test_a_function_policy_is_refused_with_what_to_pass_instead():
    def legacy_policy(module, recurse, nonwrapped_numel):
        return False

    with pytest.raises(TypeError, match="pass the block classes as a set"):
        AdapterWrapPolicy(legacy_policy)


def test_exported_adapter_is_the_whole_trained_adapter(runs):
    """Each rank holds a slice of every adapter tensor (a view into its shard of a flat parameter); the
    export gathers the adapter units, and only those, before rank 0 writes. It loads onto the base with
    its plain module names (no FSDP wrapper segments) and its base fingerprint."""
    from safetensors.torch import load_file

    from lightning_peft import load_adapter

    config = json.loads((runs["export"].parent / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    loaded = load_adapter(tiny_llama(0), runs["export"].parent)
    trained = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    for key, value in runs["full"]["trainable"].items():
        assert torch.equal(trained[key.removeprefix("model.")], value), key
    exported = load_file(runs["export"])
    trained = runs["full"]["trainable"]
    assert {key.removeprefix("base_model.model.").removesuffix(".weight") for key in exported} == {key.removeprefix("model.") for key in trained}
    for key, value in trained.items():
        assert torch.equal(exported["base_model.model." + key.removeprefix("model.") + ".weight"], value), key


def test_a_module_owning_two_dtypes_is_refused_with_the_fix():
    model = tiny_llama(0)
    apply_peft(model, LoRA(r=4, target_modules=["q_proj"]))
    model.model.layers[0].self_attn.k_proj.bias = nn.Parameter(torch.zeros(16, dtype=torch.bfloat16), requires_grad=False)
    root = nn.Module()
    root.model = model
    with pytest.raises(ValueError, match=r"model.model.layers.0.self_attn.k_proj.*dtypes \['torch.bfloat16', 'torch.float32'\].*quant_storage"):
        plan_wrap_units(root, natural_units(root))


def test_frozen_parameters_on_the_root_are_refused_with_the_fix():
    root = nn.Module()
    root.model = tiny_llama(0)
    root.scale = nn.Parameter(torch.ones(1), requires_grad=False)
    with pytest.raises(ValueError, match=r"holds frozen parameters itself \(\['scale'\]\).*submodule"):
        plan_wrap_units(root, natural_units(root))


def test_rank0_only_loading_starts_other_ranks_empty_and_trains_the_same(runs):
    """Answer.AI-style low-memory QLoRA: rank 0 streams the checkpoint into 4-bit, rank 1 builds the model with
    no parameter memory at all (meta device, plus the 4-bit layers' quantization state), and FSDP1 fills it from
    rank 0 at wrap time. Training is bitwise the run where every rank loads and quantizes the checkpoint."""
    every_rank, rank0_only = runs["streamed"], runs["rank0_only"]
    rank = {(name, r): torch.load(f"{runs[name]['path']}.rank{r}", weights_only=False) for name in ("streamed", "rank0_only") for r in (0, 1)}
    assert rank["streamed", 1]["bytes"] > 0
    assert rank["rank0_only", 1]["bytes"] == 0
    assert rank["rank0_only", 0]["bytes"] == rank["streamed", 0]["bytes"] > 0
    # Rank 1 keeps rank 0's fingerprint of the base, sample sums included (its own tensors were empty).
    assert rank["rank0_only", 1]["fingerprint"] == rank["rank0_only", 0]["fingerprint"] == rank["streamed", 0]["fingerprint"]
    # (4-bit codes are fingerprinted by shape only; norms and embeddings carry sample sums.)
    assert any(total is not None for _, total in rank["rank0_only", 1]["fingerprint"]["tensors"].values())
    assert rank0_only["losses"] == every_rank["losses"]
    for key, value in every_rank["trainable"].items():
        assert torch.equal(rank0_only["trainable"][key], value), key
    assert max(v.abs().max().item() for k, v in rank0_only["trainable"].items() if "lora_B" in k) > 1e-3

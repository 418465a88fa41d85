"""One FSDP1 (Lightning ``FSDPStrategy``) or single-process training run on CPU, for tests/test_fsdp1.py.

Lightning allows FSDP1 on GPUs only and torch's FSDP1 needs ``device_id=cpu`` to run on CPU processes,
so the run uses :class:`CPUFSDPStrategy`, full state dicts are gathered without offloading to the host
(they are on the host already), and ``sync_module_states`` may broadcast host tensors (gloo can). Nothing else changes: the auto-wrap policy, the checkpoint save/load paths
and the optimizer-state handling are Lightning's. Launched as its
own script because the strategy starts its other rank by re-running the command line. Writes the trainable
tensors, the per-step losses and a description of the wrap units to ``--out``.

    python tests/scripts/fsdp1_run.py --devices 2 --steps 4 --out run.pt [--state-dict sharded] [--ckpt-dir d] [--resume ckpt]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as L
import lightning.pytorch.strategies.fsdp as lightning_fsdp
import torch
import torch.distributed.fsdp._init_utils as fsdp_init_utils
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_helpers import LitCausalLM, LitPEFTCausalLM, run_distributed_script, token_batches  # noqa: E402
from lightning_peft import LoRA, PEFTCallback, Quantization  # noqa: E402
from lightning_peft.quantization import load_quantized, prepare_model_for_kbit_training  # noqa: E402

GLOBAL_BATCH = 4
STEPS_PER_EPOCH = 2  # checkpoints at epoch ends, where a resumed run sees exactly the data it would have
MODEL_SHAPES = {
    "small": {},
    "large": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, vocab_size=512),
}


class CPUFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` on CPU processes (gloo): Lightning's GPU check only looks at the exact class, and the
    wrapper is built with ``device_id=cpu`` (Lightning passes the GPU index, ``None`` on CPU, which torch
    refuses)."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs,
        )  # fmt: skip


def _full_state_dict_in_place(module: torch.nn.Module, world_size: int, rank0_only: bool = True):
    """Lightning's full-state-dict context without ``offload_to_cpu``: offloading copies gathered GPU tensors
    to the host, and on CPU processes it frees the one copy there is (a segmentation fault in the clone)."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(
        module=module, state_dict_type=StateDictType.FULL_STATE_DICT,
        state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )  # fmt: skip


lightning_fsdp._get_full_state_dict_context = _full_state_dict_in_place
# FSDP1 refuses sync_module_states for host tensors because NCCL cannot broadcast host memory; gloo can.
fsdp_init_utils._check_module_states_for_sync_module_states = lambda module_states: None


class ShardedLM(LitCausalLM):
    """Each rank reads its own rows of the global batch."""

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        rows = token_batches(n_batches=STEPS_PER_EPOCH, batch_size=GLOBAL_BATCH)
        return DataLoader(rows[rank::world], batch_size=GLOBAL_BATCH // world, shuffle=False)


class StreamedQLoRALM(LitPEFTCausalLM):
    """QLoRA with the base streamed into 4-bit in ``configure_base_model`` (PEFTMixin), on rank 0 only when
    ``rank0_only``; records how many bytes of parameters this rank held right after loading."""

    def __init__(self, model_dir: str, rank0_only: bool) -> None:
        super().__init__(lora_args=dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
        self.model_dir, self.rank0_only = model_dir, rank0_only
        self.bytes_after_load = None

    def configure_base_model(self) -> torch.nn.Module:
        quantization = Quantization(bits=4, compute_dtype="float32", quant_storage="float32")
        model = load_quantized(self.model_dir, quantization, dtype=torch.float32, rank0_only=self.rank0_only)
        self.bytes_after_load = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
        return prepare_model_for_kbit_training(model)

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        rows = token_batches(n_batches=STEPS_PER_EPOCH, batch_size=GLOBAL_BATCH)
        return DataLoader(rows[rank::world], batch_size=GLOBAL_BATCH // world, shuffle=False)


def wrap_units(model: torch.nn.Module) -> list[dict]:
    """For every FSDP unit: its name and the dtypes and requires_grad of the parameters it flattens."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    units = []
    for name, module in model.named_modules():
        if isinstance(module, FullyShardedDataParallel):
            handle = module._handle  # the unit's FlatParamHandle; None for a unit that owns no parameter
            params = handle.flat_param._params if handle is not None else []
            units.append({"name": name, "dtypes": {str(p.dtype) for p in params}, "requires_grad": {p.requires_grad for p in params}, "numel": sum(p.numel() for p in params)})
    return units


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", required=True)
    parser.add_argument("--state-dict", choices=["full", "sharded"], default="full")
    parser.add_argument("--ckpt-dir")
    parser.add_argument("--resume")
    parser.add_argument("--export-dir")
    parser.add_argument("--streamed-qlora", help="a saved model directory: load it with load_quantized in configure_model")
    parser.add_argument("--rank0-only", action="store_true", help="with --streamed-qlora: only rank 0 reads and quantizes")
    parser.add_argument("--shape", choices=sorted(MODEL_SHAPES), default="small")
    parser.add_argument("--qlora", action="store_true")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    args = parser.parse_args()

    torch.manual_seed(123)
    callbacks: list = []
    if args.ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=STEPS_PER_EPOCH, save_top_k=-1))
    quantization = None
    if args.qlora:
        # The 4-bit codes stored in FSDP's parameter dtype (float32 under 32-true, bfloat16 under bf16-mixed),
        # so FSDP's casts leave them untouched.
        dtype = "bfloat16" if args.precision == "bf16-mixed" else "float32"
        quantization = Quantization(bits=4, compute_dtype=dtype, quant_storage=dtype)
    if not args.streamed_qlora:
        method = LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
        callbacks.append(PEFTCallback(method, quantization=quantization, export_dir=args.export_dir))
    strategy = CPUFSDPStrategy(state_dict_type=args.state_dict) if args.devices > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, precision=args.precision, max_steps=args.steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(args.ckpt_dir),
        num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=callbacks,
    )  # fmt: skip
    if args.streamed_qlora:
        module = StreamedQLoRALM(args.streamed_qlora, rank0_only=args.rank0_only)
    else:
        module = ShardedLM(seed=0, **MODEL_SHAPES[args.shape])
    trainer.fit(module, ckpt_path=args.resume)
    if args.streamed_qlora:  # every rank says what it held after loading, and the base fingerprint it keeps
        from lightning_peft.core.fingerprint import FINGERPRINT_ATTRIBUTE

        fingerprint = getattr(module.model, FINGERPRINT_ATTRIBUTE)
        torch.save({"bytes": module.bytes_after_load, "fingerprint": fingerprint}, f"{args.out}.rank{trainer.global_rank}")

    units = wrap_units(trainer.strategy.model) if args.devices > 1 else []
    if args.devices > 1:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
            state = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        from lightning_peft.integration.checkpoints import state_dict_name

        state = {state_dict_name(n): t for n, t in state.items()}
    else:
        state = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    if trainer.is_global_zero:
        model_bytes = sum(p.numel() * p.element_size() for p in ShardedLM(seed=0, **MODEL_SHAPES[args.shape]).parameters())
        torch.save({"trainable": state, "losses": module.step_losses, "units": units, "model_bytes": model_bytes}, args.out)


if __name__ == "__main__":
    run_distributed_script(main)

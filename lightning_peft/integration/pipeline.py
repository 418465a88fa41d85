"""The one ordered sequence that turns a LightningModule's model into a PEFT model ready to train.

``PEFTCallback.setup`` (a plain module) and ``PEFTMixin.configure_model`` (a module that builds its model late)
both call :func:`prepare_for_training`; neither repeats the order, which matters:

1. quantize the base (QLoRA), before any adapter exists, so only base weights become k-bit;
2. inject the adapters and freeze the base (:func:`~lightning_peft.core.injection.apply_peft`, transactional);
3. broadcast rank 0's adapters to every rank, before any sharding: FSDP2 never broadcasts, and each rank drew
   its own random initialisation;
4. adopt rank 0's base fingerprint, so every rank writes and checks the same one;
5. make the module's state dict adapter-only (and, for a plain module, install the checkpoint hooks that
   record and verify the method and the fingerprint);
6. log what was adapted.

Steps 1, 3, 4 and 6 run once per model: a second call (a second ``fit``) re-applies nothing that would undo
training.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_peft.core.injection import apply_peft, injected_method, parameter_summary
from lightning_peft.integration.checkpoints import attach_checkpoint_hooks, make_state_dict_adapter_only
from lightning_peft.integration.distributed import adopt_rank0_fingerprint, broadcast_adapters
from lightning_peft.methods.base import PEFTMethod
from lightning_peft.quantization.config import Quantization
from lightning_peft.quantization.prepare import quantize_for_training


def prepare_for_training(
    pl_module: pl.LightningModule,
    model: nn.Module,
    method: PEFTMethod,
    quantization: Quantization | None = None,
    device: Any = None,
    checkpoint_hooks: bool = True,
    model_attr: str | None = None,
) -> list[str]:
    """Run the sequence of the module docstring on ``model`` (held by ``pl_module``); returns the adapted names.

    ``checkpoint_hooks``: install the module-level checkpoint hooks (plain modules; ``PEFTMixin`` has its own).
    """
    first_time = injected_method(model) is None
    if first_time and quantization is not None:
        quantize_for_training(model, quantization, device)
    targets = apply_peft(model, method)
    if first_time:
        broadcast_adapters(model)
        adopt_rank0_fingerprint(model)
    make_state_dict_adapter_only(pl_module)
    if checkpoint_hooks:
        pl_module.strict_loading = False  # frozen keys are absent by design; verify_checkpoint checks the rest
        # Metadata on save and verification on load go through the module's own hooks, which run for
        # weights-only checkpoints too and before the weights are loaded (see checkpoints.py).
        attach_checkpoint_hooks(pl_module, model_attr)
    if first_time:
        rank_zero_info(f"lightning_peft: {type(method).__name__} on {len(targets)} modules; {parameter_summary(pl_module)}")
    return targets

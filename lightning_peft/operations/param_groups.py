"""Optimizer parameter groups: LoRA+ and layer-wise learning-rate decay.

**LoRA+** (Hayou, Ghosh and Yu, 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models",
arXiv:2402.12354). LoRA's update is ``B @ A`` with ``B`` zero at initialisation. The paper shows that, as
the model width grows, a single learning rate for ``A`` and ``B`` makes feature learning inefficient, and
that ``B`` should learn faster: ``lr_B = ratio * lr_A``. The paper suggests a ratio of about 16 (2**4) as a
default; with it, lower the base learning rate a little compared with plain LoRA.

**Layer-wise learning-rate decay** (ELECTRA, Clark et al., 2020, arXiv:2003.10555; used again by BEiT,
Bao et al., 2021, arXiv:2106.08254): lower layers hold more general features and should move less, so
each block gets the rate of the block above it times ``decay``. With ``L`` repeated blocks (Llama
``model.layers.N``, GPT-2 ``transformer.h.N``, BERT ``encoder.layer.N``)::

    parameters before the first block (embeddings)     decay ** L
    block i (0-based)                                  decay ** (L - 1 - i)
    parameters after the last block (final norm, head) 1.0

Both give a *multiplier* per trainable parameter (their product when both are set). The tasks build
one parameter group per distinct multiplier, construct the configured optimizer from them (so every
group starts at the optimizer's own ``lr``, whatever optimizer class that is: torch AdamW, bitsandbytes
PagedAdamW8bit, ...) and then call :func:`apply_lr_scales`, which multiplies each group's ``lr`` by its
``lr_scale``. Schedulers built afterwards start from the scaled rates::

    groups = build_param_groups(model, ParamGroups(loraplus_ratio=16))
    optimizer = apply_lr_scales(torch.optim.AdamW(groups, lr=2e-4))   # A: 2e-4, B: 3.2e-3
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=1000)

With your own ``configure_optimizers`` (``PEFTCallback``), :func:`param_groups` gives groups with absolute
learning rates::

    torch.optim.AdamW(param_groups(self, lr=2e-4, loraplus_ratio=16))

From YAML (LightningCLI)::

    model:
      class_path: lightning_peft.recipes.tasks.CausalLMTask
      init_args:
        param_groups: {loraplus_ratio: 16, layer_decay: 0.9}

Which parameters count as LoRA+'s ``B`` follows HF peft's ``create_loraplus_optimizer``: adapter tensors
named ``lora_B`` / ``lora_embedding_B``, and 1-D adapter tensors (e.g. DoRA's ``lora_magnitude_vector``).
Intended differences from peft:

- **Embedding adapters.** peft puts both tensors of an embedding LoRA at a fixed absolute learning rate
  (``loraplus_lr_embedding``, 1e-6) whatever the base rate. Here they are treated like every other
  adapter (``B`` gets the ratio, ``A`` the base rate): an absolute rate cannot be expressed as a
  multiplier of an optimizer whose ``lr`` we do not know, and 1e-6 all but freezes an embedding adapter at
  the usual LoRA rates (1e-4 to 1e-3), which would make targeting the embedding pointless without saying so.
- **Only adapter tensors get the ratio.** peft gives it to *every* trainable 1-D tensor, including the
  biases and norm weights of ``modules_to_save`` heads (and all of them under full fine-tuning). Those are
  not part of a low-rank product, so here they keep the base rate.
- **Weight decay** is the optimizer's own unless :func:`build_param_groups` is given ``weight_decay``
  (peft sets 0.0 on every group by default, overriding the optimizer's).

Other notes:

- ``lr_scale`` is also the key timm's schedulers read (they multiply by it at every step): with a timm
  scheduler, do not call :func:`apply_lr_scales`.
- Schedulers that set absolute per-group rates (``OneCycleLR``, ``CyclicLR``) overwrite the scaled rates;
  the tasks check this and raise. ``eta_min`` of cosine annealing is absolute too, so all groups end at
  the same floor (0 by default, which keeps the ratios).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lightning_peft.core.adapter_layer import adapter_layers

# Names (one segment of a parameter's qualified name) of the "B" matrix of a low-rank product: ours and
# peft's (``lora_embedding_B`` is peft's name for an embedding adapter's B).
B_NAMES = ("lora_B", "lora_embedding_B")
# Set on a group once its lr includes its lr_scale, so apply_lr_scales never scales a group twice.
_APPLIED = "lr_scale_applied"


@dataclass(frozen=True)
class ParamGroups:
    """How the trainable parameters are split into optimizer groups with their own learning rates.

    Args:
        loraplus_ratio: LoRA+: the ``B`` matrices (and 1-D adapter tensors) learn ``ratio`` times faster
            than everything else (> 0; the paper suggests 16). ``None``: off.
        layer_decay: layer-wise learning-rate decay in (0, 1]: block ``i`` of ``L`` gets
            ``layer_decay ** (L - 1 - i)``, the embeddings ``layer_decay ** L``, the final norm and head 1.
            ``None``: off.

    Example::

        >>> ParamGroups(loraplus_ratio=16)
        ParamGroups(loraplus_ratio=16.0, layer_decay=None)
    """

    loraplus_ratio: Optional[float] = None
    layer_decay: Optional[float] = None

    def __post_init__(self) -> None:
        if self.loraplus_ratio is not None:
            if not _is_real(self.loraplus_ratio) or not self.loraplus_ratio > 0 or not math.isfinite(self.loraplus_ratio):
                raise ValueError(
                    f"loraplus_ratio={self.loraplus_ratio!r} is not allowed: it must be a finite number > 0 "
                    f"(lr of B / lr of A; the LoRA+ paper suggests 16), or None to switch LoRA+ off"
                )
            object.__setattr__(self, "loraplus_ratio", float(self.loraplus_ratio))
        if self.layer_decay is not None:
            if not _is_real(self.layer_decay) or not 0 < self.layer_decay <= 1:
                raise ValueError(
                    f"layer_decay={self.layer_decay!r} is not allowed: it must be in (0, 1] (each block's lr is the "
                    f"next block's times layer_decay; ELECTRA used 0.8), or None to switch it off"
                )
            object.__setattr__(self, "layer_decay", float(self.layer_decay))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------------
# Multipliers
# ------------------------------------------------------------------------------------------------
def _loraplus_b_ids(model: nn.Module) -> tuple[set[int], bool]:
    """ids of the adapter tensors that get the LoRA+ ratio, and whether the model has any adapter."""
    b_ids: set[int] = set()
    has_adapters = False
    for _, layer in adapter_layers(model):
        for name, param in layer.adapter_named_parameters():
            has_adapters = True
            if param.ndim == 1 or any(part in B_NAMES for part in name.split(".")):
                b_ids.add(id(param))
    return b_ids, has_adapters


def _first_index(name: str) -> tuple[str, int] | None:
    """``("model.layers", 3)`` for ``model.layers.3.self_attn.q_proj.lora_A``; ``None`` without a number."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i]), int(part)
    return None


def _layer_depths(model: nn.Module, names: list[str], decay: float) -> dict[str, float]:
    """The layer-decay multiplier of each parameter name in ``names`` (names as ``model.named_parameters()``)."""
    # The block list is found from the module names of the whole model (frozen parts included), so L counts
    # every block, not only those that carry trainable parameters.
    containers: dict[str, set[int]] = {}
    for module_name, _ in model.named_modules():
        found = _first_index(module_name)
        if found is not None:
            containers.setdefault(found[0], set()).add(found[1])
    if not containers:
        raise ValueError(
            f"layer_decay is set but {type(model).__name__} has no numbered blocks (a module list such as "
            f"Llama's model.layers.N, GPT-2's transformer.h.N or BERT's encoder.layer.N): there are no layers to "
            f"decay the learning rate over; remove layer_decay"
        )
    if len(containers) > 1:
        found = ", ".join(f"{prefix or '<root>'} ({len(indices)} blocks)" for prefix, indices in sorted(containers.items()))
        raise ValueError(
            f"layer_decay needs one list of repeated blocks, but {type(model).__name__} has several: {found}; "
            f"layer-wise decay over more than one stack (e.g. encoder and decoder) is not supported"
        )
    ((prefix, indices),) = containers.items()
    rank = {index: position for position, index in enumerate(sorted(indices))}
    num_blocks = len(rank)
    # "Before" and "after" the blocks is registration order, which is forward order in transformers models.
    order = [name for name, _ in model.named_parameters()]
    block_prefix = f"{prefix}." if prefix else ""
    first_block = next(
        (i for i, name in enumerate(order) if name.startswith(block_prefix) and _first_index(name) is not None),
        len(order),
    )
    position = {name: i for i, name in enumerate(order)}
    depths = {}
    for name in names:
        found = _first_index(name)
        if found is not None:
            depths[name] = decay ** (num_blocks - 1 - rank[found[1]])
        elif position[name] < first_block:
            depths[name] = decay**num_blocks
        else:
            depths[name] = 1.0
    return depths


def lr_multipliers(model: nn.Module, groups: ParamGroups) -> dict[str, float]:
    """Learning-rate multiplier of every trainable parameter of ``model``, by qualified name.

    LoRA+ gives ``groups.loraplus_ratio`` to adapter tensors named ``lora_B``/``lora_embedding_B`` and to
    1-D adapter tensors; layer decay gives ``layer_decay ** k`` by depth (see the module docstring). With
    both, the multipliers multiply. Parameters that ``requires_grad`` is false for are not listed.

    Raises:
        ValueError: ``layer_decay`` is set but ``model`` has no single list of numbered blocks.
    """
    if not isinstance(groups, ParamGroups):
        raise TypeError(f"groups must be a lightning_peft.ParamGroups(...), got {type(groups).__name__}")
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    multipliers = {name: 1.0 for name, _ in trainable}
    if groups.loraplus_ratio is not None:
        b_ids, has_adapters = _loraplus_b_ids(model)
        if not has_adapters:
            warnings.warn(
                f"loraplus_ratio={groups.loraplus_ratio:g} but {type(model).__name__} has no adapter layers "
                f"(full fine-tuning?): every parameter keeps the base learning rate",
                stacklevel=2,
            )
        for name, param in trainable:
            if id(param) in b_ids:
                multipliers[name] *= groups.loraplus_ratio
    if groups.layer_decay is not None:
        for name, scale in _layer_depths(model, [name for name, _ in trainable], groups.layer_decay).items():
            multipliers[name] *= scale
    return multipliers


# ------------------------------------------------------------------------------------------------
# Groups
# ------------------------------------------------------------------------------------------------
def build_param_groups(model: nn.Module, groups: ParamGroups, weight_decay: Optional[float] = None) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` in optimizer groups of equal learning-rate multiplier.

    Each group is ``{"params": [...], "lr_scale": multiplier}``; groups come in the order their first
    parameter appears in ``model.named_parameters()`` and keep that order inside (so the order, which
    optimizer checkpoints rely on, is the same on every run). Pass them to any optimizer, then call
    :func:`apply_lr_scales` on it.

    Args:
        weight_decay: ``None`` leaves weight decay to the optimizer. A number sets it on the groups of
            matrices and sets 0 on those of 1-D tensors (biases, norm weights, DoRA magnitudes: decaying a
            magnitude towards 0 would shrink the whole layer), splitting groups where needed.
    """
    multipliers = lr_multipliers(model, groups)
    if not multipliers:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to put into optimizer groups")
    buckets: dict[tuple[float, Optional[float]], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if name not in multipliers:
            continue
        decay = None if weight_decay is None else (0.0 if param.ndim <= 1 else float(weight_decay))
        buckets.setdefault((multipliers[name], decay), []).append(param)
    result = []
    for (scale, decay), params in buckets.items():
        group: dict[str, Any] = {"params": params, "lr_scale": scale}
        if decay is not None:
            group["weight_decay"] = decay
        result.append(group)
    return result


def apply_lr_scales(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Multiply each group's ``lr`` by its ``lr_scale``; returns ``optimizer``.

    Call it right after building the optimizer from :func:`build_param_groups` (each group's ``lr`` then
    is the optimizer's base rate) and *before* building any LR scheduler: schedulers read each group's
    ``lr`` when they are constructed (``initial_lr``/``base_lrs``). A group scaled once is marked and never
    scaled again, so calling this twice is harmless.

    Raises:
        RuntimeError: a scheduler was already built on ``optimizer`` (a group has ``initial_lr``); its base
            rates would stay unscaled.
    """
    for index, group in enumerate(optimizer.param_groups):
        if "lr_scale" not in group or group.get(_APPLIED):
            continue
        if "initial_lr" in group:
            raise RuntimeError(
                f"param group {index} already has an 'initial_lr': an LR scheduler was built on this optimizer before "
                f"apply_lr_scales; call apply_lr_scales first, then build the scheduler"
            )
        group["lr"] = group["lr"] * group["lr_scale"]  # a new value, also for a tensor lr shared by the groups
        group[_APPLIED] = True
    return optimizer


def check_scheduler_keeps_scales(scheduler: Any) -> None:
    """Raise if ``scheduler`` replaced the scaled per-group rates by its own absolute ones.

    ``OneCycleLR`` and ``CyclicLR`` take absolute rates (``max_lr``, ``base_lr``) and set every group from
    them, which would silently undo LoRA+ or layer decay. Schedulers that only multiply each group's rate
    (LambdaLR, cosine, linear warmup, ...) pass.
    """
    base_lrs = getattr(scheduler, "base_lrs", None)
    optimizer = getattr(scheduler, "optimizer", None)
    if base_lrs is None or optimizer is None:
        return  # e.g. ReduceLROnPlateau: it multiplies each group's current lr
    pairs = [
        (float(base), float(group["lr_scale"]))
        for base, group in zip(base_lrs, optimizer.param_groups)
        if group.get(_APPLIED) and group["lr_scale"] > 0
    ]
    if len(pairs) < 2:
        return
    unscaled = [base / scale for base, scale in pairs]
    if not all(math.isclose(value, unscaled[0], rel_tol=1e-6, abs_tol=0.0) for value in unscaled):
        found = ", ".join(f"{base:g}" for base, _ in pairs)
        scales = ", ".join(f"{scale:g}" for _, scale in pairs)
        raise ValueError(
            f"{type(scheduler).__name__} set the groups' learning rates to {found}, which are not in the proportion "
            f"of their lr_scale ({scales}) from param_groups: it takes absolute rates per group and would undo LoRA+ "
            f"or layer decay. Use a scheduler that multiplies each group's lr (LambdaLR, CosineAnnealingLR, LinearLR, ...)"
        )


def param_groups(
    model: nn.Module, lr: float, loraplus_ratio: Optional[float] = None, layer_decay: Optional[float] = None
) -> list[dict[str, Any]]:
    """Optimizer groups with absolute learning rates, for your own ``configure_optimizers``.

    Example::

        def configure_optimizers(self):
            return torch.optim.AdamW(param_groups(self, lr=2e-4, loraplus_ratio=16), weight_decay=0.0)

    Each group is ``{"params": [...], "lr": lr * multiplier}``; do not call :func:`apply_lr_scales` on an
    optimizer built from them (there is no ``lr_scale`` for it to apply).
    """
    if not _is_real(lr) or not lr > 0:
        raise ValueError(f"lr={lr!r} is not allowed: the base learning rate must be a number > 0")
    groups = build_param_groups(model, ParamGroups(loraplus_ratio=loraplus_ratio, layer_decay=layer_decay))
    return [{"params": group["params"], "lr": lr * group["lr_scale"]} for group in groups]


# Checkpoints store the tasks' hyperparameters, this config included, and torch.load(weights_only=True)
# (the default since torch 2.6, used by load_from_checkpoint) only rebuilds allow-listed classes.
torch.serialization.add_safe_globals([ParamGroups])

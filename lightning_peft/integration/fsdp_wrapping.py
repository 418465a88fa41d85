"""FSDP1 wrap units that never mix frozen with trainable parameters, or one dtype with another.

FSDP1 (``FullyShardedDataParallel``, Lightning's ``FSDPStrategy``) flattens every wrap unit into one
tensor. Two things follow for PEFT:

- a unit that holds frozen base weights and trainable adapters keeps a gradient (and, with
  ``use_orig_params=False``, refuses to build) for the *whole* flat tensor: the frozen weights' share
  of it is allocated and reduced every step for nothing, which undoes the memory PEFT saves;
- a unit must have one dtype ("Must flatten tensors with uniform dtype"). QLoRA stores its 4-bit codes
  in ``quant_storage`` (e.g. bfloat16) while adapters and norms are float32.

The usual policy (one unit per transformer block) puts both kinds in every block. This module plans
units so that each one's *own* parameters (those not in a nested unit) share one ``(dtype,
requires_grad)`` kind. Starting from the natural units (the user's policy, else the transformer blocks
found from the architecture, :func:`~lightning_peft.core.blocks.transformer_blocks`), a unit whose own
parameters are mixed keeps its majority kind and gives every child subtree of another kind a unit of
its own, recursively. For LoRA in a block this yields what one would write by hand: the block (norms and
untouched projections), each adapted layer's adapter factors, and that layer's frozen ``base_layer``.
The root unit is left owning nothing (its children become units), so FSDP's own state-dict hooks never
look for a frozen key that the adapter-only checkpoint hook has already dropped.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import torch
from torch import nn

from lightning_peft.core.blocks import transformer_blocks

Kind = tuple[torch.dtype, bool]  # (dtype, requires_grad)


def _own_kinds(module: nn.Module) -> Counter[Kind]:
    kinds: Counter[Kind] = Counter()
    for param in module.parameters(recurse=False):
        kinds[(param.dtype, param.requires_grad)] += param.numel()
    return kinds


def plan_wrap_units(root: nn.Module, natural_units: set[nn.Module], ignored: set[nn.Module] = frozenset()) -> set[nn.Module]:
    """The modules to wrap (the root excluded): ``natural_units`` plus whatever keeps every unit's own
    parameters of one kind (see module docstring)."""
    units = {m for m in natural_units if m is not root}
    memo: dict[nn.Module, Counter[Kind]] = {}

    def residual(module: nn.Module) -> Counter[Kind]:
        """Kinds of the parameters that would land in the unit enclosing ``module``."""
        if module in memo:
            return memo[module]
        kinds = _own_kinds(module)
        for child in module.children():
            if child not in units and child not in ignored:
                kinds += residual(child)
        memo[module] = kinds
        return kinds

    def split(unit: nn.Module) -> None:
        """Make ``unit``'s own parameters one kind: its own direct parameters' majority kind, else the
        majority of what would land in it."""
        kinds = _own_kinds(unit) or residual(unit)
        if kinds:
            keep_in(unit, kinds.most_common(1)[0][0])
        else:
            keep_in(unit, None)

    def keep_in(module: nn.Module, target: Kind | None) -> None:
        """Walk ``module``'s children, which belong to a unit of kind ``target``: a child subtree holding
        another kind becomes a unit of its own; nested units are split in turn."""
        for child in module.children():
            if child in ignored:
                continue
            if child in units:
                split(child)
                continue
            kinds, own = residual(child), _own_kinds(child)
            if kinds and (target not in kinds or (own and set(own) != {target})):
                # All of another kind, or owns another kind itself (an adapter layer's factors): a unit of its own.
                units.add(child)
                memo.clear()  # the residuals of this child's ancestors change
                split(child)
            else:
                # Same kind all through, or a mixed subtree (an attention block with one adapted projection):
                # go down and wrap only the parts of another kind, and split nested natural units.
                keep_in(child, target)

    # The root is a unit of no kind: every child subtree with parameters becomes a unit, so the root owns
    # only its own direct parameters. FSDP's state-dict hook for the root asserts that all of the root's
    # parameters are in the state dict, and the adapter-only hook has dropped the frozen ones before it.
    keep_in(root, None)
    _check_units_can_flatten(root, units, ignored)
    return units


def _check_units_can_flatten(root: nn.Module, units: set[nn.Module], ignored: set[nn.Module]) -> None:
    """Refuse, with the fix, what no choice of units can separate: one module's own parameters in two dtypes
    (FSDP1 flattens a unit into one tensor), and frozen parameters owned by the root itself."""
    names = {module: name for name, module in root.named_modules()}
    for module in (root, *units):
        if module in ignored:
            continue
        dtypes = {dtype for dtype, _ in _own_kinds(module)}
        if len(dtypes) > 1:
            raise ValueError(
                f"FSDP1 cannot shard {names[module] or type(module).__name__!r} ({type(module).__name__}): its own parameters "
                f"have dtypes {sorted(map(str, dtypes))} and a wrap unit is flattened into one tensor. Load the base in one "
                f"dtype (for QLoRA, the quant_storage dtype, e.g. dtype=torch.bfloat16 with quant_storage='bfloat16')"
            )
    frozen_at_root = [name for name, param in root.named_parameters(recurse=False) if not param.requires_grad]
    if frozen_at_root:
        raise ValueError(
            f"{type(root).__name__} holds frozen parameters itself ({frozen_at_root[:3]}); under FSDP1 with adapter-only "
            f"checkpoints they must live in a submodule (e.g. an nn.Module attribute) so they get a wrap unit of their own"
        )


def natural_units(model: nn.Module) -> set[nn.Module]:
    """The transformer blocks of every model inside ``model`` (one unit each, the usual FSDP choice)."""
    try:
        names = transformer_blocks(model)
    except ValueError:  # no recognisable block list: the homogeneity rule alone decides
        return set()
    return {model.get_submodule(name) for name in names}


def _policy_base() -> type:
    from torch.distributed.fsdp.wrap import CustomPolicy

    return CustomPolicy


class AdapterWrapPolicy(_policy_base()):  # type: ignore[misc]
    """An FSDP1 ``auto_wrap_policy``: the user's policy (or the transformer blocks), made homogeneous.

    Args:
        base_policy: the policy the user gave the strategy (a ``ModuleWrapPolicy``, ``CustomPolicy`` or any
            FSDP ``_Policy``), whose units are kept with their kwargs; ``None`` for transformer blocks.
    """

    def __init__(self, base_policy: Any = None) -> None:
        super().__init__(lambda module: False)
        if base_policy is not None and not hasattr(base_policy, "_run_policy"):
            raise TypeError(
                f"lightning_peft cannot combine the FSDP auto_wrap_policy {base_policy!r} (a function) with its adapter "
                f"units; pass the block classes as a set, e.g. FSDPStrategy(auto_wrap_policy={{LlamaDecoderLayer}}), or a "
                f"torch.distributed.fsdp.wrap.ModuleWrapPolicy / CustomPolicy"
            )
        self.base_policy = base_policy

    def _run_policy(self, root_module: nn.Module, ignored_modules: set[nn.Module], root_kwargs: dict[str, Any]) -> dict[nn.Module, dict[str, Any]]:
        chosen = self.base_policy._run_policy(root_module, ignored_modules, root_kwargs) if self.base_policy else {}
        natural = set(chosen) or natural_units(root_module)
        units = plan_wrap_units(root_module, natural, set(ignored_modules))
        return {module: chosen.get(module, copy.copy(root_kwargs)) for module in units}

"""The adapter protocol: :class:`AdapterModule`, and :class:`AdapterLayer` for methods that wrap a layer.

Every method that changes a layer (LoRA, DoRA, (IA)3, ...) wraps the original module by composition
and keeps it as ``self.base_layer``. Methods that change the model's *inputs* rather than a layer
(prompt tuning, P-tuning, prefix tuning) attach one :class:`AdapterModule` that owns their parameters
beside the model and hooks the model's forward. These conventions answer every question the rest of
the package asks about adapters, without sniffing parameter names:

- a parameter is an *adapter* parameter iff it lives in an :class:`AdapterModule` and not under a
  layer's ``base_layer`` (freezing, checkpoint filtering, export and counting all use this rule);
- the base model's own parameter names are recovered by dropping the ``.base_layer`` segment, so a
  fingerprint or a merged state dict of a wrapped model uses exactly the base model's keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from lightning_peft.core.sharding import state_dict_name

BASE_LAYER = "base_layer"


def is_kbit_weight(weight: torch.Tensor) -> bool:
    """A bitsandbytes k-bit weight: packed 4-bit codes (``quant_state``, possibly stored in a float
    dtype) or LLM.int8 integers. Such a weight cannot be read or written as the matrix it stands for."""
    return not weight.is_floating_point() or getattr(weight, "quant_state", None) is not None


#: Where HF peft's files put the tensors of the module at ``<path>``: ``base_model.model.<path>.<suffix>``.
PEFT_KEY_PREFIX = "base_model.model."


class AdapterModule(nn.Module):
    """Everything an adapter owns: all its parameters and persistent buffers, except those under a
    wrapped ``base_layer`` (see :class:`AdapterLayer`).

    A module that is not a layer wrapper (the virtual tokens of prompt tuning) is attached to the model
    by its method and removes itself with :meth:`detach`. Subclasses implement :meth:`peft_state_dict` /
    :meth:`load_peft_state_dict` (the peft file-format view of their tensors).
    """

    def __init__(self) -> None:
        super().__init__()
        # A disabled adapter leaves the model exactly as its base (used by the ``disable_adapters``
        # context manager, e.g. to measure forgetting against the base model).
        self.disabled = False
        self.merged = False

    # -- adapter identity -------------------------------------------------------------------------
    def adapter_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters that belong to the adapter (everything not under ``base_layer``)."""
        for name, param in self.named_parameters():
            if not name.startswith(BASE_LAYER + "."):
                yield name, param

    @property
    def can_merge(self) -> bool:
        return False

    def unmerge(self) -> None:
        """Nothing to undo for an adapter that cannot merge."""

    def detach(self, model: nn.Module) -> None:
        """Take this (attached, not wrapping) adapter out of ``model``; layer wrappers are swapped for
        their ``base_layer`` by :func:`~lightning_peft.core.injection.remove_adapters` instead."""
        raise NotImplementedError(f"{type(self).__name__} does not know how to detach itself")

    # -- adapter state that is not trained ----------------------------------------------------------
    def adapter_named_buffers(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Persistent buffers that belong to the adapter (e.g. the initial factors an SVD-based LoRA
        init subtracts). They are part of the adapter's state: checkpoints must carry them."""
        persistent = set(self.state_dict(keep_vars=True))
        for name, buffer in self.named_buffers():
            if not name.startswith(BASE_LAYER + ".") and name in persistent:
                yield name, buffer

    # -- peft file format -------------------------------------------------------------------------
    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """This adapter's tensors under the key suffixes HF peft writes (no adapter name)."""
        raise NotImplementedError

    def load_peft_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors in peft's layout into this adapter; ``tensors`` has exactly the suffixes of
        :meth:`peft_state_dict` (the caller checks for missing and unexpected keys)."""
        raise NotImplementedError

    def peft_key(self, name: str, suffix: str) -> str:
        """The file key of the tensor ``suffix`` of this adapter, which sits at ``name`` in the model."""
        return f"{PEFT_KEY_PREFIX}{name}.{suffix}"


class AdapterLayer(AdapterModule):
    """A module that wraps ``base_layer`` and adds trainable adapter tensors beside it.

    Subclasses implement :meth:`forward`, :meth:`delta_weight` (for methods that can merge) and
    :meth:`peft_state_dict` / :meth:`load_peft_state_dict` (the peft file-format view of their tensors).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer

    # -- merging ----------------------------------------------------------------------------------
    @property
    def can_merge(self) -> bool:
        return True

    def merge(self) -> None:
        """Fold the adapter into ``base_layer.weight`` and, for methods that change it, ``base_layer.bias``
        (in float32, cast back to each tensor's dtype)."""
        if self.merged:
            return
        self._set_base_weight(self.merged_weight(self._base_weight_float()))
        self._set_base_bias(self.merged_bias)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        self._set_base_weight(self.unmerged_weight(self._base_weight_float()))
        self._set_base_bias(self.unmerged_bias)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """``W_merged - W`` in the base weight's layout, float32, for methods whose update is additive."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into its base layer")

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight that replaces ``weight`` (the unmerged base weight, float32, in the base's layout).

        Merging, the merged state dict and the export from original checkpoint weights all go through
        this one function, so a method whose merge is not additive (DoRA rescales rows by a norm of
        ``W`` itself) is merged the same way everywhere, against whichever ``W`` it is given.
        """
        return weight + self.delta_weight().to(weight.device)

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`merged_weight` for a layer that is currently merged."""
        return merged - self.delta_weight().to(merged.device)

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """The bias that replaces ``bias`` (the unmerged base bias, float32) when merging.

        Unchanged by default: LoRA and DoRA leave the bias alone. (IA)3's output scaling multiplies it,
        BitFit adds its change to it.
        """
        return bias

    def unmerged_bias(self, merged: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`merged_bias` for a layer that is currently merged."""
        return merged

    @property
    def adds_bias(self) -> bool:
        """Whether merging gives a bias-less base layer a bias (``merged_bias`` of zeros): inference-time
        intervention's constant shift. The merged model then needs its config to say so
        (:mod:`lightning_peft.core.bias_switch`)."""
        return False

    def merged_parameter(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """The merged value of the base layer's parameter ``name`` given its unmerged ``value`` (float32):
        what merged state dicts and exports use, so weight and bias merge the same way everywhere."""
        if name == "weight":
            return self.merged_weight(value)
        if name == "bias":
            return self.merged_bias(value)
        return value

    def unmerged_parameter(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`merged_parameter` for a layer that is currently merged."""
        if name == "weight":
            return self.unmerged_weight(value)
        if name == "bias":
            return self.unmerged_bias(value)
        return value

    def _base_weight_float(self) -> torch.Tensor:
        weight = self.base_layer.weight
        if is_kbit_weight(weight):
            # k-bit (bitsandbytes) weights hold packed codes: adding floats to them would corrupt them. Merging
            # needs a requantization, which merge_adapters(model, requantize=True) does on explicit request.
            raise ValueError(
                f"cannot add the adapter of {type(self).__name__} to its k-bit {type(self.base_layer).__name__} weight; "
                f"use merge_adapters(model, requantize=True) or export merged 16-bit weights with save_merged"
            )
        return weight.data.float()

    def _set_base_weight(self, value: torch.Tensor) -> None:
        self._set_base_tensor(self.base_layer.weight, value, "weight")

    def _set_base_bias(self, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
        bias = getattr(self.base_layer, "bias", None)
        if isinstance(bias, torch.Tensor):
            self._set_base_tensor(bias, change(bias.data.float()), "bias")

    def _set_base_tensor(self, tensor: torch.Tensor, value: torch.Tensor, what: str) -> None:
        if not torch.isfinite(value).all():
            # Refuse rather than silently poison the base model: a diverged adapter shows up here.
            raise ValueError(f"merging {type(self).__name__} would put non-finite values into the base {what}")
        tensor.data.copy_(value.to(device=tensor.device, dtype=tensor.dtype))

def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """All adapters of ``model`` (layer wrappers and attached modules) with their qualified names, spelled
    as in the state dict (without the segments FSDP1's wrappers insert, so files name the same modules)."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterModule):
            yield state_dict_name(name), module


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """All adapter layers of ``model`` with their qualified names (spelled as by :func:`adapter_modules`)."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield state_dict_name(name), module


def base_parameter_name(name: str) -> str:
    """The name a parameter had in the unwrapped base model (``a.q_proj.base_layer.weight`` -> ``a.q_proj.weight``)."""
    return name.replace("." + BASE_LAYER + ".", ".").removeprefix(BASE_LAYER + ".")

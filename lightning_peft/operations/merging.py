"""Merging adapters into the base weights, and switching them off.

Merging folds each adapter into its base weight (and bias, for methods that change it: (IA)3, BitFit),
so inference costs what the base model costs.
With ``unload=True`` (the default) the wrappers are removed as well and the model's state dict has
exactly the base model's keys: ready for ``save_pretrained``. With ``unload=False`` the wrappers stay,
merged, and :func:`unmerge_adapters` restores the separate adapters (e.g. to keep training).

A k-bit (bitsandbytes) base weight cannot absorb an update without being requantized, which re-rounds
the whole matrix (NF4: ~9% relative error). That happens only with ``requantize=True`` and is reported;
otherwise merging is an error that points to a 16-bit export from the original weights instead.

A merge that gives a bias-less layer a bias (inference-time intervention folds its shift into the attention
output projection's bias) must leave a model transformers can save and load: with ``unload=True`` and in
:func:`merged_state_dict` the config's bias switch is turned on and the other layers it covers get zero biases
(:mod:`lightning_peft.core.bias_switch`); an architecture without such a switch is refused before anything changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lightning_peft.core.adapter_layer import BASE_LAYER, AdapterLayer, AdapterModule, adapter_layers, adapter_modules
from lightning_peft.core.bias_switch import BiasSwitchPlan, bias_switch_plan
from lightning_peft.core.injection import remove_adapters
from lightning_peft.quantization.layers import dequantized_weight, is_quantized_linear
from lightning_peft.quantization.merge import QuantizedMergeError, requantize_merge


def _kbit_layers(layers: list[tuple[str, AdapterLayer]]) -> list[str]:
    return [name for name, layer in layers if is_quantized_linear(layer.base_layer)]


def _refuse_tied_weights(model: nn.Module, layers: list[tuple[str, AdapterLayer]]) -> None:
    """Raise if an adapted weight is shared with another module (tied input/output embeddings).

    GPT-2 (and every model with ``tie_word_embeddings``) uses one matrix for ``wte`` and ``lm_head``. The
    adapted model applies the embedding adapter to the lookup only; folding it into the shared matrix
    would change the output head as well, so the "merged" model would silently differ from the adapted
    one (HF peft's ``merge_and_unload`` does exactly that). No merged weights can represent it: refuse.
    """
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for name, layer in layers:
        weight = getattr(layer.base_layer, "weight", None)
        shared = [n for n in owners.get(id(weight), []) if not n.startswith(name + ".")]
        if shared:
            raise ValueError(
                f"cannot merge the adapter of {name!r}: its base weight is shared with {shared} (tied "
                f"embeddings), so merging would change those modules too. Untie the weights first (e.g. give "
                f"the output head its own copy) or keep the adapters unmerged."
            )


def check_mergeable(model: nn.Module) -> None:
    """Raise (naming the adapters) if ``model``'s adapters cannot be merged, e.g. before asking for a merged export."""
    _refuse_unmergeable(list(adapter_modules(model)))


def _refuse_unmergeable(layers: list[tuple[str, AdapterModule]]) -> None:
    """Raise if an adapter adds computation that no base weight can absorb (bottleneck adapters and
    Compacter add a small network after a layer; its non-linearity has no weight-space equivalent;
    prompt tuning and its relatives add virtual tokens to the input, LLaMA-Adapter an attention branch)."""
    cannot = [name for name, layer in layers if not layer.can_merge]
    if cannot:
        kinds = sorted({type(layer).__name__ for name, layer in layers if name in cannot})
        raise ValueError(
            f"adapters at {cannot[:3]} ({', '.join(kinds)}) cannot be merged into their base weights: they add modules "
            f"to the forward pass. Serve the base model with the adapters loaded (lightning_peft.load_adapter) instead"
        )


def merged_bias_plan(model: nn.Module) -> BiasSwitchPlan:
    """The config switch and zero biases a merged ``model`` needs for the biases its merge adds; raises for an
    architecture that cannot carry them (see the module docstring)."""
    return bias_switch_plan(model, [name for name, layer in adapter_layers(model) if layer.adds_bias and not layer.disabled])


def _switch_biases_on(model: nn.Module, plan: BiasSwitchPlan) -> None:
    """Give an unloaded, merged ``model`` the zero biases and the config flag of ``plan``."""
    for name in plan.zero_biases:
        layer = model.get_submodule(name)
        weight = layer.weight
        layer.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device), requires_grad=False)
    if plan.attribute is not None:
        setattr(model.config, plan.attribute, True)


def merge_adapters(model: nn.Module, unload: bool = True, requantize: bool = False) -> nn.Module:
    """Merge every adapter into its base weight; with ``unload`` also drop the wrappers. Returns ``model``.

    ``requantize=True`` allows merging into k-bit base weights (dequantize, add, quantize again) and
    warns with the relative error this introduces against the exact merged weights.
    """
    if not any(True for _ in adapter_modules(model)):
        raise ValueError(f"{type(model).__name__} has no adapters to merge")
    _refuse_unmergeable(list(adapter_modules(model)))
    layers = list(adapter_layers(model))
    pending = [(name, layer) for name, layer in layers if not layer.merged]
    kbit = _kbit_layers(pending)
    if kbit and not requantize:
        raise QuantizedMergeError(
            f"{len(kbit)} adapters sit on k-bit base weights (e.g. {kbit[0]!r}); merging into them means requantizing "
            f"the whole matrices (NF4: ~9% relative error). Export merged 16-bit weights with save_merged (made from "
            f"the original checkpoint), or pass requantize=True to merge into the k-bit weights anyway"
        )
    _refuse_tied_weights(model, pending)
    plan = merged_bias_plan(model) if unload else None  # a plain model must be savable: refuse before merging
    errors: dict[str, float] = {}
    for name, layer in pending:
        if name in kbit:
            errors[name] = requantize_merge(layer)
        else:
            layer.merge()
    if errors:
        from lightning.pytorch.utilities.rank_zero import rank_zero_warn

        worst = max(errors, key=errors.__getitem__)
        rank_zero_warn(
            f"merged {len(errors)} adapters into k-bit weights by requantizing; relative error of the merged weights "
            f"against the exact W + delta: mean {sum(errors.values()) / len(errors):.4%}, max {errors[worst]:.4%} ({worst})"
        )
    if not unload:
        return model
    remove_adapters(model)
    _switch_biases_on(model, plan)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapters` with ``unload=False``."""
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: ``with disable_adapters(model): base_logits = model(x).logits``.

    Merged adapters are unmerged for the duration and merged back afterwards, so the result is the
    base model in either state (what "LoRA Learns Less and Forgets Less" compares against).
    """
    layers = [adapter for _, adapter in adapter_modules(model)]
    was_merged = [layer.merged for layer in layers]
    # Restored to what it was, not to False: a nested use (a ForgettingMonitor measuring inside a run that
    # has the adapters off) must leave them off.
    was_disabled = [layer.disabled for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, merged, disabled in zip(layers, was_merged, was_disabled):
            layer.disabled = disabled
            if merged:
                layer.merge()


@torch.no_grad()
def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None, dequantize: bool = False) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter's delta added, without modifying ``model``.

    Keys are exactly the base model's (``.base_layer`` dropped, adapter tensors left out). Only the
    adapted weights are new tensors; the rest are the model's own, so this costs one copy of the
    targeted matrices, not of the model. ``dtype`` casts floating tensors (e.g. to bf16 for export).

    k-bit layers have no full-precision weight to add to. ``dequantize=True`` writes their dequantized
    weights (plus the deltas) instead: an approximation of the original model, not the original, so
    it is opt-in; ``save_merged`` re-reads the original weights from the checkpoint when it can.
    """
    _refuse_unmergeable(list(adapter_modules(model)))
    layers = dict(adapter_layers(model))
    _refuse_tied_weights(model, [(n, layer) for n, layer in layers.items() if not layer.merged and not layer.disabled])
    plan = merged_bias_plan(model)

    kbit = {name: module for name, module in model.named_modules() if is_quantized_linear(module)}
    if kbit and not dequantize:
        raise QuantizedMergeError(
            f"{type(model).__name__} has k-bit layers (e.g. {next(iter(kbit))!r}) whose original weights are not in "
            f"memory; use save_merged(model, path, source=<checkpoint dir>) to merge into the original weights, or "
            f"dequantize=True to merge into the dequantized weights"
        )
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        kbit_owner = next((m for m in kbit if name.startswith(m + ".")), None)
        if kbit_owner is not None:
            rest = name[len(kbit_owner) + 1 :]
            if rest not in ("weight", "bias"):
                continue  # quantization statistics (absmax, quant_map, SCB, ...): not part of a 16-bit model
            if rest == "weight":
                tensor = dequantized_weight(kbit[kbit_owner])  # float32; a requantized merge already holds its delta
                adapter = layers.get(kbit_owner.removesuffix("." + BASE_LAYER))
                if adapter is not None and not adapter.merged and not adapter.disabled:
                    tensor = adapter.merged_weight(tensor)
                tensor = tensor.to(dtype or torch.bfloat16)
        owner = next((layer_name for layer_name in layers if name.startswith(layer_name + ".")), None)
        if owner is not None:
            rest = name[len(owner) + 1 :]
            if not rest.startswith(BASE_LAYER + "."):
                continue  # an adapter tensor: folded into the weight below
            layer = layers[owner]
            merges = not layer.merged and not layer.disabled
            if rest == f"{BASE_LAYER}.weight" and merges and kbit_owner is None:
                tensor = layer.merged_weight(tensor.float()).to(tensor.dtype)
            elif rest == f"{BASE_LAYER}.bias" and merges:
                tensor = layer.merged_bias(tensor.float()).to(tensor.dtype)
            name = f"{owner}.{rest[len(BASE_LAYER) + 1:]}"
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor
    # Biases the merge adds (an unmerged layer's; a merged one holds its new bias already) and the zero biases
    # its architecture's config switch then expects on the layers it covers.
    for owner, layer in layers.items():
        if layer.adds_bias and not layer.merged and not layer.disabled:
            weight = state[f"{owner}.weight"]
            state[f"{owner}.bias"] = layer.merged_bias(torch.zeros((), device=weight.device)).to(weight.dtype)
    for name in plan.zero_biases:
        weight = state[f"{name}.weight"]
        state[f"{name}.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return state

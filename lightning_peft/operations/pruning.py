"""Pruning whole layers: Fan et al., 2019, "Reducing Transformer Depth on Demand with Structured Dropout"
(arXiv:1909.11556).

LayerDrop trains a transformer with whole layers dropped at random, so that afterwards any subset of its
layers is a working network without further training: depth becomes a choice made at inference time
("depth on demand"). :func:`prune_layers` makes that choice. It returns a shallower copy of a transformers
model that holds only the kept blocks, in their order, and is a model in its own right: ``save_pretrained``
and ``AutoModel*.from_pretrained`` give it back with identical outputs, ``generate(use_cache=True)`` works,
and adapters trained on it save and load like any others. A model trained without LayerDrop can be pruned
too, but loses far more quality per dropped layer; that robustness is what LayerDrop buys.

``keep="every_other"`` is the paper's "Every Other" strategy: drop every other layer, which is simple and
gives a balanced network. It keeps layers 0, 2, 4, ..., as the authors' fairseq example does
(``--decoder-layers-to-keep 0,2,4,...,14`` for a 16-layer model). Otherwise ``keep`` lists the layer
indices to keep, in increasing order.

What changes in the copy, and why each is needed:

- the block list (the outermost ``nn.ModuleList`` of same-class blocks, :func:`~lightning_peft.core.blocks.transformer_blocks`)
  holds only the kept blocks;
- ``config.num_hidden_layers`` (GPT-2: ``n_layer``, through the config's ``attribute_map``) is the new
  depth: transformers builds the model (and its key/value cache) from it when reloading;
- per-layer lists in the config (``layer_types``, ``mlp_layer_types``, ...: any list attribute whose name
  mentions layers and that has one entry per layer) keep the kept layers' entries, and lists of layer
  *numbers* (``mlp_only_layers``, ``moe_layers``, ...) are renumbered, so a reloaded model rebuilds each kept
  layer as it was (sliding or full attention, dense or sparse feed-forward);
- every ``layer_idx`` attribute in a kept block is its new position: attention modules use it to find their
  slot in the key/value cache, which has one slot per remaining layer;
- adapters in dropped blocks go with them, attached prefix-tuning states keep the kept layers' keys and
  values, and the remembered base fingerprint is taken again, so ``save_adapter`` writes only the kept
  layers' adapters under their new module paths and ``load_adapter`` loads them into a pruned fresh base.

Checks on the arguments and the input run before anything is copied; two checks need the pruned model and run
on the copy: that transformers rebuilds from the new config exactly the parameters the copy has (a config
field this module does not know, such as Qwen2-MoE's ``decoder_sparse_step``, would otherwise give a model
that does not reload), and that the adapters' method selects exactly the adapted modules again. A failed call
returns nothing and the input model is never changed. The copy is made with the dropped blocks left out, so
peak memory is the original plus the pruned model, not two full models.

``layer_idx`` is renumbered because a reloaded model numbers its layers from 0 anyway; the rare model whose
computation depends on it (GPT-2 with ``scale_attn_by_inverse_layer_idx=True``) then scales a kept layer
by its new depth, as its reload would.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from lightning_peft.core.adapter_layer import AdapterLayer, adapter_layers, adapter_modules, base_parameter_name
from lightning_peft.core.blocks import BlockDiscoveryError, transformer_blocks
from lightning_peft.core.fingerprint import FINGERPRINT_ATTRIBUTE, remember_base_fingerprint
from lightning_peft.core.injection import METHOD_ATTRIBUTE, check_modules_to_save, injected_method, set_submodule
from lightning_peft.core.sharding import is_sharded, state_dict_name
from lightning_peft.methods.composition import Composition
from lightning_peft.methods.layerdrop import LayerDrop, LayerDropController
from lightning_peft.methods.prefix_tuning import PrefixStates
from lightning_peft.methods.virtual_tokens import VirtualTokens

EVERY_OTHER = "every_other"
KeepSpec = Literal["every_other"] | Sequence[int]

#: Config attributes that hold layer *numbers* (not one entry per layer): renumbered to the new positions,
#: the dropped layers' numbers left out.
LAYER_INDEX_LISTS = ("mlp_only_layers", "moe_layers", "cross_attention_layers", "hybrid_layer_ids", "kv_source_layers")


def _block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the module of the model's one stack of blocks."""
    blocks = transformer_blocks(model)
    lists = list(dict.fromkeys(name.rpartition(".")[0] for name in blocks))
    if not lists:
        raise BlockDiscoveryError(
            f"found no transformer block list in {type(model).__name__}: prune_layers needs an nn.ModuleList of "
            f"blocks of one class (such as model.layers in Llama or transformer.h in GPT-2) to drop layers from"
        )
    if len(lists) > 1:
        # An encoder-decoder (T5's encoder.block and decoder.block) or a multi-tower model: which stack is
        # meant, and which config field counts it, cannot be told from the structure.
        raise BlockDiscoveryError(
            f"{type(model).__name__} has {len(lists)} block lists ({', '.join(repr(n) for n in lists)}); prune_layers "
            f"prunes a model with a single stack of layers"
        )
    return lists[0], model.get_submodule(lists[0])


def _layer_count_attribute(config: object) -> str:
    """The config attribute that really holds the depth: ``num_hidden_layers`` or what ``attribute_map`` maps it to."""
    return getattr(config, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")


def _check_config(model: nn.Module, count: int) -> None:
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None) if config is not None else None
    if not isinstance(layers, int):
        raise ValueError(  # noqa: TRY004 - a model prune_layers cannot prune, like the other refusals here
            f"{type(model).__name__} has no config.num_hidden_layers; prune_layers needs a transformers model whose config "
            f"gives its depth, so that the pruned model can be saved and reloaded"
        )
    if layers != count:
        # The forward pass of transformers models runs ``layers[: config.num_hidden_layers]``: a config that
        # disagrees with the list means the list is not the stack the config describes.
        raise ValueError(
            f"{type(model).__name__}'s config.num_hidden_layers is {layers} but its block list holds {count} blocks; "
            f"prune_layers cannot tell which config field describes the list"
        )


def _kept_indices(keep: object, count: int) -> list[int]:
    """The validated, increasing layer indices ``keep`` names for a model of ``count`` layers.

    Every bad ``keep`` is a ValueError, a wrong type included: to the caller it is one more bad value of the
    argument, and one exception type is what the callers (and the docs' table of bad inputs) expect.
    """
    if isinstance(keep, str):
        if keep == EVERY_OTHER:
            return list(range(0, count, 2))
        raise ValueError(
            f"keep={keep!r} is not a known choice; give {EVERY_OTHER!r} (keep layers 0, 2, 4, ... as Fan et al. do) or a "
            f"list of layer indices, e.g. keep=[0, 2]"
        )
    if not isinstance(keep, Sequence):
        # A set has no order and a bare int is ambiguous (one layer, or how many?): ask for the list.
        raise ValueError(f"keep={keep!r} is not {EVERY_OTHER!r} or a list of layer indices; give e.g. keep=[0, 2]")  # noqa: TRY004
    indices = list(keep)
    if not indices:
        raise ValueError(f"keep=[] keeps no layer; give at least one index from 0 to {count - 1} (the model has {count} layers)")
    for position, entry in enumerate(indices):
        if isinstance(entry, bool) or not isinstance(entry, numbers.Integral):
            raise ValueError(f"keep[{position}]={entry!r} is not an int; layer indices are ints from 0 to {count - 1}")  # noqa: TRY004
    indices = [int(entry) for entry in indices]
    for entry in indices:
        if not 0 <= entry < count:
            raise ValueError(
                f"layer index {entry} in keep={indices} is out of range: the model has {count} layers (indices 0 to "
                f"{count - 1}; negative indices are not accepted)"
            )
    duplicated = [entry for entry in dict.fromkeys(indices) if indices.count(entry) > 1]
    if duplicated:
        raise ValueError(
            f"layer index {duplicated[0]} appears {indices.count(duplicated[0])} times in keep={indices}; each layer can "
            f"be kept once (copying a layer would share or duplicate its weights, which is not pruning)"
        )
    if indices != sorted(indices):
        # fairseq sorts silently; refusing is clearer: each layer was trained on the output of the layers below it,
        # so a reordered stack is a different, untrained network rather than a pruned one.
        raise ValueError(
            f"keep={indices} is not in increasing order; layers cannot be reordered meaningfully (each was trained on "
            f"the output of the ones before it). Give keep={sorted(indices)}"
        )
    return indices


def _check_layer_indices(blocks: nn.ModuleList, kept: list[int]) -> None:
    """Refuse a kept block whose ``layer_idx`` is not its position: renumbering it would then be a guess."""
    for index in kept:
        for name, module in blocks[index].named_modules():
            value = vars(module).get("layer_idx")
            if isinstance(value, int) and not isinstance(value, bool) and value != index:
                raise ValueError(
                    f"block {index}'s {name or 'block'} has layer_idx={value}, not its position {index}; prune_layers "
                    f"renumbers layer_idx to the new positions and cannot tell what this one counts"
                )


def _check_adapters(model: nn.Module) -> None:
    if is_sharded(model):
        raise ValueError(
            f"{type(model).__name__} is sharded (FSDP or DeepSpeed ZeRO-3), so no rank holds whole layers to copy; "
            f"prune the model before sharding it"
        )
    unknown = {
        name: type(module).__name__
        for name, module in adapter_modules(model)
        if not isinstance(module, (AdapterLayer, VirtualTokens, LayerDropController))
    }
    if unknown:
        # Such a module may hold per-layer state or references to the blocks (a training-time controller that skips
        # layers, for one) that a copy without the dropped blocks would leave dangling.
        listed = ", ".join(f"{name} ({kind})" for name, kind in unknown.items())
        raise ValueError(
            f"{type(model).__name__} has modules attached beside its layers that prune_layers does not know how to prune: "
            f"{listed}. Remove them first, or prune the base model and apply the method to the pruned model"
        )


def _remove_layerdrop(pruned: nn.Module) -> None:
    """Take LayerDrop out of the pruned copy: it regularises training, and pruning is what it trained for (the pruned
    model is the "depth on demand" one). Its controller refers to blocks by position, some of them dropped; the
    copy's stored method becomes the other methods, so ``save_adapter`` and ``load_adapter`` see only those."""
    controller = getattr(pruned, "lightning_peft_layerdrop", None)
    if not isinstance(controller, LayerDropController):
        return
    object.__setattr__(controller, "_blocks", [block for block in controller._blocks if block is not None])  # dropped: None
    controller.detach(pruned)
    method = injected_method(pruned)
    rest = [m for m in method.methods if not isinstance(m, LayerDrop)] if isinstance(method, Composition) else []
    if rest:
        object.__setattr__(pruned, METHOD_ATTRIBUTE, rest[0] if len(rest) == 1 else Composition(rest))
    elif hasattr(pruned, METHOD_ATTRIBUTE):
        object.__delattr__(pruned, METHOD_ATTRIBUTE)  # LayerDrop alone: a fully fine-tuned model, no adapters left


def _rebuild_config(config: object, kept: list[int], count: int) -> None:
    """Set the depth and the per-layer fields of ``config`` (the copy's) to the kept layers."""
    position = {old: new for new, old in enumerate(kept)}
    for name, value in config.to_dict().items():
        if not isinstance(value, (list, tuple)) or "layer" not in name:
            continue
        if name in LAYER_INDEX_LISTS:
            # Numbers of layers: keep the kept layers' numbers, at their new positions.
            setattr(config, name, type(value)(position[i] for i in value if i in position))
        elif len(value) == count:
            setattr(config, name, type(value)(value[i] for i in kept))
    setattr(config, _layer_count_attribute(config), len(kept))


def _prune_prefix(states: PrefixStates, kept: list[int]) -> None:
    """Keep the kept layers' keys and values of a prefix (layer ``l``'s key is chunk ``2l``, its value ``2l + 1``)."""
    geometry = states.geometry
    chunks = torch.tensor([chunk for layer in kept for chunk in (2 * layer, 2 * layer + 1)])

    def select(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        # The prefix dimension is (2 * layers * kv_dim) wide, each layer's key then value: pick whole chunks.
        shape = list(tensor.shape)
        split = tensor.reshape(*shape[:dim], 2 * geometry.num_layers, geometry.kv_dim, *shape[dim + 1 :])
        picked = split.index_select(dim, chunks.to(tensor.device))
        return picked.reshape(*shape[:dim], len(chunks) * geometry.kv_dim, *shape[dim + 1 :])

    with torch.no_grad():
        if states.reparameterization is None:
            states.embedding = nn.Parameter(select(states.embedding.data, 1), requires_grad=states.embedding.requires_grad)
        else:
            # The reparameterisation MLP's last linear layer makes every layer's prefix: keep the rows of the kept layers.
            last = states.reparameterization[-1]
            last.weight = nn.Parameter(select(last.weight.data, 0), requires_grad=last.weight.requires_grad)
            last.bias = nn.Parameter(select(last.bias.data, 0), requires_grad=last.bias.requires_grad)
            last.out_features = last.weight.shape[0]
    states.geometry = dataclasses.replace(geometry, num_layers=len(kept))


def _check_prefix(model: nn.Module) -> None:
    for name, module in adapter_modules(model):
        if isinstance(module, PrefixStates) and module.reparameterization is not None:
            last = module.reparameterization[-1] if isinstance(module.reparameterization, nn.Sequential) else None
            if not isinstance(last, nn.Linear) or last.out_features != module.geometry.num_layers * 2 * module.geometry.kv_dim:
                raise ValueError(
                    f"the prefix at {name!r} is made by a reparameterisation network whose output is not a linear layer "
                    f"of the prefix's width; prune_layers cannot drop layers from it"
                )


def _check_rebuilds(pruned: nn.Module) -> None:
    """Make sure transformers builds, from the pruned config, exactly the base parameters the pruned model has.

    ``from_pretrained`` builds the model from its config and then fills it in, so a layer the config would
    build differently (a dense feed-forward where a sparse one was kept) would not reload. Built on the meta
    device: names and shapes only, no memory.
    """
    if not isinstance(pruned, PreTrainedModel):
        return
    try:
        with torch.device("meta"):
            rebuilt = type(pruned)(copy.deepcopy(pruned.config))
    except Exception as error:  # any failure means the pruned config does not describe a model
        raise ValueError(f"transformers cannot build {type(pruned).__name__} from the pruned config: {error}") from error
    adapter_ids = {id(p) for _, adapter in adapter_modules(pruned) for _, p in adapter.adapter_named_parameters()}
    have = {base_parameter_name(state_dict_name(name)): param for name, param in pruned.named_parameters() if id(param) not in adapter_ids}
    built = dict(rebuilt.named_parameters())
    problems = [f"the config builds {name}, which the kept layers lack" for name in sorted(set(built) - set(have))]
    problems += [f"the kept layers hold {name}, which the config does not build" for name in sorted(set(have) - set(built))]
    problems += [
        f"the config builds {name} as {list(built[name].shape)}, the kept layers hold {list(have[name].shape)}"
        for name in sorted(set(built) & set(have))
        # A k-bit weight is stored packed: only its name can be compared.
        if have[name].is_floating_point() and getattr(have[name], "quant_state", None) is None and built[name].shape != have[name].shape
    ]
    if problems:
        raise ValueError(
            f"the pruned {type(pruned).__name__} would not reload: transformers builds different parameters from the pruned "
            f"config than the kept layers have ({'; '.join(problems[:3])}). A config field that depends on layer positions "
            f"(e.g. decoder_sparse_step) does not fit the kept layers; keep other layers"
        )


def _check_method_reselects(pruned: nn.Module) -> None:
    """Make sure the method would put its adapters exactly where the pruned model has them, in a pruned fresh base.

    ``load_adapter`` re-applies the stored method to the base it is given, so a method whose targets name
    layers (``target_modules=["layers.3.self_attn.q_proj"]``, LLaMA-Adapter's top ``adapter_layers``) would
    select other modules, or none, after renumbering, and the saved file would not load back.
    """
    method = injected_method(pruned)
    if method is None:
        return
    layers = dict(adapter_layers(pruned))
    outermost = {name: layer for name, layer in layers.items() if not any(name.startswith(other + ".") for other in layers)}
    for name, layer in outermost.items():  # a pruned fresh base, seen through the copy: wrappers out for the check
        set_submodule(pruned, name, layer.base_layer)
    try:
        selected = method.find_targets(pruned)
        check_modules_to_save(pruned, method)
    except ValueError as error:
        raise ValueError(
            f"after pruning, {method!r} no longer fits the model it was applied to ({error}); prune the base model first "
            f"and apply the method to the pruned model"
        ) from error
    finally:
        for name, layer in outermost.items():
            set_submodule(pruned, name, layer)
    if sorted(selected) != sorted(layers):
        missing = sorted(set(layers) - set(selected))[:3]
        extra = sorted(set(selected) - set(layers))[:3]
        raise ValueError(
            f"after pruning, {method!r} would select other modules than the adapters left in the model (adapted but not "
            f"selected: {missing}; selected but not adapted: {extra}), so save_adapter's file would not load into a pruned "
            f"base; prune the base model first and apply the method to the pruned model"
        )


def prune_layers(model: nn.Module, keep: KeepSpec = EVERY_OTHER) -> nn.Module:
    """A copy of ``model`` with only the layers ``keep`` names (LayerDrop's pruning at inference, Fan et al., 2019).

    Args:
        model: a transformers model with one stack of blocks (Llama, GPT-2, BERT, ...), with or without
            lightning_peft adapters. It is left unchanged.
        keep: ``"every_other"`` (the paper's strategy: layers 0, 2, 4, ...) or the indices of the layers to
            keep, in increasing order, each once (reordering layers is refused: it is not pruning).

    Returns:
        The pruned copy; its config, ``layer_idx`` attributes, adapters and base fingerprint describe the kept
        layers (see the module docstring).

    Raises:
        ValueError: for a ``keep`` that is empty, out of range, repeated, unsorted, not ints or an unknown string,
            and for a model without a single block list (:class:`~lightning_peft.core.blocks.BlockDiscoveryError`)
            or whose adapters would not fit the pruned model. Nothing is changed then.
    """
    list_name, blocks = _block_list(model)
    count = len(blocks)
    _check_config(model, count)
    kept = _kept_indices(keep, count)
    _check_layer_indices(blocks, kept)
    _check_adapters(model)
    _check_prefix(model)

    # Deep-copy with the dropped blocks standing for None: they are never copied, only left out below.
    dropped = sorted(set(range(count)) - set(kept))
    memo: dict[int, object] = {id(blocks[index]): None for index in dropped}
    pruned = copy.deepcopy(model, memo)
    pruned_blocks = pruned.get_submodule(list_name)
    for index in reversed(dropped):  # from the top, so the indices still to delete stay where they are
        del pruned_blocks[index]

    _remove_layerdrop(pruned)
    _rebuild_config(pruned.config, kept, count)
    for position, block in enumerate(pruned_blocks):
        for module in block.modules():
            value = vars(module).get("layer_idx")
            if isinstance(value, int) and not isinstance(value, bool):
                module.layer_idx = position
    for _, module in adapter_modules(pruned):
        if isinstance(module, PrefixStates):
            _prune_prefix(module, kept)
        elif isinstance(module, VirtualTokens):
            module.geometry = dataclasses.replace(module.geometry, num_layers=len(kept))

    _check_rebuilds(pruned)
    _check_method_reselects(pruned)
    if FINGERPRINT_ATTRIBUTE in vars(pruned):
        # Taken at injection for the full model: it would name the dropped layers' weights and the kept ones by
        # their old paths, and a later sharded save would write that into the adapter file.
        remember_base_fingerprint(pruned)
    return pruned

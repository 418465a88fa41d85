"""Where each sub-layer of a transformer block writes back into the residual stream.

Bottleneck adapters (Houlsby et al., 2019, arXiv:1902.00751) go "directly on the output of the
sub-layer, after it has been projected back to the input size, but before adding the skip
connection". That point is the output of the sub-layer's last projection to the hidden size: BERT's
``attention.output.dense`` and ``output.dense``, Llama's ``self_attn.o_proj`` and ``mlp.down_proj``,
GPT-2's ``attn.c_proj`` and ``mlp.c_proj``. Wrapping that projection puts the adapter in the right
place for both block layouts::

    post-LN (BERT):        h = LN(x + adapter(sublayer(x)))
    pre-LN (Llama, GPT-2): h = x + adapter(sublayer(LN(x)))

It is found from the module structure, not from class or attribute names, so it works for any
architecture built the usual way:

1. the blocks are an ``nn.ModuleList`` of modules of one class (lists nested inside a block, such as
   a mixture of experts, are not blocks);
2. a block's sub-layers are its direct children that contain linear layers (a child ``ModuleList``
   contributes its items, as in T5; linear layers that sit directly in the block form one sub-layer);
3. a sub-layer's residual writer is its last registered linear layer whose output has the hidden
   size (attention registers its input projections before its output projection).

A sub-layer whose output is not one projection's output (a mixture of experts: a list of expert
modules, or expert weights held as raw tensors) cannot be placed.

Where this finds nothing, or meets something it cannot place (a mixture-of-experts feed-forward,
whose output is a weighted sum of experts), :class:`BlockDiscoveryError` says how to name the
modules instead.
"""

from __future__ import annotations

from torch import nn

from lightning_peft.core.targets import linear_types

_NAMING_HINT = (
    "Name the modules whose outputs are added back to the residual stream with target_modules, e.g. "
    "target_modules=['attention.output.dense', 'output.dense'] for BERT, ['o_proj', 'down_proj'] for Llama "
    "or ['attn.c_proj', 'mlp.c_proj'] for GPT-2"
)


class BlockDiscoveryError(ValueError):
    """The transformer blocks or their residual writers could not be found in a model."""


def output_features(module: nn.Module) -> int:
    """Output width of a linear layer (``nn.Linear``, GPT-2 ``Conv1D``, bitsandbytes linears)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.weight.shape[1]  # Conv1D stores W as (in, out)
    return module.out_features


def hidden_size(model: nn.Module) -> int:
    """The width of the residual stream: ``config.hidden_size``, else the input embeddings' width."""
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(size, int):
        return size
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if isinstance(embeddings, nn.Embedding):
        return embeddings.embedding_dim
    raise BlockDiscoveryError(
        f"cannot tell the hidden size of {type(model).__name__}: it has no config.hidden_size and no input "
        f"embeddings. {_NAMING_HINT}"
    )


def _is_block_list(module: nn.Module) -> bool:
    items = list(module.children()) if isinstance(module, nn.ModuleList) else []
    return bool(items) and len({type(item) for item in items}) == 1


def transformer_blocks(model: nn.Module) -> list[str]:
    """Qualified names of the blocks: items of ``ModuleList``s of one class, outermost lists only."""
    lists = [name for name, module in model.named_modules() if _is_block_list(module)]
    outermost = [name for name in lists if not any(other != name and name.startswith(other + ".") for other in lists)]
    return [f"{name}.{index}" if name else str(index) for name in outermost for index in range(len(model.get_submodule(name)))]


def _sublayers(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """(relative name, module) of the block's sub-layers, in registration order; ``""`` is the block's
    own direct linear layers."""
    linear = linear_types()
    result: list[tuple[str, nn.Module]] = []
    if any(isinstance(child, linear) for child in block.children()):
        result.append(("", block))
    for name, child in block.named_children():
        if isinstance(child, linear):
            continue
        if isinstance(child, nn.ModuleList):
            result += [(f"{name}.{i}", item) for i, item in enumerate(child)]
        else:
            result.append((name, child))
    return result


def _residual_writer(sublayer: nn.Module, direct_only: bool, width: int) -> str | None:
    linear = linear_types()
    modules = sublayer.named_children() if direct_only else sublayer.named_modules()
    writers = [name for name, module in modules if isinstance(module, linear) and output_features(module) == width]
    return writers[-1] if writers else None


def _parallel_parts(sublayer: nn.Module) -> str | None:
    """What makes a sub-layer's output something other than one projection's output, if anything:
    a list of parallel modules, or weight matrices used outside linear layers (fused experts)."""
    lists = [name for name, module in sublayer.named_modules() if name and _is_block_list(module)]
    if lists:
        return f"a list of parallel modules ({lists[0]})"
    owned = {id(p) for m in sublayer.modules() if isinstance(m, (*linear_types(), nn.Embedding)) for p in m.parameters()}
    raw = [name for name, p in sublayer.named_parameters() if p.dim() >= 2 and id(p) not in owned]
    return f"weight matrices outside linear layers ({raw[0]})" if raw else None


def residual_writers(model: nn.Module) -> list[list[str]]:
    """Per block, the qualified names of its sub-layers' residual writers in forward order
    (attention first, feed-forward last). Raises :class:`BlockDiscoveryError` when there are none."""
    width = hidden_size(model)
    found: list[list[str]] = []
    for block_name in transformer_blocks(model):
        block = model.get_submodule(block_name)
        writers: list[str] = []
        for relative, sublayer in _sublayers(block):
            parallel = _parallel_parts(sublayer) if relative else None
            if parallel is not None:
                # E.g. a mixture of experts: its output is a weighted sum, not one projection's output, and
                # skipping it silently would put a "feed-forward" adapter after the attention instead.
                raise BlockDiscoveryError(
                    f"{block_name}.{relative} holds {parallel}, e.g. a mixture of experts, so there is no single "
                    f"projection to put an adapter after. {_NAMING_HINT}"
                )
            writer = _residual_writer(sublayer, direct_only=relative == "", width=width)
            if writer is None:
                continue
            prefix = f"{block_name}.{relative}" if relative else block_name
            writers.append(f"{prefix}.{writer}")
        if writers:
            found.append(writers)
    if not found:
        raise BlockDiscoveryError(
            f"found no transformer blocks in {type(model).__name__}: no nn.ModuleList of same-class blocks whose "
            f"sub-layers end in a linear layer of the hidden size ({width}). {_NAMING_HINT}"
        )
    return found

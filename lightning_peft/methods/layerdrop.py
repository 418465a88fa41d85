"""LayerDrop: Fan, Grave and Joulin, 2019, "Reducing Transformer Depth on Demand with Structured Dropout"
(arXiv:1909.11556).

During training each transformer layer is skipped with probability ``p``: the layer is the identity on the
residual stream for that step, and costs no compute. Unlike stochastic depth, the kept layers are not rescaled,
and evaluation always runs every layer (the paper's "no pruning" inference). A network trained this way is robust
to having layers removed afterwards: :func:`lightning_peft.operations.pruning.prune_layers` keeps a subset (the
paper prunes every other layer) for a shallower model, "depth on demand".

LayerDrop trains no tensor of its own. It composes with any other method (``PEFTCallback([LoRA(...),
LayerDrop(p=0.1)])``: the LoRA layers inside a skipped block simply get no gradient that step) and, used alone,
with full fine-tuning: ``PEFTCallback(LayerDrop(p=0.1))`` freezes nothing.

Which layers a step skips is drawn from ``(seed, global_step, batch index)``, not from the global random
generator, because:

- every data-parallel rank skips the same layers (each rank derives the same draw), so DDP reduces the same
  parameters everywhere (with ``find_unused_parameters``, which ``PEFTCallback`` turns on: a skipped layer's
  parameters take no part in that step's backward);
- a resumed run skips exactly what the uninterrupted run would have (the step and batch index are restored by
  Lightning), and dropout elsewhere draws the same masks as without LayerDrop;
- the decision is taken once per model forward, outside any gradient-checkpointed function, so the recomputation
  in the backward pass makes the same choice.

Outside a ``PEFTCallback`` (a plain training loop), the draw advances with each training forward instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lightning_peft.core.adapter_layer import AdapterModule
from lightning_peft.core.blocks import transformer_blocks
from lightning_peft.methods.base import PEFTMethod

ATTRIBUTE = "lightning_peft_layerdrop"


class LayerDrop(PEFTMethod):
    """LayerDrop config: ``PEFTCallback([LoRA(r=8), LayerDrop(p=0.2)])``.

    Args:
        p: the probability that a layer is skipped at a training step, in [0, 1). The paper uses 0.2 (about 0.5
            when the network will be pruned to a much shallower one).
        layers: indices of the layers that may be skipped (in each block list of the model); ``None`` for all.
        seed: seeds the draws (combined with the global step and the batch index).

    Example::

        >>> LayerDrop(p=0.2).exported() is None  # nothing to export: the weights are the other methods'
        True
    """

    name = "layerdrop"
    has_peft_format = False
    freezes_base = False  # alone it regularises a full fine-tune; composed, the other methods freeze the base
    changes_graph_per_step = True
    supported_description = "transformer blocks (an nn.ModuleList of one block class)"

    def __init__(self, p: float = 0.1, layers: list[int] | None = None, seed: int = 0) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0.0 <= p < 1.0:
            raise ValueError(f"LayerDrop p must be a probability in [0, 1) (p=1 would skip every layer), got p={p!r}")
        if layers is not None:
            if not isinstance(layers, (list, tuple)) or not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise ValueError(f"LayerDrop layers must be a non-empty list of layer indices or None (all layers), got layers={layers!r}")
            layers = list(layers)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"LayerDrop seed must be an integer, got seed={seed!r}")
        self.p = float(p)
        self.layers = layers
        self.seed = seed

    def supports(self, module: nn.Module) -> bool:
        return False  # wraps no layer

    def find_targets(self, model: nn.Module) -> list[str]:
        return []

    def exported(self) -> PEFTMethod | None:
        return None

    def attach(self, model: nn.Module) -> list[str]:
        blocks = self._blocks(model)
        if hasattr(model, ATTRIBUTE):
            raise ValueError(f"{type(model).__name__} already has LayerDrop attached ({ATTRIBUTE}); compose one LayerDrop")
        LayerDropController(self, blocks).attach(model)
        return [ATTRIBUTE]

    def _blocks(self, model: nn.Module) -> list[nn.Module]:
        """The droppable blocks: ``layers`` (or all) of each block list, checked before the model changes."""
        chosen: list[nn.Module] = []
        block_lists = dict.fromkeys(name.rpartition(".")[0] for name in transformer_blocks(model))  # in order
        if not block_lists:
            raise ValueError(f"LayerDrop found no transformer blocks in {type(model).__name__} (an nn.ModuleList of one block class)")
        for list_name in block_lists:
            items = list(model.get_submodule(list_name))
            indices = range(len(items)) if self.layers is None else self.layers
            bad = [i for i in indices if not 0 <= i < len(items)]
            if bad:
                raise ValueError(
                    f"LayerDrop layers={self.layers!r}: index {bad[0]} is out of range; {list_name} of {type(model).__name__} "
                    f"has {len(items)} layers (indices 0 to {len(items) - 1})"
                )
            chosen += [items[i] for i in indices]
        return chosen

    def before_training_batch(self, model: nn.Module, global_step: int, batch_idx: int) -> None:
        controller = getattr(model, ATTRIBUTE, None)
        if isinstance(controller, LayerDropController):
            controller.draw_key = (global_step, batch_idx)


class LayerDropController(AdapterModule):
    """Attached to the model as ``lightning_peft_layerdrop``: draws the skipped layers at each training forward
    and makes each chosen block return its input unchanged when skipped. No parameters, no buffers: nothing of
    it is in checkpoints or files (the draw is a function of the step, which Lightning restores)."""

    def __init__(self, method: LayerDrop, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.p = method.p
        self.seed = method.seed
        #: Set before each training batch by ``PEFTCallback`` (via :meth:`LayerDrop.before_training_batch`); a
        #: forward without a new key (a plain loop) uses the next value of ``forwards`` instead.
        self.draw_key: tuple[int, int] | None = None
        self.forwards = 0
        self.skipped: frozenset[int] = frozenset()  # positions in ``blocks`` skipped by the current forward
        # Plain attributes, not submodules: the blocks already belong to the model.
        object.__setattr__(self, "_blocks", blocks)
        self._hook: Any = None

    @property
    def can_merge(self) -> bool:
        return True  # nothing to merge: a merged or exported model is the other methods' (or the full fine-tune's)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {}  # no tensors: an adapter file of a composition holds the other methods' only

    def load_peft_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Nothing to load."""

    def attach(self, model: nn.Module) -> None:
        model.add_module(ATTRIBUTE, self)
        for position, block in enumerate(self._blocks):
            block.forward = SkippableForward(block, self, position)  # on the instance: the class and state dict stay
        self._hook = model.register_forward_pre_hook(self._before_model_forward)

    def detach(self, model: nn.Module) -> None:
        for block in self._blocks:
            if isinstance(vars(block).get("forward"), SkippableForward):
                del block.forward
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        delattr(model, ATTRIBUTE)

    def _before_model_forward(self, model: nn.Module, args: Any) -> None:
        # Decided here, once per model forward and outside any checkpointed block: a block's recomputation in the
        # backward pass (gradient checkpointing) reads the same decision.
        if not self.training or self.disabled or self.p == 0.0:
            self.skipped = frozenset()
            return
        key = self.draw_key if self.draw_key is not None else (-1, self.forwards)
        self.draw_key = None
        self.forwards += 1
        self.skipped = frozenset(skipped_positions(len(self._blocks), self.p, self.seed, *key))


def skipped_positions(count: int, p: float, seed: int, step: int, batch: int) -> list[int]:
    """The block positions a training forward skips: ``count`` Bernoulli(``p``) draws from a generator seeded by
    ``(seed, step, batch)`` alone, so every rank and every resumed run draws the same.

    One block always runs: a draw that skips them all keeps the one whose draw came closest to keeping it. A step
    through no block at all would leave adapters inside the blocks nothing to learn from (the loss would not
    depend on them, and backward fails), and is not a network the paper's pruning would ever produce.
    """
    generator = torch.Generator().manual_seed(hash((seed, step, batch)) & 0x7FFF_FFFF_FFFF_FFFF)
    draws = torch.rand(count, generator=generator)
    skipped = [i for i in range(count) if draws[i] < p]
    if count and len(skipped) == count:
        skipped.remove(int(draws.argmax()))
    return skipped


class SkippableForward:
    """A block's ``forward`` that returns the residual stream unchanged when the controller skips the block.

    A class rather than a closure, so a model with LayerDrop still deep-copies and pickles."""

    def __init__(self, block: nn.Module, controller: LayerDropController, position: int) -> None:
        self.original = type(block).forward.__get__(block)
        self.controller = controller
        self.position = position
        self.output_arity: int | None = None  # 0: the block returns a tensor; n: a tuple of n

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.position not in self.controller.skipped:
            output = self.original(*args, **kwargs)
            self.output_arity = len(output) if isinstance(output, tuple) else 0
            return output
        if self.output_arity is None:
            self.output_arity = self._probe_output_arity(args, kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        # The block's own output structure: transformers 5 blocks return the hidden states, older ones a tuple
        # (hidden states, attention weights, ...) whose other entries are None when not asked for.
        return hidden if self.output_arity == 0 else (hidden,) + (None,) * (self.output_arity - 1)

    def _probe_output_arity(self, args: tuple, kwargs: dict[str, Any]) -> int:
        """Run the block once, without gradient and in eval mode, to learn its output structure: needed when its
        first call in this process is a skip (a resumed run). Eval mode draws no dropout mask, so the random
        generators, and with them a resumed run's masks, are exactly what they would have been."""
        modes = [(module, module.training) for module in self.original.__self__.modules()]
        self.original.__self__.eval()
        try:
            with torch.no_grad():
                output = self.original(*args, **kwargs)
        finally:
            for module, training in modes:
                module.training = training
        return len(output) if isinstance(output, tuple) else 0

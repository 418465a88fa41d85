"""What prompt tuning, P-tuning and prefix tuning share: virtual tokens fed in around the model's forward.

These methods change no layer. They give the model ``P`` extra positions in front of every input:
learned input embeddings (prompt tuning, P-tuning) or learned per-layer keys and values (prefix
tuning). Their parameters live in one :class:`VirtualTokens` module attached to the model as
``model.prompt_encoder``, so freezing, counting, adapter-only checkpoints and ``disable_adapters`` treat
them like any adapter. A forward pre-hook and a forward hook on the model rewrite each call, so the
user's ordinary ``model(input_ids=..., attention_mask=..., labels=...)`` and ``model.generate()`` work:

==================  ========================================================================
argument            what the hooks do on a call that starts a sequence (no cache, or an empty one)
==================  ========================================================================
attention_mask      ``P`` ones in front: every real token attends to the virtual ones
position_ids        shifted by ``P``: real tokens sit at positions ``P..P+T-1`` (if given; ``cache_position`` too)
inputs              prompt: ``[prompt; embed(input_ids)]``; prefix: the cache holds the prefix
labels              prompt: ``P`` ignored labels in front, and the first real token's label ignored
token_type_ids      prompt: ``P`` zeros in front
logits, hidden      prompt: the ``P`` virtual positions are cut off again, so outputs align with inputs
==================  ========================================================================

A call that continues a sequence (a non-empty cache, as in every ``generate()`` step after the first)
finds the virtual tokens in the cache already: it only gets the mask and position changes.

Why the first real token's label is ignored: the base model's loss never scores it (nothing comes
before it), and a loss that suddenly scored it from the virtual tokens would average over a different
set of tokens than the base model and the token counts the tasks weight validation by. So the loss
keeps its meaning: the same targets, each predicted with the virtual tokens in its context. (HF peft
scores that token too; its logits are the same as ours.)
"""

from __future__ import annotations

import abc
import inspect
from typing import Any, get_args

import torch
from torch import nn

from lightning_peft.core.adapter_layer import AdapterModule
from lightning_peft.core.linear_cross_entropy import IGNORE_INDEX
from lightning_peft.core.model_geometry import ModelGeometry, model_geometry
from lightning_peft.core.transformers_compat import CACHE_POSITION_ARGUMENTS, cache_length, call_cache
from lightning_peft.methods.base import PEFTMethod

#: The attribute of the model that holds the virtual tokens (HF peft's name for the same module).
ATTRIBUTE = "prompt_encoder"


def check_positive(what: str, value: Any, example: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer (e.g. {example}), got {what}={value!r}")


def check_choice(value: Any, literal: Any, what: str) -> None:
    if value not in get_args(literal):
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(repr(c) for c in get_args(literal))}")


def _bind(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name (``model(ids)`` and ``model(input_ids=ids)`` alike)."""
    if not args:
        return dict(kwargs)
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    extra = next((name for name, p in inspect.signature(model.forward).parameters.items() if p.kind is p.VAR_KEYWORD), None)
    call = {k: v for k, v in bound.items() if k != extra}
    call.update(bound.get(extra, {}) if extra else {})
    return call


def _prepend(tensor: torch.Tensor, value: int, count: int) -> torch.Tensor:
    """``count`` columns of ``value`` in front of a (batch, length) tensor."""
    return torch.cat([tensor.new_full((tensor.shape[0], count), value), tensor], dim=1)


class VirtualTokens(AdapterModule):
    """Owns the parameters of ``num_virtual_tokens`` virtual tokens and feeds them into the model.

    The virtual tokens' values are ``embedding`` (one row per virtual token), or what a
    ``reparameterization`` network makes of it during training (P-tuning's prompt encoder, prefix
    tuning's MLP). Adapter files hold the values themselves, so the network is folded away on export.
    Subclasses say where the values go in a call that starts a sequence (:meth:`start_sequence`).
    """

    #: Whether the virtual tokens are extra input positions (prompt, P-tuning), rather than cache entries (prefix).
    adds_positions = True

    def __init__(self, embedding: torch.Tensor, geometry: ModelGeometry, reparameterization: nn.Module | None = None) -> None:
        super().__init__()
        self.num_virtual_tokens = embedding.shape[0]
        self.geometry = geometry
        self.embedding = nn.Parameter(embedding.to(torch.float32))  # (P, width)
        self.reparameterization = reparameterization
        # One entry per call in flight: (positions the forward hook cuts off the outputs, the sequence
        # length it cuts them from). Outputs of another length (``logits_to_keep``) are left alone.
        self._prepended: list[tuple[int, int]] = []
        self._hooks: list[Any] = []

    # -- attaching ----------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        if hasattr(model, ATTRIBUTE):
            raise ValueError(
                f"{type(model).__name__} already has an attribute {ATTRIBUTE!r}; the virtual tokens need that name"
            )
        model.add_module(ATTRIBUTE, self)
        self._hooks = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
        ]

    def detach(self, model: nn.Module) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        delattr(model, ATTRIBUTE)

    # -- the forward hooks --------------------------------------------------------------------------
    def _before_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        if self.disabled:
            self._prepended.append((0, 0))
            return None
        call = _bind(model, args, kwargs)
        tokens = call.get("inputs_embeds") if call.get("inputs_embeds") is not None else call.get("input_ids")
        if tokens is None:
            raise ValueError(f"{type(self).__name__} needs input_ids or inputs_embeds in the model call")
        batch, length = tokens.shape[:2]
        past = cache_length(call_cache(call))
        fresh = past == 0
        added = self.num_virtual_tokens if fresh else 0
        self._check_context(past + added + length, length)
        self._extend_common(call, fresh)
        if fresh:
            self.start_sequence(model, call, batch, length)
        self._prepended.append((added, added + length) if self.adds_positions else (0, 0))
        return (), call

    def _after_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        cut, total = self._prepended.pop() if self._prepended else (0, 0)
        if cut == 0:
            return output

        def strip(value: Any) -> Any:
            return value[:, cut:] if isinstance(value, torch.Tensor) and value.dim() == 3 and value.shape[1] == total else value

        for key in ("logits", "hidden_states"):
            value = output.get(key) if hasattr(output, "get") else None
            if value is not None:
                output[key] = tuple(strip(h) for h in value) if isinstance(value, tuple) else strip(value)
        return output

    def _check_context(self, positions: int, length: int) -> None:
        limit = self.geometry.max_positions
        if limit is not None and positions > limit:
            raise ValueError(
                f"an input of {length} tokens needs {positions} positions with num_virtual_tokens={self.num_virtual_tokens} "
                f"(and any cached tokens), more than the model's context of {limit} (max_position_embeddings); "
                f"give at most {limit - self.num_virtual_tokens} tokens in all, or use fewer virtual tokens"
            )

    def _extend_common(self, call: dict[str, Any], fresh: bool) -> None:
        """Mask and positions: the same whether the virtual tokens are added now or already cached."""
        mask = call.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise ValueError(
                    f"{type(self).__name__} needs a 2D attention_mask (batch, tokens) to extend over the virtual "
                    f"tokens; got {getattr(mask, 'shape', type(mask).__name__)}"
                )
            call["attention_mask"] = _prepend(mask, 1, self.num_virtual_tokens)
        # Token positions (batch, tokens) and, where the caller passes it, the cache slots they fill (tokens,):
        # generate() in transformers before 5 passes ``cache_position`` counted without the virtual tokens.
        for key in ("position_ids", *CACHE_POSITION_ARGUMENTS):
            positions = call.get(key)
            if positions is None:
                continue
            shifted = positions + self.num_virtual_tokens
            if fresh and self.adds_positions:  # the virtual tokens themselves take positions 0..P-1
                virtual = torch.arange(self.num_virtual_tokens, device=positions.device, dtype=positions.dtype)
                shifted = torch.cat([virtual.expand(*positions.shape[:-1], -1), shifted], dim=-1)
            call[key] = shifted

    def start_sequence(self, model: nn.Module, call: dict[str, Any], batch: int, length: int) -> None:
        """Put the virtual tokens into a call that starts a sequence."""
        raise NotImplementedError

    def values(self) -> torch.Tensor:
        """The virtual tokens' values, (P, width)."""
        return self.embedding if self.reparameterization is None else self.reparameterization(self.embedding)

    # -- peft file format: the values themselves (a reparameterisation is folded away) ---------------
    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.values().detach()}

    @torch.no_grad()
    def load_peft_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.reparameterization is not None:
            raise ValueError(
                "an adapter file holds the virtual tokens a reparameterisation network produced, not the network: load "
                "it into a model without adapters (load_adapter then injects the folded form, which needs no network)"
            )
        self.embedding.copy_(tensors["prompt_embeddings"].to(self.embedding.dtype))

    def peft_key(self, name: str, suffix: str) -> str:
        # peft keeps prompt-learning tensors at the top of the file, under no module path.
        return suffix

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}"


def prepend_to_labels(labels: torch.Tensor | None, count: int, length: int) -> torch.Tensor | None:
    """Token labels with ``count`` ignored positions in front and the first real one ignored (module
    docstring); sequence-level labels (classification) are returned as they are."""
    if labels is None or labels.dim() != 2 or labels.shape[1] != length:
        return labels
    extended = _prepend(labels, IGNORE_INDEX, count)
    extended[:, count] = IGNORE_INDEX
    return extended


class VirtualTokenMethod(PEFTMethod):
    """Base config of the methods that add ``num_virtual_tokens`` virtual tokens (no layer targets)."""

    supported_description = "transformers models with input embeddings"
    #: HF peft's ``peft_type`` for this method's files.
    peft_type: str
    composes_inputs = True  # the virtual tokens take the model's first input positions (or its attention cache)

    def __init__(self, num_virtual_tokens: int, modules_to_save: list[str] | None = None) -> None:
        super().__init__(modules_to_save=modules_to_save)
        check_positive("num_virtual_tokens", num_virtual_tokens, 20)
        self.num_virtual_tokens = num_virtual_tokens

    def supports(self, module: nn.Module) -> bool:
        return False

    def find_targets(self, model: nn.Module) -> list[str]:
        return []  # no layer is wrapped: the virtual tokens are attached beside the model

    def attach(self, model: nn.Module) -> list[str]:
        geometry = model_geometry(model)
        if geometry.max_positions is not None and self.num_virtual_tokens >= geometry.max_positions:
            raise ValueError(
                f"num_virtual_tokens={self.num_virtual_tokens} fills the model's whole context of {geometry.max_positions} "
                f"positions (max_position_embeddings), leaving no room for input; use at most {geometry.max_positions - 1}, "
                f"in practice far fewer (e.g. 20)"
            )
        self.build(model, geometry).attach(model)
        return [ATTRIBUTE]

    @abc.abstractmethod
    def build(self, model: nn.Module, geometry: ModelGeometry) -> VirtualTokens:
        """The module holding this method's virtual tokens, initialised (the model is there to read)."""
        raise NotImplementedError

    def peft_config(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        geometry = model_geometry(model)
        return {
            "peft_type": self.peft_type,
            "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": geometry.hidden_size,
            "num_attention_heads": geometry.num_heads,
            "num_layers": geometry.num_layers,
            "num_transformer_submodules": 1,  # decoder-only or encoder-only: one stack gets the tokens
        }

"""Prefix tuning: Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"
(arXiv:2101.00190).

Every attention layer ``l`` gets ``P`` learned key and value vectors in front of the real tokens' own::

    attention_l(x) = softmax(q [K_l^prefix; K_l(x)]^T / sqrt(d)) [V_l^prefix; V_l(x)]

They are exactly what a key/value cache holds for ``P`` earlier tokens, so they are fed in as one: each
call that starts a sequence gets a fresh ``transformers.DynamicCache`` (or the caller's empty one) filled
with the prefixes, and the attention mask gains ``P`` ones; real tokens then sit at positions
``P..P+T-1``, as they would after ``P`` cached tokens. The cache is rebuilt on every such call because
the model appends to it. ``generate()`` works unchanged: its later steps find the prefix in the cache.

Shapes: per layer and per token a key and a value of ``num_key_value_heads x head_dim`` (with grouped-
query attention fewer heads than the queries have), so the prefix is (P, layers x 2 x kv_dim) in all.

Reparameterisation (section 4.3: optimising the prefix directly is unstable): with ``projection=True``
the prefix is ``MLP(E)``, the MLP Linear-Tanh-Linear and ``E`` a (P, kv_dim) matrix: one layer's
key width, HF peft's choice (the paper only asks for a smaller matrix than the prefix); only during
training. The adapter file holds the prefix itself (the MLP folded away): HF peft's format,
``peft_type: "PREFIX_TUNING"``, tensor ``prompt_embeddings`` (P, layers x 2 x kv_dim), in the layout peft
reads (layer ``l``'s key is chunk ``2l``, its value chunk ``2l + 1``). vLLM does not serve prefixes.

Initialisation: ``"random"`` (standard normal, like an ``nn.Embedding``, what HF peft does) or ``"vocab"``:
the model's own keys and values for ``P`` tokens drawn from the vocabulary, the "activations of real
words" Li & Liang found to train much better than random values (section 7.2). ``"vocab"`` needs
``projection=False`` (an MLP's output cannot be set to chosen values).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import nn

from lightning_peft.core.model_geometry import ModelGeometry, model_geometry
from lightning_peft.core.transformers_compat import (
    cache_argument,
    cache_layer_states,
    call_cache,
    new_dynamic_cache,
    output_cache,
    set_call_cache,
)
from lightning_peft.methods.virtual_tokens import VirtualTokenMethod, VirtualTokens, check_choice, check_positive

PrefixInit = Literal["random", "vocab"]


class PrefixStates(VirtualTokens):
    """The per-layer key/value prefixes, (P, layers x 2 x kv_dim) in peft's layout, optionally produced by the
    reparameterisation MLP from a (P, kv_dim) ``embedding``."""

    adds_positions = False  # the prefix lives in the cache; the outputs keep the input's length

    def start_sequence(self, model: nn.Module, call: dict[str, Any], batch: int, length: int) -> None:
        g = self.geometry
        reference = call.get("inputs_embeds") if call.get("inputs_embeds") is not None else model.get_input_embeddings().weight
        states = self.values().to(device=reference.device, dtype=reference.dtype)
        states = states.view(self.num_virtual_tokens, 2 * g.num_layers, g.num_kv_heads, g.head_dim)
        states = states.permute(1, 2, 0, 3)  # (2 * layers, kv_heads, P, head_dim)
        cache = call_cache(call)
        if cache is None:
            cache = new_dynamic_cache(model.config)
        for layer in range(g.num_layers):
            keys, values = states[2 * layer], states[2 * layer + 1]
            cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer)
        set_call_cache(model, call, cache)


class PrefixTuning(VirtualTokenMethod):
    """Prefix tuning config: ``PEFTCallback(PrefixTuning(num_virtual_tokens=20, projection=True))``.

    Args:
        num_virtual_tokens: the prefix length ``P`` (Li & Liang: 10 for table-to-text, 200 for summarisation).
        projection: train the prefix through the reparameterisation MLP (folded away on export).
        projection_hidden_size: the MLP's hidden width; default: one layer's key width (kv_dim), as in peft.
        init: ``"random"`` or ``"vocab"`` (the model's keys and values of sampled tokens; ``projection=False``).
        modules_to_save: modules trained in full (e.g. ``["classifier"]``).

    Example::

        >>> PrefixTuning(num_virtual_tokens=10, projection=True).exported()
        PrefixTuning(num_virtual_tokens=10, projection=False, projection_hidden_size=None, init='random', modules_to_save=[])
    """

    name = "prefix_tuning"
    peft_type = "PREFIX_TUNING"

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        projection: bool = False,
        projection_hidden_size: Optional[int] = None,
        init: PrefixInit = "random",
        modules_to_save: Optional[list[str]] = None,
    ) -> None:
        super().__init__(num_virtual_tokens, modules_to_save)
        check_choice(init, PrefixInit, "prefix init")
        if projection_hidden_size is not None:
            check_positive("projection_hidden_size", projection_hidden_size, 512)
        if init == "vocab" and projection:
            raise ValueError("init='vocab' sets the prefix to real keys and values, which projection=True cannot: use one or the other")
        self.projection = projection
        self.projection_hidden_size = projection_hidden_size
        self.init = init

    def build(self, model: nn.Module, geometry: ModelGeometry) -> VirtualTokens:
        if cache_argument(model) is None or getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise ValueError(
                f"prefix tuning feeds its prefixes in as the key/value cache, and {type(model).__name__} takes no "
                f"key/value cache argument (or is an encoder-decoder, which this implementation does not cover); use "
                f"PromptTuning or PTuning, which prepend input embeddings instead"
            )
        device = model.get_input_embeddings().weight.device
        width = geometry.num_layers * 2 * geometry.kv_dim
        if not self.projection:
            start = self._vocab_prefix(model, geometry) if self.init == "vocab" else torch.randn(self.num_virtual_tokens, width)
            return PrefixStates(start.to(device), geometry)
        hidden = self.projection_hidden_size or geometry.kv_dim
        mlp = nn.Sequential(nn.Linear(geometry.kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        return PrefixStates(torch.randn(self.num_virtual_tokens, geometry.kv_dim, device=device), geometry, mlp.to(device))

    def _vocab_prefix(self, model: nn.Module, geometry: ModelGeometry) -> torch.Tensor:
        """The frozen model's own keys and values for ``P`` sampled tokens, in the prefix layout."""
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (1, self.num_virtual_tokens), device=model.get_input_embeddings().weight.device)
        with torch.no_grad():
            cache = output_cache(model(input_ids=ids, use_cache=True))
        per_layer = [tensor for layer in range(geometry.num_layers) for tensor in cache_layer_states(cache, layer)]
        states = torch.cat(per_layer)  # (2 * layers, kv_heads, P, head_dim)
        return states.permute(2, 0, 1, 3).reshape(self.num_virtual_tokens, -1).float()

    def peft_config(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        geometry = model_geometry(model)
        return {
            **super().peft_config(model, targets),
            # peft's convention for grouped-query attention: the prefix's "token" is one layer's key (or value).
            "token_dim": geometry.kv_dim,
            "num_attention_heads": geometry.num_kv_heads,
            "encoder_hidden_size": self.projection_hidden_size or geometry.kv_dim,
            "prefix_projection": self.projection,
        }

    def exported(self) -> PrefixTuning:
        return PrefixTuning(self.num_virtual_tokens, modules_to_save=self.modules_to_save or None)

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> PrefixTuning:
        """A peft file holds the prefix itself, whether or not it was trained through a projection."""
        return cls(config["num_virtual_tokens"], modules_to_save=config.get("modules_to_save"))

"""The shape of a transformer, read from its config: what virtual tokens and prefixes must match.

Prompt tuning needs the width of the input embeddings, prefix tuning the number of layers that keep a
key/value cache and the key/value heads' count and width (grouped-query attention has fewer key/value
heads than query heads), and both need the model's context length to refuse inputs that would not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelGeometry:
    hidden_size: int  # width of the input embeddings
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (fewer than num_heads with grouped-query attention)
    head_dim: int
    max_positions: int | None  # the model's context length; None when the config does not say

    @property
    def kv_dim(self) -> int:
        """Width of one layer's keys (or values): what a prefix holds per layer and per token."""
        return self.num_kv_heads * self.head_dim


def input_embeddings(model: nn.Module) -> nn.Embedding:
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, nn.Embedding):
        raise ValueError(
            f"{type(model).__name__} exposes no input embedding layer (get_input_embeddings()); virtual tokens need one "
            f"to be fed in beside the token embeddings. Use a transformers model"
        )
    return embeddings


def model_geometry(model: nn.Module) -> ModelGeometry:
    """The model's sizes from ``model.config`` (transformers' common names; GPT-2's map onto them)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no config; virtual-token methods need a transformers model")
    hidden = input_embeddings(model).embedding_dim
    heads = getattr(config, "num_attention_heads", None)
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(heads, int) or not isinstance(layers, int):
        raise ValueError(f"{type(model).__name__}'s config names no num_attention_heads / num_hidden_layers")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", hidden) // heads
    return ModelGeometry(hidden, layers, heads, kv_heads, head_dim, getattr(config, "max_position_embeddings", None))

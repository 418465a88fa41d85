"""Every place where lightning_peft depends on how the installed transformers spells something.

transformers renames arguments and attributes between releases (5.24 renamed the key/value cache
argument ``past_key_values`` to ``cache``; 5.0 renamed gradient checkpointing to activation
checkpointing), keeping the old spelling for a while behind deprecation warnings or dropping it. Code
that names one spelling works on some releases and silently or loudly fails on others, so each such
question is answered here, once, by probing the object in hand (a signature, a dataclass field, a
method) rather than by comparing version strings: a probe stays right for releases we have not seen,
in either direction. Every probe has a test on the oldest and the newest supported transformers
(tests/test_transformers_compat.py).

Nothing else in the package may name ``past_key_values``/``cache``, the checkpointing methods, or the
attention modules' call convention (``position_embeddings``, ``apply_rotary_pos_emb``).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Callable

import torch
from torch import nn

#: The names a model's ``forward`` has taken its key/value cache under, newest first.
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")
#: Arguments holding the cache slots a call's tokens fill, (tokens,): transformers 4.x's ``generate()``
#: passes ``cache_position``; 5.x derives the slots from the cache itself and has no such argument.
CACHE_POSITION_ARGUMENTS = ("cache_position",)


def _forward_parameters(module: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):  # a C-implemented or oddly wrapped forward: nothing to read
        return {}


def cache_argument(model: nn.Module) -> str | None:
    """The keyword under which ``model.forward`` takes a key/value cache (``"cache"`` since transformers
    5.24, ``"past_key_values"`` before), or ``None`` for a model that takes none.

    A task head that does not name the cache but passes ``**kwargs`` on to its backbone
    (``model.base_model``) takes it under the backbone's name; a head without ``**kwargs`` takes only what it
    names (``BertForSequenceClassification`` in transformers 4.x refuses a cache its ``BertModel`` accepts).
    """
    parameters = _forward_parameters(model)
    for name in CACHE_ARGUMENT_NAMES:
        if name in parameters:
            return name
    backbone = getattr(model, "base_model", model)
    passes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if backbone is not model and passes_kwargs:
        return cache_argument(backbone)
    return None


def call_cache(call: dict[str, Any]) -> Any:
    """The cache in a model call's keyword arguments, under whichever name the caller used (``generate()``
    passes the model's own name; a user may still pass the deprecated one, which transformers renames)."""
    for name in CACHE_ARGUMENT_NAMES:
        if call.get(name) is not None:
            return call[name]
    return None


def set_call_cache(model: nn.Module, call: dict[str, Any], cache: Any) -> None:
    """Put ``cache`` into a model call's keyword arguments under the name ``model`` takes, removing any other
    spelling (transformers refuses a call that gives both)."""
    name = cache_argument(model)
    if name is None:
        raise ValueError(f"{type(model).__name__} takes no key/value cache argument (none of {', '.join(CACHE_ARGUMENT_NAMES)})")
    for other in CACHE_ARGUMENT_NAMES:
        call.pop(other, None)
    call[name] = cache


def output_cache(output: Any) -> Any:
    """The key/value cache a model returned: the ``cache`` entry of its output (transformers >= 5.24) or
    ``past_key_values`` (before). A ``ModelOutput``'s keys are its fields that are set, so looking there
    does not trigger the newer releases' deprecation warning for the old name."""
    for name in CACHE_ARGUMENT_NAMES:
        if name in output.keys():
            return output[name]
    return None


def new_dynamic_cache(config: Any) -> Any:
    """An empty ``transformers.DynamicCache`` for a model with ``config``. Releases that know the model's
    layer types (sliding-window layers) take the config; older ones take none."""
    from transformers import DynamicCache  # transformers is imported by whoever built the model already

    if "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=config)
    return DynamicCache()


def cache_layer_states(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (keys, values) a cache holds for decoder ``layer``, each (batch, kv_heads, tokens, head_dim):
    per-layer objects (``cache.layers[l].keys``) in current releases, parallel lists (``cache.key_cache``)
    in older ones."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[layer].keys, layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def cache_length(cache: Any) -> int:
    """Tokens already in a key/value cache (0 for none)."""
    if cache is None:
        return 0
    if not hasattr(cache, "get_seq_length"):
        raise TypeError(
            f"the key/value cache of type {type(cache).__name__} is not a transformers Cache; pass a "
            f"transformers.DynamicCache (the tuple format was removed from transformers)"
        )
    return int(cache.get_seq_length())


# -- gradient (activation) checkpointing ------------------------------------------------------------
# transformers 5 renamed gradient_checkpointing_enable/disable and is_gradient_checkpointing to
# activation_checkpointing_*; the old names warn there, and the new ones do not exist before.


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether transformers' gradient (activation) checkpointing is on for ``model``."""
    if isinstance(getattr(type(model), "is_activation_checkpointing", None), property):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def enable_checkpointing(model: nn.Module, use_reentrant: bool) -> None:
    """Turn on transformers' gradient checkpointing with torch's ``use_reentrant`` choice."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_checkpointing(model: nn.Module) -> None:
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


# -- attention modules (LLaMA-Adapter computes a second attention beside the layer's own) ------------
# Rotary models (Llama, Mistral, Qwen) have received their RoPE tables as ``position_embeddings=(cos,
# sin)`` since transformers 4.48, and define ``apply_rotary_pos_emb`` next to the attention class; the
# attention returns ``(attn_output, attn_weights)``. Each is read off the module, not assumed.


def rotary_function(attention: nn.Module) -> Callable[..., Any] | None:
    """The ``apply_rotary_pos_emb(q, k, cos, sin)`` of the module defining ``attention``'s class, or None."""
    return getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)


def attention_rotary_tables(call: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``(cos, sin)`` tables an attention call was given (``call``: its bound arguments), or None."""
    return call.get("position_embeddings")


def split_attention_output(output: Any) -> tuple[torch.Tensor, tuple[Any, ...]]:
    """``(attn_output, the rest)`` of what an attention module returned (a tuple, or the tensor alone)."""
    if isinstance(output, torch.Tensor):
        return output, ()
    first, *rest = output
    return first, tuple(rest)


# -- saved tokenizers -------------------------------------------------------------------------------
# transformers 5 saves a fast tokenizer with ``"tokenizer_class": "TokenizersBackend"``, a class 4.x does
# not have ("Tokenizer class TokenizersBackend does not exist"); both read "PreTrainedTokenizerFast" to the
# same tokenizer. Folders we write for others to load (the offline assets) use the name both know.
PORTABLE_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def make_tokenizer_config_portable(folder: Any) -> bool:
    """Rewrite ``folder/tokenizer_config.json``'s class name to one every supported release reads.

    Returns whether it changed anything; a folder without the file, or with a portable name, is left alone.
    """
    import json
    from pathlib import Path

    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text(encoding="utf-8"))
    portable = PORTABLE_TOKENIZER_CLASSES.get(config.get("tokenizer_class"))
    if portable is None:
        return False
    config["tokenizer_class"] = portable
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    temporary.replace(path)  # atomic: a reader sees the old file or the new one
    return True

"""Choosing which modules of a model get an adapter.

``target_modules`` takes the three forms users know from HF peft:

- a list of names, each matching a module whose qualified name equals it or ends with ``"." + name``
  (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``);
- a single string, used as a regular expression that must match the *whole* qualified name;
- ``"all-linear"``: every linear layer (``nn.Linear``, GPT-2 ``Conv1D``, bitsandbytes k-bit linears)
  except the output head, which maps to the vocabulary or the labels and is better trained in full.

When omitted, per-architecture defaults apply (:data:`DEFAULT_TARGETS`). ``exclude_modules`` takes the
same list/regex forms and removes matches. An entry that matches nothing is an error that lists the
names that could have been meant: a silent no-op here is how adapters end up never trained.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import nn

from lightning_peft.core.adapter_layer import AdapterLayer
from lightning_peft.core.kbit_layers import kbit_linear_types

ALL_LINEAR = "all-linear"

# Defaults follow the LoRA/QLoRA practice of adapting attention and MLP projections.
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
}

TargetSpec = str | Sequence[str] | None


def linear_types() -> tuple[type, ...]:
    """Module types that count as linear layers, including optional backends when installed."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D, *kbit_linear_types())


def output_head_names(model: nn.Module) -> set[str]:
    """Qualified names of the output head(s): the output embeddings and common classifier heads."""
    names: set[str] = set()
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
        if name.split(".")[-1] in {"lm_head", "classifier", "score", "qa_outputs"}:
            names.add(name)
    return names


def name_matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def matches(name: str, spec: str | Sequence[str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name_matches(name, key) for key in spec)


def exact_names_pattern(names: Sequence[str]) -> str:
    """A ``target_modules`` regex that selects exactly the qualified ``names`` (a full match, as peft does)."""
    return "^(?:" + "|".join(re.escape(name) for name in names) + ")$"


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    raise ValueError(
        f"target_modules was not given and there is no default for model type {model_type!r} "
        f"(defaults exist for: {', '.join(sorted(DEFAULT_TARGETS))}). Pass target_modules as a list of "
        f"module names, a regex, or 'all-linear'."
    )


def _candidate_summary(names: Sequence[str], modules: dict[str, nn.Module], supports: Callable[[nn.Module], bool], limit: int = 25) -> str:
    """Leaf names of the modules the method could wrap (containers like ``self_attn`` are no help)."""
    leaves = sorted({name.split(".")[-1] for name in names if name and supports(modules[name])})
    shown = ", ".join(leaves[:limit])
    return shown + (f", ... ({len(leaves) - limit} more)" if len(leaves) > limit else "")


def find_targets(
    model: nn.Module,
    target_modules: TargetSpec,
    exclude_modules: TargetSpec = None,
    supports: Callable[[nn.Module], bool] = lambda module: isinstance(module, linear_types()),
    method_name: str = "adapter",
    supported_description: str = "nn.Linear",
) -> list[str]:
    """Qualified names of the modules to wrap, in model order.

    ``supports`` says which module types the method can wrap. A module named explicitly (list entry or
    regex) of an unsupported type is an error; ``"all-linear"`` silently selects only linear layers.
    """
    spec = default_targets(model) if target_modules is None else target_modules
    if isinstance(spec, str) and spec != ALL_LINEAR:
        try:
            re.compile(spec)
        except re.error as err:
            raise ValueError(f"target_modules={spec!r} is not a valid regular expression: {err}") from err

    # Modules already wrapped (or inside a wrapper) are not candidates: this keeps injection idempotent
    # and stops a regex from matching ``q_proj.base_layer``.
    wrapped_prefixes = [name + "." for name, m in model.named_modules() if isinstance(m, AdapterLayer)]
    all_names = [
        name
        for name, module in model.named_modules()
        if name and not any(name.startswith(p) for p in wrapped_prefixes)
    ]
    modules = dict(model.named_modules())

    if spec == ALL_LINEAR:
        heads = output_head_names(model)
        linear = linear_types()
        selected = [n for n in all_names if isinstance(modules[n], linear) and n not in heads and supports(modules[n])]
        if not selected:
            raise ValueError(f"target_modules='all-linear' found no linear layer in {type(model).__name__}")
    else:
        selected = [n for n in all_names if matches(n, spec)]
        if not isinstance(spec, str):
            unmatched = [key for key in spec if not any(name_matches(n, key) for n in all_names)]
            if unmatched:
                raise ValueError(
                    f"target_modules entries {unmatched} matched no module of {type(model).__name__}. "
                    f"Module names that could be targets: {_candidate_summary(all_names, modules, supports)}"
                )
        elif not selected:
            raise ValueError(
                f"target_modules regex {spec!r} matched no module of {type(model).__name__} (it must match the "
                f"whole qualified name, e.g. 'model.layers.0.self_attn.q_proj'). Module names that could be "
                f"targets: {_candidate_summary(all_names, modules, supports)}"
            )
        unsupported = [n for n in selected if not supports(modules[n])]
        if unsupported:
            # A suffix like "self_attn" also matches a container; say what can be wrapped instead.
            kinds = sorted({type(modules[n]).__name__ for n in unsupported})
            raise ValueError(
                f"{method_name} cannot wrap {unsupported[:5]}{' ...' if len(unsupported) > 5 else ''} of type "
                f"{', '.join(kinds)}; it supports {supported_description}. Name the layers inside instead "
                f"(candidates: {_candidate_summary(all_names, modules, supports)})."
            )

    if exclude_modules:
        excluded = [n for n in selected if matches(n, exclude_modules)]
        if not excluded:
            raise ValueError(f"exclude_modules={exclude_modules!r} matched none of the {len(selected)} selected targets")
        selected = [n for n in selected if n not in excluded]
        if not selected:
            raise ValueError(f"exclude_modules={exclude_modules!r} removed every target; nothing is left to adapt")
    return selected

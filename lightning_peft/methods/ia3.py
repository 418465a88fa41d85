"""(IA)3: Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning" (arXiv:2205.05638).

"Infused Adapter by Inhibiting and Amplifying Inner Activations": learned vectors rescale activations
elementwise. On attention targets (keys, values) the vector scales the layer's output; on feed-forward
targets it scales the layer's input, which is the FFN's hidden activation::

    attention:    y = (W x + b) * l            l: (out,)
    feed-forward: y = W (x * l) + b            l: (in,)

Every ``l`` starts at ones, so the model is exactly unchanged at step 0. Both forms are linear in
``W``, so merging is exact: the output form scales the rows of ``W`` and the bias, the input form the
columns of ``W`` (GPT-2's ``Conv1D`` stores ``W`` transposed: the roles of rows and columns swap).

Default targets per architecture are the paper's keys, values and feed-forward down projection, the
same choices as HF peft's, so files written by either load in the other
(``adapter_config.json`` with ``peft_type: "IA3"``, tensors ``<module>.ia3_l`` of shape (out, 1) or
(1, in)).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_peft.core.adapter_layer import AdapterLayer, adapter_modules, is_kbit_weight
from lightning_peft.core.targets import TargetSpec, matches, name_matches
from lightning_peft.methods.base import PEFTMethod, require_peft_targets

# model_type -> (targets, the feed-forward ones among them).
IA3_DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    # "output.dense" also matches attention.output.dense: both projections back to the hidden size get
    # input scaling (peft does the same).
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
}


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


class IA3(PEFTMethod):
    """(IA)3 config: ``PEFTCallback(IA3())`` (per-architecture defaults) or with explicit targets.

    Args:
        target_modules: modules to scale; ``None`` for the per-architecture defaults (:data:`IA3_DEFAULTS`).
        feedforward_modules: which targets scale their input (the rest scale their output): names or a
            full-name regex; ``None`` for the architecture's default. Every entry must match a target.
        exclude_modules: names or regex removed from the targets.
        modules_to_save: modules trained in full (e.g. ``["classifier"]``).

    Example::

        >>> IA3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]).is_feedforward("model.layers.0.mlp.down_proj")
        True
    """

    name = "ia3"
    peft_type = "IA3"
    supported_description = "nn.Linear and transformers Conv1D"

    def __init__(
        self,
        target_modules: TargetSpec = None,
        feedforward_modules: TargetSpec = None,
        exclude_modules: TargetSpec = None,
        modules_to_save: Sequence[str] | None = None,
    ) -> None:
        super().__init__(target_modules, exclude_modules, modules_to_save)
        self.feedforward_modules = list(feedforward_modules) if isinstance(feedforward_modules, (list, tuple)) else feedforward_modules
        if isinstance(self.feedforward_modules, str):
            try:
                re.compile(self.feedforward_modules)
            except re.error as err:
                raise ValueError(f"feedforward_modules={feedforward_modules!r} is not a valid regular expression: {err}") from err

    def supports(self, module: nn.Module) -> bool:
        from transformers.pytorch_utils import Conv1D

        # Float weights only: merging into a k-bit weight would mean requantizing it.
        return isinstance(module, (nn.Linear, Conv1D)) and not is_kbit_weight(module.weight)

    def is_feedforward(self, name: str, spec: TargetSpec = None) -> bool:
        spec = self.feedforward_modules if spec is None else spec
        return bool(spec) and matches(name, spec)

    # -- targets ------------------------------------------------------------------------------------
    def _defaults(self, model: nn.Module) -> tuple[list[str], list[str]]:
        model_type = _model_type(model)
        if model_type not in IA3_DEFAULTS:
            raise ValueError(
                f"IA3 has no default targets for model type {model_type!r} (defaults exist for: "
                f"{', '.join(sorted(IA3_DEFAULTS))}). Pass target_modules (e.g. the key and value projections and the "
                f"feed-forward output projection) and feedforward_modules (which of them scale their input; [] for none)"
            )
        return IA3_DEFAULTS[model_type]

    def _feedforward_spec(self, model: nn.Module) -> TargetSpec:
        if self.feedforward_modules is not None:
            return self.feedforward_modules
        return self._defaults(model)[1]

    def find_targets(self, model: nn.Module) -> list[str]:
        spec = self.target_modules if self.target_modules is not None else self._defaults(model)[0]
        targets = self.select_targets(model, spec)
        feedforward = self._feedforward_spec(model)
        if isinstance(feedforward, list):
            stray = [key for key in feedforward if not any(name_matches(t, key) for t in targets)]
            if stray:
                raise ValueError(f"feedforward_modules entries {stray} match none of the IA3 targets; each must name a target")
        return targets

    def wrap(self, name: str, module: nn.Module) -> IA3Layer:
        """One layer, with ``feedforward_modules`` as given (the architecture's default needs the model:
        :meth:`wrap_targets`)."""
        return IA3Layer(module, feedforward=self.is_feedforward(name))

    def wrap_targets(self, model: nn.Module, targets: list[str]) -> dict[str, AdapterLayer]:
        feedforward = self._feedforward_spec(model)  # the architecture's default when not given
        return {name: IA3Layer(model.get_submodule(name), feedforward=self.is_feedforward(name, feedforward)) for name in targets}

    # -- HF peft adapter_config.json ------------------------------------------------------------------
    def peft_config(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        from transformers.pytorch_utils import Conv1D

        modules = dict(adapter_modules(model))  # the names ``targets`` uses (state-dict spelling)
        layers = {t: modules[t] for t in targets}
        feedforward = [t for t, layer in layers.items() if isinstance(layer, IA3Layer) and layer.feedforward]
        return {
            "peft_type": "IA3",
            "feedforward_modules": _peft_feedforward_field(targets, feedforward),
            # peft transposes the vector for Conv1D weights when this is set; it must match the targets' layout.
            "fan_in_fan_out": any(isinstance(getattr(layer, "base_layer", layer), Conv1D) for layer in layers.values()),
            "init_ia3_weights": True,
        }

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> IA3:
        require_peft_targets(config)
        feedforward = config.get("feedforward_modules") or []
        if isinstance(feedforward, (list, tuple)):
            # peft tests feed-forward names with a bare str.endswith (no "." boundary), unlike target names:
            # as a regex that rule is reproduced exactly, so "proj" still matches "down_proj" here.
            feedforward = f".*(?:{'|'.join(re.escape(key) for key in feedforward)})" if feedforward else []
        return cls(
            target_modules=config.get("target_modules"),
            feedforward_modules=feedforward,
            exclude_modules=config.get("exclude_modules"),
            modules_to_save=config.get("modules_to_save"),
        )


def _peft_feedforward_field(targets: list[str], feedforward: list[str]) -> list[str]:
    """Leaf names when peft's ``endswith`` rule picks exactly ``feedforward`` among ``targets``, else full names."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in feedforward})
    if sorted(t for t in targets if any(t.endswith(leaf) for leaf in leaves)) == sorted(feedforward):
        return leaves
    return sorted(feedforward)


class IA3Layer(AdapterLayer):
    """``base_layer`` with a learned float32 scale on its output (attention) or input (feed-forward)."""

    def __init__(self, base_layer: nn.Module, feedforward: bool) -> None:
        super().__init__(base_layer)
        from transformers.pytorch_utils import Conv1D

        self.feedforward = feedforward
        self.transposed = isinstance(base_layer, Conv1D)  # W stored (in, out)
        out_features, in_features = base_layer.weight.shape[::-1] if self.transposed else base_layer.weight.shape
        size = in_features if feedforward else out_features
        self.ia3_l = nn.Parameter(torch.ones(size, dtype=torch.float32, device=base_layer.weight.device))  # (in,) or (out,)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x, *args, **kwargs)
        if self.feedforward:
            return self.base_layer((x.to(torch.float32) * self.ia3_l).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result.to(torch.float32) * self.ia3_l).to(result.dtype)

    def _weight_scale(self) -> torch.Tensor:
        """``l`` shaped to broadcast over the stored weight: rows of (out, in) for output scaling, columns
        for input scaling; the other way round for Conv1D's (in, out)."""
        along_rows = self.feedforward == self.transposed  # which axis of the stored weight l runs along
        return self.ia3_l[:, None] if along_rows else self.ia3_l[None, :]

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self._weight_scale().to(weight.device)

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        self._check_invertible()
        return merged / self._weight_scale().to(merged.device)

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.feedforward else bias * self.ia3_l.to(bias.device)

    def unmerged_bias(self, merged: torch.Tensor) -> torch.Tensor:
        return merged if self.feedforward else merged / self.ia3_l.to(merged.device)

    def _check_invertible(self) -> None:
        if not bool((self.ia3_l != 0).all()):
            raise ValueError(
                "cannot unmerge this IA3 layer: a scale is exactly zero, so merging erased part of the base weight; "
                "reload the base model instead"
            )

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        # peft's shapes: (1, in) for feed-forward targets, (out, 1) otherwise, whatever the weight layout.
        return {"ia3_l": self.ia3_l[None, :] if self.feedforward else self.ia3_l[:, None]}

    @torch.no_grad()
    def load_peft_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.ia3_l.copy_(tensors["ia3_l"].reshape(-1).to(self.ia3_l.dtype))

    def extra_repr(self) -> str:
        return f"scales={'input' if self.feedforward else 'output'}, size={self.ia3_l.numel()}"

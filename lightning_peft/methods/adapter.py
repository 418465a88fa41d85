"""Bottleneck adapters: Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP"
(arXiv:1902.00751), and the single-adapter placement of Pfeiffer et al., 2021, "AdapterFusion"
(arXiv:2005.00247).

A small residual network is inserted after a sub-layer of every transformer block::

    h' = h + W_up act(W_down h + b_down) + b_up          W_down: (m, d), W_up: (d, m), m = d // reduction_factor

where ``h`` is the sub-layer's output after its projection back to the hidden size ``d``, before the
block adds its skip connection (and, in post-LN blocks like BERT, before the LayerNorm). Each adapter
has ``2 d m + d + m`` parameters.

- ``style="houlsby"``: two adapters per block, after the attention and after the feed-forward sub-layer.
- ``style="pfeiffer"``: one adapter per block, after the feed-forward sub-layer. Pfeiffer et al. found
  this placement as good as Houlsby's at half the parameters and compute. (AdapterHub's "pfeiffer"
  config also moves the adapter behind the block's residual-and-LayerNorm; we keep the Houlsby
  position for both styles, so both are exact identities at init on pre-LN and post-LN blocks alike.)

Where the adapters go is found from the architecture (:mod:`lightning_peft.core.blocks`); name the
sub-layers' output projections with ``target_modules`` for models where that fails.

Initialisation:

- ``init="identity"`` (default): ``W_up = 0`` and zero biases, so the model is exactly unchanged at
  step 0; ``W_down`` starts like an ``nn.Linear`` (kaiming-uniform, a = sqrt(5)) so the bottleneck
  carries signal from the first step (LoRA's choice for its A matrix, for the same reason).
- ``init="near_identity"``: the paper's init: both weights ~ N(0, 0.01^2) truncated at two standard
  deviations, zero biases; the adapter starts close to, not at, the identity.

Adapters add modules, so they cannot be merged into the base weights: serve the base model with the
adapter loaded (:func:`~lightning_peft.load_adapter`). They are saved in lightning_peft's own format
(HF peft has no bottleneck adapters); see :mod:`lightning_peft.formats.native_format`.

Adapter tensors are float32 on any base dtype; the adapter's output is cast back to the base output's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch
from torch import nn

from lightning_peft.core.adapter_layer import AdapterLayer
from lightning_peft.core.blocks import output_features, residual_writers
from lightning_peft.core.targets import TargetSpec, exact_names_pattern, linear_types
from lightning_peft.methods.base import PEFTMethod

Style = Literal["houlsby", "pfeiffer"]
AdapterInit = Literal["identity", "near_identity"]
Activation = Literal["relu", "gelu", "silu", "tanh"]
Role = Literal["down", "up"]
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
#: Houlsby et al.'s near-identity init: N(0, sigma^2) truncated at two standard deviations.
NEAR_IDENTITY_STD = 1e-2

#: Builds one projection of an adapter: (in_features, out_features, role) -> module.
ProjectionBuilder = Callable[[int, int, Role], nn.Module]


def _choice(value: Any, literal: Any, what: str) -> None:
    choices = get_args(literal)
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(repr(c) for c in choices)}")


class Adapter(PEFTMethod):
    """Bottleneck adapter config: ``PEFTCallback(Adapter(style="houlsby", reduction_factor=16))``.

    Args:
        style: ``"houlsby"`` (after attention and feed-forward) or ``"pfeiffer"`` (after the feed-forward only).
        reduction_factor: the bottleneck width is ``hidden // reduction_factor`` (at least 1).
        activation: the non-linearity between the projections: ``"relu"``, ``"gelu"``, ``"silu"`` or ``"tanh"``.
        init: ``"identity"`` (zero up-projection: exactly the base model at step 0) or ``"near_identity"``
            (Houlsby's small truncated-normal weights).
        target_modules: ``None`` to find the sub-layers from the architecture; else the modules to put an
            adapter after, which must be the projections whose outputs go back into the residual stream
            (e.g. ``["o_proj", "down_proj"]``); see :mod:`lightning_peft.core.targets` for the forms.
        exclude_modules: names or regex removed from the targets.
        modules_to_save: modules trained in full (e.g. ``["classifier"]``; Houlsby et al. also train the
            LayerNorms: ``["classifier", "LayerNorm"]`` on BERT).

    Example::

        >>> Adapter(style="pfeiffer", reduction_factor=16).bottleneck_width(384, "output.dense")
        24
    """

    name = "adapter"
    has_peft_format = False
    supported_description = "nn.Linear, transformers Conv1D and bitsandbytes linear layers"

    def __init__(
        self,
        style: Style = "houlsby",
        reduction_factor: float = 16,
        activation: Activation = "relu",
        init: AdapterInit = "identity",
        target_modules: TargetSpec = None,
        exclude_modules: TargetSpec = None,
        modules_to_save: Sequence[str] | None = None,
    ) -> None:
        super().__init__(target_modules, exclude_modules, modules_to_save)
        _choice(style, Style, "adapter style")
        _choice(activation, Activation, "activation")
        _choice(init, AdapterInit, f"{type(self).__name__} init")
        if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, (int, float)) or not (
            math.isfinite(reduction_factor) and reduction_factor > 0
        ):
            raise ValueError(f"reduction_factor must be a positive number (e.g. 16), got reduction_factor={reduction_factor!r}")
        self.style = style
        self.reduction_factor = reduction_factor
        self.activation = activation
        self.init = init

    # -- where the adapters go ----------------------------------------------------------------------
    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, linear_types())

    def find_targets(self, model: nn.Module) -> list[str]:
        """The sub-layers' output projections (all of each block's for Houlsby, the last for Pfeiffer), or
        ``target_modules`` when given; each is checked to leave a non-empty bottleneck."""
        spec = self.target_modules
        if spec is None:
            per_block = residual_writers(model)
            spec = exact_names_pattern([name for block in per_block for name in (block if self.style == "houlsby" else block[-1:])])
        targets = self.select_targets(model, spec)
        for name in targets:
            self.check_fits(name, output_features(model.get_submodule(name)))
        return targets

    # -- shapes -------------------------------------------------------------------------------------
    def bottleneck_width(self, width: int, where: str) -> int:
        """``width // reduction_factor``; an error naming ``where`` when that leaves no units."""
        bottleneck = int(width // self.reduction_factor)
        if bottleneck < 1:
            raise ValueError(
                f"reduction_factor={self.reduction_factor!r} leaves a zero-width bottleneck at {where!r} "
                f"({width} // {self.reduction_factor!r} = 0); use a reduction_factor of at most {width} "
                f"(e.g. 16 gives {max(1, width // 16)} units)"
            )
        return bottleneck

    def check_fits(self, name: str, width: int) -> None:
        """Raise if an adapter of this config cannot be built after a module of output ``width``."""
        self.bottleneck_width(width, name)

    # -- building the layers ------------------------------------------------------------------------
    def projection_builder(self) -> ProjectionBuilder:
        """What builds the down and up projections: plain float32 ``nn.Linear`` layers here."""
        return self._linear_projection

    def _linear_projection(self, in_features: int, out_features: int, role: Role) -> nn.Module:
        projection = nn.Linear(in_features, out_features, dtype=torch.float32)
        with torch.no_grad():
            if self.init == "near_identity":
                nn.init.trunc_normal_(projection.weight, std=NEAR_IDENTITY_STD, a=-2 * NEAR_IDENTITY_STD, b=2 * NEAR_IDENTITY_STD)
            elif role == "up":
                nn.init.zeros_(projection.weight)
            # "identity" keeps nn.Linear's kaiming-uniform weight for the down projection.
            nn.init.zeros_(projection.bias)
        return projection

    def wrap(self, name: str, module: nn.Module) -> BottleneckAdapterLayer:
        return BottleneckAdapterLayer(module, self, self.projection_builder(), name)

    def wrap_targets(self, model: nn.Module, targets: list[str]) -> dict[str, AdapterLayer]:
        # One builder for the whole model: Compacter's builder owns the rule matrices its layers share.
        build = self.projection_builder()
        return {name: BottleneckAdapterLayer(model.get_submodule(name), self, build, name) for name in targets}


class BottleneckAdapterLayer(AdapterLayer):
    """``base_layer`` followed by a residual bottleneck: ``y + up(act(down(y)))`` with ``y = base_layer(x)``."""

    def __init__(self, base_layer: nn.Module, config: Adapter, build: ProjectionBuilder, name: str = "") -> None:
        super().__init__(base_layer)
        width = output_features(base_layer)
        bottleneck = config.bottleneck_width(width, name or type(base_layer).__name__)
        self.adapter_down = build(width, bottleneck, "down")  # (d) -> (m)
        self.adapter_act = ACTIVATIONS[config.activation]()
        self.adapter_up = build(bottleneck, width, "up")  # (m) -> (d)
        # Only the adapter moves: calling .to on the whole layer would also convert a k-bit base.
        device = next(base_layer.parameters()).device
        self.adapter_down.to(device)
        self.adapter_up.to(device)

    @property
    def can_merge(self) -> bool:
        return False  # the non-linear bottleneck has no weight-space equivalent

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)  # (..., d)
        if self.disabled:
            return h
        update = self.adapter_up(self.adapter_act(self.adapter_down(h.to(torch.float32))))  # (..., m) -> (..., d)
        return h + update.to(h.dtype)

    def extra_repr(self) -> str:
        return f"activation={type(self.adapter_act).__name__}"

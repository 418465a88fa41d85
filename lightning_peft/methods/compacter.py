"""Compacter: Karimi Mahabadi, Henderson and Ruder, 2021, "Compacter: Efficient Low-Rank Hypercomplex
Adapter Layers" (arXiv:2106.04647).

A bottleneck adapter (:mod:`lightning_peft.methods.adapter`) whose two projections are low-rank
parameterised hypercomplex multiplication (PHM) layers. A PHM layer's weight is a sum of ``n``
Kronecker products::

    H = sum_i A_i (x) B_i          A_i: (n, n) "rule" matrices, B_i: (out/n, in/n),  n = phm_dim
    B_i = s_i t_i                  s_i: (out/n, r), t_i: (r, in/n),                    r = phm_rank
    y = x H^T + b

The rule matrices ``A_i`` are the "slow" weights, shared by every PHM layer of the model (down and up
projections of all adapters); ``s_i, t_i`` are the "fast" per-layer weights. ``in`` and ``out`` must
be divisible by ``n``.

Parameter count, with ``L`` blocks, ``a`` adapters per block (2 for Compacter, 1 for Compacter++),
hidden size ``d`` and bottleneck ``m``: the paper's (r = 1, a = 2, weights only)::

    n^3 + 4 L (d + m)

and in general ``n^3 + a L (2 r (d + m) + d + m)``, the last ``d + m`` being the two PHM biases.

- ``style="houlsby"``: Compacter (adapters after attention and after the feed-forward).
- ``style="pfeiffer"``: Compacter++ (one adapter after the feed-forward), the paper's most efficient variant.

Initialisation: ``A_i ~ N(0, 1/n)`` and ``s_i, t_i`` normal with the standard deviation that gives the
entries of ``H`` the variance of the corresponding ``nn.Linear`` init: kaiming-uniform's ``1 / (3 in)``
for the down projection, and Houlsby's ``0.01^2`` for both with ``init="near_identity"``. With
``init="identity"`` the up projection's ``t_i`` start at zero, so ``H_up = 0`` and the model is exactly
unchanged at step 0 (``s_i`` are random so ``t_i`` get gradients).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_peft.core.targets import TargetSpec
from lightning_peft.methods.adapter import NEAR_IDENTITY_STD, Activation, Adapter, AdapterInit, ProjectionBuilder, Role, Style


class Compacter(Adapter):
    """Compacter config: ``PEFTCallback(Compacter(phm_dim=4, phm_rank=1, reduction_factor=32))``.

    Args:
        phm_dim: ``n``, the number of Kronecker products; must divide the hidden size. The bottleneck is
            rounded down to a multiple of it (logged when that changes the width).
        phm_rank: ``r``, the rank of each ``B_i`` (1 in the paper).
        reduction_factor: the bottleneck width is ``hidden // reduction_factor``, rounded down to a multiple of ``phm_dim``.
        style: ``"houlsby"`` (Compacter) or ``"pfeiffer"`` (Compacter++).
        activation, init, target_modules, exclude_modules, modules_to_save: as for :class:`~lightning_peft.Adapter`.

    Example::

        >>> Compacter(phm_dim=4, phm_rank=1, reduction_factor=32, style="pfeiffer").bottleneck_width(384, "output.dense")
        12
    """

    name = "compacter"

    def __init__(
        self,
        phm_dim: int = 4,
        phm_rank: int = 1,
        reduction_factor: float = 32,
        style: Style = "houlsby",
        activation: Activation = "gelu",
        init: AdapterInit = "identity",
        target_modules: TargetSpec = None,
        exclude_modules: TargetSpec = None,
        modules_to_save: Sequence[str] | None = None,
    ) -> None:
        super().__init__(style, reduction_factor, activation, init, target_modules, exclude_modules, modules_to_save)
        for label, value in (("phm_dim", phm_dim), ("phm_rank", phm_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {label}={value!r}")
        self.phm_dim = phm_dim
        self.phm_rank = phm_rank
        self._reported_widths: set[int] = set()

    def bottleneck_width(self, width: int, where: str) -> int:
        """``width // reduction_factor`` rounded down to a multiple of ``phm_dim``: a PHM layer splits its
        output into ``phm_dim`` equal parts, and the default reduction factor need not leave a multiple
        (SmolLM2's 576 // 32 = 18 becomes 16; MiniLM's 384 // 32 = 12 stays)."""
        plain = super().bottleneck_width(width, where)
        rounded = plain - plain % self.phm_dim
        if rounded == 0:
            raise ValueError(
                f"phm_dim={self.phm_dim} is larger than the bottleneck width {plain} (= {width} // reduction_factor="
                f"{self.reduction_factor!r}) at {where!r}, and a PHM layer needs a multiple of phm_dim; use a "
                f"reduction_factor of at most {width // self.phm_dim} or a phm_dim of at most {plain}"
            )
        return rounded

    def check_fits(self, name: str, width: int) -> None:
        n = self.phm_dim
        if width % n:
            divisors = [k for k in range(2, min(width, 16) + 1) if width % k == 0]
            raise ValueError(
                f"phm_dim={n} does not divide the hidden size {width} at {name!r}: a PHM layer splits its input and "
                f"output into {n} equal parts. Use a phm_dim that divides {width}, e.g. {', '.join(map(str, divisors)) or 1}"
            )
        bottleneck = self.bottleneck_width(width, name)
        plain = int(width // self.reduction_factor)
        if bottleneck != plain and width not in self._reported_widths:
            self._reported_widths.add(width)  # once per width, not once per layer
            rank_zero_info(
                f"lightning_peft: Compacter bottleneck {bottleneck} after the {width}-wide layers ({width} // "
                f"reduction_factor={self.reduction_factor!r} = {plain}, rounded down to a multiple of phm_dim={n})"
            )

    def projection_builder(self) -> ProjectionBuilder:
        """A fresh set of rule matrices, shared by every PHM layer this builder makes."""
        return _PHMBuilder(PHMRules(self.phm_dim), self.phm_rank, self.init)


class PHMRules(nn.Module):
    """The ``n`` shared rule matrices ``A_i``, one (n, n, n) parameter, ~ N(0, 1/n)."""

    def __init__(self, phm_dim: int) -> None:
        super().__init__()
        self.matrices = nn.Parameter(torch.randn(phm_dim, phm_dim, phm_dim) / math.sqrt(phm_dim))  # (n, n, n)


class PHMLinear(nn.Module):
    """``y = x H^T + b`` with ``H = sum_i A_i (x) (s_i t_i)``; see the module docstring."""

    def __init__(self, in_features: int, out_features: int, rules: PHMRules, rank: int) -> None:
        super().__init__()
        n = rules.matrices.shape[0]
        self.in_features, self.out_features = in_features, out_features
        self.rules = rules  # shared: the same module object in every PHM layer of the model
        self.left = nn.Parameter(torch.empty(n, out_features // n, rank))  # s_i: (n, out/n, r)
        self.right = nn.Parameter(torch.empty(n, rank, in_features // n))  # t_i: (n, r, in/n)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def weight(self) -> torch.Tensor:
        """``H``, (out, in): entry ``[(a, c), (b, d)] = sum_i A_i[a, b] B_i[c, d]``, i.e. ``sum_i kron(A_i, B_i)``."""
        blocks = self.left @ self.right  # B_i: (n, out/n, in/n)
        n = blocks.shape[0]
        kron = torch.einsum("iab,icd->acbd", self.rules.matrices, blocks)  # (n, out/n, n, in/n)
        return kron.reshape(n * blocks.shape[1], n * blocks.shape[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, phm_dim={self.left.shape[0]}, rank={self.left.shape[2]}"


class _PHMBuilder:
    """Builds the PHM projections of one model's adapters around one shared :class:`PHMRules`."""

    def __init__(self, rules: PHMRules, rank: int, init: AdapterInit) -> None:
        self.rules = rules
        self.rank = rank
        self.init = init

    @torch.no_grad()
    def __call__(self, in_features: int, out_features: int, role: Role) -> nn.Module:
        layer = PHMLinear(in_features, out_features, self.rules, self.rank)
        # Entries of H have variance r var(s) var(t) (the rules contribute n * 1/n); split the target
        # variance evenly between the two factors.
        std = NEAR_IDENTITY_STD if self.init == "near_identity" else 1.0 / math.sqrt(3 * in_features)
        factor_std = (std**2 / self.rank) ** 0.25
        nn.init.normal_(layer.left, std=factor_std)
        if self.init == "identity" and role == "up":
            nn.init.zeros_(layer.right)  # H_up = 0: exactly the base model at step 0
        else:
            nn.init.normal_(layer.right, std=factor_std)
        return layer

"""Linear probes of attention heads' activations for two classes, from statistics that add across ranks.

Inference-time intervention (:mod:`lightning_peft.methods.iti`) ranks every attention head by how well a
linear probe separates two classes from that head's output, then steers along a per-head direction. The
paper fits a logistic regression per head on gathered activations; here every quantity comes from sums over
the examples (:class:`HeadStatistics`), so data-parallel ranks each sum their own shard, average the sums
(``reduce``), and all arrive at the same probes, directions and ranking without gathering activations:

- the probe is ridge-regularised least squares on targets ``+1`` (class 1) and ``-1`` (class 0), with an
  intercept: ``w = (X^T X + lambda I') ^-1 X^T y`` over the rows ``[x, 1]``, ``I'`` leaving the intercept
  unpenalised and ``lambda = ridge * trace(sum x x^T) / d`` (scale-free). It is a linear classifier like the
  paper's (and, for two classes, Fisher's discriminant direction); its validation accuracy ranks the heads;
- the mass-mean-shift direction is ``mean(x | class 1) - mean(x | class 0)``, normalised;
- ``sigma``, the activations' standard deviation along a unit direction ``theta``, is
  ``sqrt(theta^T Cov theta)`` with ``Cov`` the training rows' covariance.

Everything accumulates in float64: sums of squares over thousands of activations lose digits in float32.
Heads are flattened to one axis ``G`` (layers x heads per layer) and ``d`` is the head width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch


@dataclass
class HeadStatistics:
    """Sums over training rows ``x`` (G, d) with labels in {0, 1}; see the module docstring."""

    gram: torch.Tensor  # (G, d + 1, d + 1): sum of [x, 1] [x, 1]^T
    target: torch.Tensor  # (G, d + 1): sum of [x, 1] * (+1 or -1)
    class_sum: torch.Tensor  # (2, G, d): sum of x per class
    class_count: torch.Tensor  # (2,): rows per class

    @classmethod
    def zeros(cls, groups: int, dim: int, device: torch.device | str = "cpu") -> HeadStatistics:
        kw = {"dtype": torch.float64, "device": device}
        return cls(
            torch.zeros(groups, dim + 1, dim + 1, **kw),
            torch.zeros(groups, dim + 1, **kw),
            torch.zeros(2, groups, dim, **kw),
            torch.zeros(2, **kw),
        )

    @property
    def dim(self) -> int:
        return self.class_sum.shape[-1]

    def add(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Add rows ``x`` (N, G, d) with ``labels`` (N,) in {0, 1}."""
        x = x.to(self.gram.device, torch.float64)
        labels = labels.to(self.gram.device)
        rows = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)  # (N, G, d + 1)
        self.gram += torch.einsum("ngi,ngj->gij", rows, rows)
        signs = labels.to(torch.float64) * 2 - 1
        self.target += torch.einsum("ngi,n->gi", rows, signs)
        for label in (0, 1):
            chosen = labels == label
            self.class_sum[label] += x[chosen].sum(0)
            self.class_count[label] += chosen.sum()

    def reduced(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> HeadStatistics:
        """The statistics averaged over data-parallel ranks (every rank then holds the same): a mean of sums is
        the sum scaled by 1/world, and every quantity below is a ratio of such sums, so it is unchanged."""
        return HeadStatistics(*(reduce(getattr(self, f.name)) for f in fields(self)))

    def mass_mean_directions(self) -> torch.Tensor:
        """(G, d) unit vectors from the class-0 mean to the class-1 mean."""
        means = self.class_sum / self.class_count.clamp_min(1)[:, None, None]
        return unit_rows(means[1] - means[0])

    def probe_weights(self, ridge: float) -> torch.Tensor:
        """(G, d + 1) least-squares probe weights, the intercept last."""
        d = self.dim
        strength = ridge * torch.diagonal(self.gram[:, :d, :d], dim1=-2, dim2=-1).sum(-1) / d  # (G,)
        penalty = torch.eye(d + 1, dtype=self.gram.dtype, device=self.gram.device)
        penalty[d, d] = 0  # the intercept is not shrunk
        system = self.gram + strength[:, None, None] * penalty
        return torch.linalg.solve(system, self.target)

    def sigma_along(self, directions: torch.Tensor) -> torch.Tensor:
        """(G,) standard deviation of the training rows along each unit ``directions`` (G, d)."""
        d = self.dim
        count = self.class_count.sum().clamp_min(1)
        mean = self.gram[:, :d, d] / count  # (G, d)
        covariance = self.gram[:, :d, :d] / count - mean[:, :, None] * mean[:, None, :]
        variance = torch.einsum("gi,gij,gj->g", directions, covariance, directions)
        return variance.clamp_min(0).sqrt()


def probe_correct(weights: torch.Tensor, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(G,) how many of the rows ``x`` (N, G, d) each head's probe (``weights`` (G, d + 1)) classifies right:
    class 1 where ``w . x + b > 0``."""
    x = x.to(weights.device, torch.float64)
    scores = torch.einsum("ngi,gi->ng", x, weights[:, :-1]) + weights[:, -1]
    return ((scores > 0) == (labels.to(weights.device)[:, None] == 1)).sum(0).to(torch.float64)


def top_heads(accuracy: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest ``accuracy`` values (G,); ties go to the lower index (layer, then head), so
    the choice is the same on every rank and every run."""
    order = sorted(range(accuracy.numel()), key=lambda g: (-float(accuracy[g]), g))
    return torch.tensor(order[:count], dtype=torch.long)


def unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Each row of ``vectors`` scaled to unit norm; a zero row stays zero."""
    norms = vectors.norm(dim=-1, keepdim=True)
    return torch.where(norms > 0, vectors / norms.clamp_min(torch.finfo(vectors.dtype).tiny), torch.zeros_like(vectors))

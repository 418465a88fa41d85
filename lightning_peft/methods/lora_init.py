"""LoRA initialisations that start the adapter away from zero: PiSSA, OLoRA and LoRA-GA.

All three pick non-zero ``A`` (r x in) and ``B`` (out x r) and compensate so that the model's output
at step 0 is unchanged: ``W x + s B A x - s B0 A0 x = W x`` with ``B0 = B``, ``A0 = A`` at the start.
The papers (and HF peft) write the compensation into the base weight, ``W <- W - s B0 A0``. We keep
``W`` untouched and carry ``A0``/``B0`` as frozen buffers of the layer instead (see
:class:`lightning_peft.methods.lora.LoRALayer`); the functions here only compute the factors, from a
weight or a gradient in the *linear* orientation (out x in), in float32 or float64.

- PiSSA (Meng et al., 2024, arXiv:2404.02948): the principal singular triplets of ``W``,
  ``A = sqrt(S_r / s) V_r^T``, ``B = U_r sqrt(S_r / s)``, so ``s B A`` is the best rank-r part of W.
- OLoRA (Buyukakyuz, 2024, arXiv:2406.01775): a thin QR decomposition ``W = Q R``, ``A = R_r``
  (r x in), ``B = Q_r`` (out x r).
- LoRA-GA (Wang et al., 2024, arXiv:2407.05000, Sec. 3.2-3.3): from the SVD of the averaged
  full-weight gradient ``G = U S V^T``, ``A = V_[:, 1..r]^T`` and ``B = U_[:, r+1..2r]``, so the first
  update of ``s B A`` follows the best rank-2r approximation of the full fine-tuning step; both scaled
  by the paper's "stable" factor ``d_out^(1/4) / sqrt(gamma)`` (Theorem 3.1, gamma = 16).

Exact SVD is the default (``torch.linalg.svd``). ``niter=k`` uses the randomized SVD of Halko et al.
(``torch.svd_lowrank`` with ``k`` subspace iterations): much faster on large layers, approximate.
Its random projection draws from a generator seeded here, so every rank of a distributed run gets
the same factors from the same matrix.
"""

from __future__ import annotations

import torch

# Sign and seed conventions that make the factors reproducible across processes.
_SVD_SEED = 0


def top_singular_triplets(
    matrix: torch.Tensor, k: int, niter: int | None = None, subspace: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U (m x k), S (k,), Vh (k x n)`` of the top ``k`` singular triplets of ``matrix``.

    With ``niter`` the randomized SVD projects onto ``subspace`` (default ``k``) random directions;
    a larger subspace makes the top ``k`` more accurate.
    """
    if niter is None:
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k]
    # svd_lowrank takes no generator: fork the global RNG so the draw is seeded and leaves no trace.
    devices = [matrix.device] if matrix.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_SVD_SEED)
        U, S, V = torch.svd_lowrank(matrix, q=min(subspace or k, *matrix.shape), niter=niter)
    return U[:, :k], S[:k], V[:, :k].T


def pissa_factors(weight: torch.Tensor, r: int, scaling: float, niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's ``(A, B)`` for ``weight`` (out x in): ``s B A`` is the rank-r truncated SVD of ``weight``."""
    U, S, Vh = top_singular_triplets(weight, r, niter)
    root = torch.sqrt(S / scaling)
    return root[:, None] * Vh, U * root[None, :]


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA's ``(A, B) = (R_r, Q_r)`` from the thin QR decomposition of ``weight`` (out x in)."""
    Q, R = torch.linalg.qr(weight)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def lora_ga_factors(gradient: torch.Tensor, r: int, gamma: float = 16.0, niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA's ``(A, B)`` from the averaged full-weight gradient (out x in), "stable" scale.

    ``A`` takes the top r right singular vectors and ``B`` the next r left singular vectors (the
    paper's ArB2r split); both are multiplied by ``d_out^(1/4) / sqrt(gamma)``. HF peft differs on
    purpose here: it also multiplies ``B`` by the singular values and scales only ``B``.
    """
    out_features, in_features = gradient.shape
    if 2 * r > min(out_features, in_features):
        raise ValueError(
            f"LoRA-GA needs 2r <= min(out, in) singular vectors; r={r} is too large for a {out_features}x{in_features} layer"
        )
    # The paper's randomized SVD projects onto 4r directions to get the top 2r right.
    U, _, Vh = top_singular_triplets(gradient, 2 * r, niter, subspace=4 * r)
    scale = out_features**0.25 / gamma**0.5
    return Vh[:r] * scale, U[:, r : 2 * r] * scale

"""The product with a sparse weight delta, without ever forming the dense matrix.

Sparse fine-tuning (LT-SFT, Ansell et al., 2022, arXiv:2110.07560; FISH mask, Sung et al., 2021,
arXiv:2111.09839; SpIEL, Ansell et al., 2024, arXiv:2401.16405) trains ``k`` chosen entries of a frozen
(out, in) weight ``W``. The trained delta ``D`` is held as ``k`` flat indices ``i_e = r_e * in + c_e`` into
``W`` and ``k`` values ``v_e``. For the rows ``x_n`` of a batch of inputs::

    y[n, r_e]        += v_e * x[n, c_e]                     forward, y = x D^T
    dL/dv_e           = sum_n g[n, r_e] * x[n, c_e]         g = dL/dy
    dL/dx[n, c_e]    += v_e * g[n, r_e]                     dL/dx = g D

Neither ``D``, ``W + D`` nor a dense gradient of ``W`` is ever built: a dense product (``F.linear`` with ``D``
scattered into a matrix) would cost an (out, in) float32 temporary per layer and step, and its gradient another,
which is what sparse fine-tuning exists to avoid. Two kernels compute the three products:

- ``"csr"`` (CPU and CUDA, the default there): ``D`` as a CSR sparse matrix built from the ``k`` entries on
  each call (one sort of the indices; no cache, so entries that regrowth moves in place are always current).
  The forward and ``dL/dx`` are sparse-dense products (``D x^T``, ``D^T g^T``: MKL on CPU, cuSPARSE on CUDA)
  and ``dL/dv`` is the sampled product ``(g^T x)`` at the ``k`` entries (``torch.sparse.sampled_addmm``, an
  SDDMM: one dot product per entry). The temporaries are the size of the activations and of ``k``. On CPU,
  forward and backward at MiniLM's shapes (640 tokens, density 1%) took 2.5-7x less time than the gather kernel
  and less than the dense base layer's own product.
- ``"gather"`` (every other device, and a reference): gathers and ``index_add_`` over the ``k`` entries,
  token chunk by token chunk, so no temporary is larger than (chunk, k) (``chunk = max(1, budget // k)``, a
  64 MiB float32 budget by default).

Both compute in float32 (float64 for a float64 input) whatever the input dtype, with autocast off (it would
cast the sparse products down to 16 bits); the result comes back in the input's dtype. CUDA's sums (atomic
adds, cuSPARSE) may vary in their last bit between runs.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import torch

#: Elements of the largest temporary one chunk of the gather kernel may allocate: (chunk, k) floats, 64 MiB in float32.
CHUNK_ELEMENTS = 1 << 24

Kernel = Literal["csr", "gather"]
#: Devices with sparse CSR products (MKL / cuSPARSE); others use the gather kernel.
CSR_DEVICES = ("cpu", "cuda")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 for bf16/fp16/float32 inputs (a 16-bit sum of many products loses most of its bits); float64 kept.
    return torch.promote_types(dtype, torch.float32)


def _chunk(k: int, tokens: int, budget: int) -> int:
    return max(1, min(tokens, budget // max(k, 1)))


@contextlib.contextmanager
def _full_precision(device: torch.device) -> Iterator[None]:
    """Autocast off (its 16-bit casts of mm/addmm would reach the sparse products); no-op where it is not on."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


def _csr(major: torch.Tensor, minor: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The CSR matrix with entries ``values`` at (``major``, ``minor``), which must be sorted by (major, minor)."""
    # Row r's entries start at the first position whose row is >= r (searchsorted: no host sync, unlike bincount).
    crow = torch.searchsorted(major, torch.arange(shape[0] + 1, device=major.device))
    with warnings.catch_warnings():
        # torch warns once per process that CSR support is "in beta"; the operations used here are long stable.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, minor, values, shape, check_invariants=False)


class _SparseDelta(torch.autograd.Function):
    """``y = x D^T`` for ``D`` given by flat ``indices`` and ``values``; see the module docstring for the math."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, out_features: int, kernel: str, budget: int
    ) -> torch.Tensor:
        dtype = _compute_dtype(x.dtype)
        in_features = x.shape[1]
        with _full_precision(x.device):
            if kernel == "csr":
                order = torch.argsort(indices)  # row-major order: CSR's
                rows, cols = indices[order] // in_features, indices[order] % in_features
                delta = _csr(rows, cols, values.detach()[order].to(dtype), (out_features, in_features))
                # A contiguous x^T: sparse-dense products on a transposed view ran ~10x slower on CPU (MKL).
                y = torch.sparse.mm(delta, x.detach().to(dtype).T.contiguous()).T  # (N, out)
                ctx.save_for_backward(x, values, indices, order)
            else:
                y = _gather_forward(x.detach(), values.detach(), indices, out_features, dtype, budget)
                ctx.save_for_backward(x, values, indices)
        ctx.kernel, ctx.budget, ctx.out_features = kernel, budget, out_features
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, values, indices, *order = ctx.saved_tensors
        dtype = _compute_dtype(x.dtype)
        need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with _full_precision(x.device):
            if ctx.kernel == "csr":
                grad_x, grad_v = _csr_backward(x, values, indices, order[0], grad.to(dtype), ctx.out_features, need_x, need_v)
            else:
                grad_x, grad_v = _gather_backward(x, values, indices, grad, ctx.out_features, dtype, ctx.budget, need_x, need_v)
        return (
            None if grad_x is None else grad_x.to(x.dtype),
            None if grad_v is None else grad_v.to(values.dtype),
            None,
            None,
            None,
            None,
        )


def _csr_backward(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    order: torch.Tensor,
    grad: torch.Tensor,
    out_features: int,
    need_x: bool,
    need_v: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    in_features = x.shape[1]
    dtype = grad.dtype
    rows, cols = indices // in_features, indices % in_features
    grad_x = grad_v = None
    if need_x:
        by_col = torch.argsort(cols * out_features + rows)  # D^T in CSR: sorted by (col, row)
        transposed = _csr(cols[by_col], rows[by_col], values.detach()[by_col].to(dtype), (in_features, out_features))
        grad_x = torch.sparse.mm(transposed, grad.T.contiguous()).T  # (N, in)
    if need_v:
        # (g^T x) sampled at the k entries, one dot product over the tokens each: never the dense (out, in) product.
        pattern = _csr(rows[order], cols[order], torch.zeros(order.numel(), dtype=dtype, device=x.device), (out_features, in_features))
        sampled = torch.sparse.sampled_addmm(pattern, grad.T.contiguous(), x.detach().to(dtype), beta=0.0).values()
        grad_v = torch.empty_like(sampled)
        grad_v[order] = sampled
    return grad_x, grad_v


def _gather_forward(
    x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, out_features: int, dtype: torch.dtype, budget: int
) -> torch.Tensor:
    in_features = x.shape[1]
    rows, cols = indices // in_features, indices % in_features
    v = values.to(dtype)[:, None]  # (k, 1)
    tokens = x.shape[0]
    y = x.new_empty(tokens, out_features, dtype=dtype)
    step = _chunk(values.numel(), tokens, budget)
    for start in range(0, tokens, step):
        xt = x[start : start + step].to(dtype).T  # (in, c): each entry's column of x is a row here
        gathered = xt.index_select(0, cols).mul_(v)  # (k, c)
        y[start : start + step] = gathered.new_zeros(out_features, gathered.shape[1]).index_add_(0, rows, gathered).T
    return y


def _gather_backward(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    grad: torch.Tensor,
    out_features: int,
    dtype: torch.dtype,
    budget: int,
    need_x: bool,
    need_v: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    tokens, in_features = x.shape
    rows, cols = indices // in_features, indices % in_features
    step = _chunk(values.numel(), tokens, budget)
    v = values.detach().to(dtype)[:, None]
    grad_x = x.new_empty(tokens, in_features, dtype=dtype) if need_x else None
    grad_v = values.new_zeros(values.shape, dtype=dtype) if need_v else None
    for start in range(0, tokens, step):
        g_rows = grad[start : start + step].to(dtype).T.index_select(0, rows)  # (k, c): g[n, r_e]
        if grad_v is not None:
            x_cols = x[start : start + step].detach().to(dtype).T.index_select(0, cols)  # (k, c): x[n, c_e]
            grad_v += x_cols.mul_(g_rows).sum(dim=1)
        if grad_x is not None:
            gxt = g_rows.new_zeros(in_features, g_rows.shape[1]).index_add_(0, cols, g_rows.mul_(v))  # (in, c)
            grad_x[start : start + step] = gxt.T
    return grad_x, grad_v


def sparse_delta(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    out_features: int,
    in_features: int,
    kernel: Kernel | None = None,
    budget: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """``x D^T`` for the (out, in) matrix ``D`` that is ``values`` at the flat ``indices`` and zero elsewhere.

    ``x``: (..., in), any float dtype; ``values``: (k,); ``indices``: (k,) distinct integers in [0, out * in).
    Returns (..., out) in ``x``'s dtype, differentiable in ``x`` and ``values``. ``kernel``: ``"csr"`` or
    ``"gather"``, ``None`` for ``"csr"`` on CPU and CUDA; ``budget`` bounds the elements of one chunk's
    temporaries in the gather kernel.
    """
    if x.shape[-1] != in_features:
        raise ValueError(f"sparse_delta: the input's last dimension is {x.shape[-1]}, the delta has {in_features} columns")
    if kernel is None:
        kernel = "csr" if x.device.type in CSR_DEVICES else "gather"
    if kernel not in ("csr", "gather"):
        raise ValueError(f"sparse_delta: unknown kernel {kernel!r}; choose 'csr' or 'gather'")
    indices = indices.to(device=x.device, dtype=torch.long)
    lead = x.shape[:-1]
    y = _SparseDelta.apply(x.reshape(-1, in_features), values, indices, out_features, kernel, budget)
    return y.reshape(*lead, out_features)


def scatter_dense(values: torch.Tensor, indices: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The dense (out, in) float32 matrix ``D`` (for merging and export only: it costs a full matrix)."""
    dense = values.new_zeros(out_features * in_features, dtype=torch.float32)
    dense.index_put_((indices.to(device=dense.device, dtype=torch.long),), values.detach().float(), accumulate=True)
    return dense.view(out_features, in_features)


def add_at(weight: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``weight + D`` as a new tensor (``weight`` (out, in)): entries outside ``indices`` keep their exact bits."""
    merged = weight.clone()
    index = indices.to(device=weight.device, dtype=torch.long)
    merged.view(-1).index_add_(0, index, values.detach().to(device=weight.device, dtype=weight.dtype))
    return merged

"""Sparse fine-tuning: train a few chosen entries of the frozen base weights.

Papers:

- LT-SFT: Ansell, Ponti, Korhonen and Vulic, 2022, "Composable Sparse Fine-Tuning for Cross-Lingual Transfer"
  (ACL 2022, arXiv:2110.07560). A dense fine-tuning phase, then the top-k entries by ``|theta_1 - theta_0|``
  train alone, from ``theta_0``.
- FISH mask: Sung, Nair and Raffel, 2021, "Training Neural Networks with Fixed Sparse Masks" (NeurIPS 2021,
  arXiv:2111.09839). The top-k entries by the empirical Fisher information, ``sum (dL/dtheta)^2``, over a
  few batches.
- SpIEL: Ansell, Vulic, Sterz, Korhonen and Ponti, 2024, "Scaling Sparse Fine-Tuning to Large Language
  Models" (arXiv:2401.16405). A fixed budget of (index, delta) pairs per matrix; every few steps the entries
  with the smallest ``|delta|`` are dropped and as many regrown where the accumulated gradient is largest; it
  trains on a 4-bit base.

**The math.** Each targeted weight ``W`` (out x in) gets a delta ``D`` that is non-zero on ``k`` entries::

    y = W x + b + D x           D[i_e] = v_e for e < k, zero elsewhere
    k = max(1, round(density * out * in))

``v`` (k,) float32 is the only trained tensor of the layer; the flat indices ``i`` (k,) int64 are a
persistent buffer (adapter state: checkpoints and adapter files carry them). ``v`` starts at zero, so the
model is exactly its base at step 0. The product ``D x`` runs through
:func:`lightning_peft.core.sparse_delta.sparse_delta` (a CSR sparse-dense product and a sampled product for
``dL/dv`` on CPU and CUDA; chunked gathers elsewhere), so neither ``D`` nor ``W + D`` nor a dense gradient of
``W`` ever exists in training (the frozen ``W`` has no ``requires_grad``;
``dL/dv_e = sum_n g[n, r_e] x[n, c_e]``). Merging is exact: ``W + D``
changes the ``k`` entries and leaves every other bit of ``W`` as it was.

**Why only ``v`` is a parameter.** Masking the gradient of a dense ``W`` does not freeze the masked
entries: AdamW's decoupled weight decay (``w -= lr * wd * w``) and left-over momentum move them anyway, and
the dense gradient and Adam state cost a full fine-tune's memory. Here the entries outside the mask are not
parameters at all, so no optimizer, weight decay included, can move them; weight decay on ``v`` pulls the
delta towards zero, i.e. the weights towards their pretrained values. The optimizer state is O(k).

**Which entries** (``selection``), per matrix, each keeping its own ``k`` (SpIEL's fixed budget per matrix;
FISH ranks all matrices together, which can leave a layer with none):

- ``"fisher"``: the top-k of ``sum_b G_b^2`` over ``init_batches`` training batches, ``G_b = dL_b/dW`` the
  gradient of batch ``b``'s loss (FISH's criterion with batch gradients instead of FISH's per-example ones:
  cheaper, coarser).
- ``"magnitude"``: the top-k of ``|sum_b G_b|``. LT-SFT ranks by how far a dense fine-tuning phase moved each
  entry; the first SGD steps of such a phase move entry ``j`` by ``lr * sum_b G_b[j]``, so this ranks as a
  short dense SGD phase would, without running it (a real dense phase costs full fine-tuning's memory; an
  Adam phase, or a long one whose gradients change as it trains, can rank differently). It is LT-SFT's
  criterion in spirit, not its procedure.
- ``"random"``: a uniform draw of ``k`` entries per matrix, from ``seed`` and the layer's name, made at
  injection: every DDP rank draws the same entries without communicating.

``"fisher"`` and ``"magnitude"`` run when fitting starts (:class:`~lightning_peft.PEFTCallback` calls
:meth:`SparseFT.initialise_from_data` with the Trainer's batches; a resumed run takes its entries from the
checkpoint instead). The base weight's gradient is read without giving ``W`` ``requires_grad``, as LoRA-GA
does (:mod:`lightning_peft.methods.lora_ga`): a forward hook records each layer's input and multiplies it by
the output's gradient. The scores cost one float32 (out, in) accumulator per targeted matrix (plus, for
``"fisher"``, one transient batch gradient at a time) for the duration of the estimate only: a float32 copy
of the targeted weights, paid once. They are averaged over the ranks (``reduce``) before the top-k, so every
rank selects the same entries; the top-k is ``torch.topk`` (``torch.multinomial`` stops at 2^24 categories,
less than one MLP matrix of a 7B model). Without the callback, call ``initialise_from_data`` yourself before
training: until then a data-driven layer trains the placeholder entries ``0 .. k-1``.

**Regrowth** (SpIEL; ``regrow_every=N``): after every ``N``-th optimizer step
(:meth:`SparseFT.after_optimizer_step`), each matrix drops the ``round(regrow_fraction * k)`` entries with the
smallest ``|v|`` and regrows as many at positions it does not hold, where the accumulated gradient ``|sum G|``
is largest; the regrown entries start at zero and ``k`` stays exactly the same. The gradient comes from the
same hooks as the selection, armed only for the last ``regrow_capture_steps`` (``min(5, max(1, N // 4))``:
SpIEL's 5 of every 20) optimizer steps before each regrowth, never on the others: during those steps each
targeted matrix holds one float32 (out, in) accumulator, summed over the steps' micro-batches and averaged over
the ranks before it is used. A regrowth that finds nothing captured (the first one when ``N == 1``, or one
right after resuming inside a capture window) is skipped. SpIEL's drop rate decays over training; here it is
the constant ``regrow_fraction``.

A regrown slot must not inherit the dropped entry's optimizer state (its momentum would move the new entry at
once): :meth:`SparseFTLayer.reset_optimizer_state` zeroes the slot in every per-parameter state tensor shaped
like ``v`` (Adam's ``exp_avg``, ``exp_avg_sq``, SGD's ``momentum_buffer``, ...). The optimizers come from the
caller (``after_optimizer_step(..., optimizers=...)``) or, by default, from the optimizers seen stepping ``v``:
the first SparseFT layer registers one process-wide ``torch.optim`` post-step hook that remembers, weakly,
which optimizers hold SparseFT values (one dictionary lookup per step for other optimizers). Optimizers that
flatten or shard their parameters (FSDP, DeepSpeed ZeRO) keep no state shaped like ``v``: regrowth is not
supported there, and the data-driven selection refuses sharded strategies.

**Files.** HF peft's SHiRA (``peft.tuners.shira``, Bhardwaj et al., 2024) stores exactly this kind of
adapter: per matrix a ``shira_weight`` (K,) and ``shira_indices`` (2, K) int32 (rows, cols), loaded as given
(peft builds a random mask and overwrites it with the file's indices) and added to ``W`` as a sparse COO
tensor, so arbitrary indices and their values are reproduced exactly. Its one constraint is the count:
``K = r * (in + out)`` with one integer ``r`` for the whole adapter. We write ``r = max ceil(k / (in + out))``
over the targets and pad each matrix's ``k`` entries with ``K - k`` zero-valued entries at positions it does not
hold: the delta is unchanged, bit for bit. When that ``K`` exceeds a matrix's ``in * out`` (peft refuses
such a rank; densities near 1, or very unequal budgets), ``save_adapter`` writes lightning_peft's own format
instead (the values and the indices buffer under their own names). Reading our SHiRA files back drops the
padding (and refuses it if it is not zero: peft trained it further). A SHiRA file that peft wrote itself
has ``r * (in + out)`` entries per matrix, which no ``density`` reproduces: it is refused with that reason.

Supported layers: ``nn.Linear`` and bitsandbytes ``Linear4bit``/``Linear8bitLt`` (their codes never change:
the delta lives beside them; a merged export of a k-bit base is made from the original weights, as for
QLoRA). GPT-2's ``Conv1D`` is not supported (peft's SHiRA has no such layer either).
"""

from __future__ import annotations

import math
import weakref
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, get_args

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from lightning_peft.core.adapter_layer import AdapterLayer, adapter_layers
from lightning_peft.core.sparse_delta import add_at, scatter_dense, sparse_delta
from lightning_peft.core.targets import ALL_LINEAR, TargetSpec
from lightning_peft.methods.base import PEFTMethod
from lightning_peft.methods.lora_ga import accumulate_weight_gradients

Selection = Literal["fisher", "magnitude", "random"]
SELECTIONS: tuple[str, ...] = get_args(Selection)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SparseFT(PEFTMethod):
    """Sparse fine-tuning config: ``PEFTCallback(SparseFT(density=0.01))``. See the module docstring for the math.

    Args:
        density: the fraction of each targeted matrix's entries that train, in (0, 1]; each matrix trains
            ``k = max(1, round(density * out * in))`` entries.
        selection: ``"fisher"`` (top-k of the summed squared batch gradients), ``"magnitude"`` (top-k of the
            summed gradient's magnitude) or ``"random"`` (a uniform draw from ``seed``).
        target_modules: see :mod:`lightning_peft.core.targets`; ``None`` for ``"all-linear"`` (every linear
            layer but the output head).
        exclude_modules: names or regex removed from the targets.
        modules_to_save: modules trained in full (e.g. ``["classifier"]``), outside the budget (as FISH does).
        regrow_every: ``None`` for a fixed set of entries; ``N`` to drop and regrow entries after every ``N``-th
            optimizer step (SpIEL).
        regrow_fraction: the fraction of each matrix's entries dropped and regrown each time, in (0, 1).
        init_batches: training batches the ``"fisher"``/``"magnitude"`` scores sum over.
        seed: the draw of ``"random"``.

    Example::

        >>> SparseFT(density=0.01, selection="random").needs_data
        False
    """

    name = "sparse_ft"
    peft_type = "SHIRA"
    supported_description = "nn.Linear and bitsandbytes Linear4bit/Linear8bitLt"
    # How training proceeds, not what the trained tensors mean (the entries in use are in the checkpoint).
    resume_safe_arguments = ("regrow_every", "regrow_fraction", "init_batches")

    def __init__(
        self,
        density: float = 0.01,
        selection: Selection = "fisher",
        target_modules: TargetSpec = None,
        exclude_modules: TargetSpec = None,
        modules_to_save: Sequence[str] | None = None,
        regrow_every: int | None = None,
        regrow_fraction: float = 0.1,
        init_batches: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__(target_modules, exclude_modules, modules_to_save)
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not (0 < density <= 1):  # NaN fails too
            raise ValueError(
                f"SparseFT density must be in (0, 1] (the fraction of each matrix's entries that train), got density={density!r}"
            )
        if selection not in SELECTIONS:
            raise ValueError(f"unknown SparseFT selection {selection!r}; choose one of {', '.join(map(repr, SELECTIONS))}")
        if regrow_every is not None and (not _is_int(regrow_every) or regrow_every <= 0):
            raise ValueError(
                f"regrow_every must be None (no regrowth) or a positive integer number of steps, got regrow_every={regrow_every!r}"
            )
        if isinstance(regrow_fraction, bool) or not isinstance(regrow_fraction, (int, float)) or not (0 < regrow_fraction < 1):
            raise ValueError(
                f"regrow_fraction must be in (0, 1) (the fraction of entries dropped and regrown), got regrow_fraction={regrow_fraction!r}"
            )
        if not _is_int(init_batches) or init_batches <= 0:
            raise ValueError(f"init_batches must be a positive integer, got init_batches={init_batches!r}")
        if not _is_int(seed):
            raise ValueError(f"seed must be an integer, got seed={seed!r}")
        self.density = float(density)
        self.selection = selection
        self.regrow_every = regrow_every
        self.regrow_fraction = float(regrow_fraction)
        self.init_batches = init_batches
        self.seed = seed
        self._warned_no_optimizer = False

    # -- targets and layers -------------------------------------------------------------------------
    def supports(self, module: nn.Module) -> bool:
        # bitsandbytes' Linear4bit and Linear8bitLt are nn.Linear subclasses with the same in/out_features.
        return isinstance(module, nn.Linear)

    def find_targets(self, model: nn.Module) -> list[str]:
        return self.select_targets(model, ALL_LINEAR if self.target_modules is None else self.target_modules)

    def entries(self, out_features: int, in_features: int) -> int:
        """``k``: how many entries of an (out, in) matrix train."""
        return min(out_features * in_features, max(1, round(self.density * out_features * in_features)))

    def wrap(self, name: str, module: nn.Module) -> SparseFTLayer:
        return self.wrap_targets_of({name: module})[name]

    def wrap_targets(self, model: nn.Module, targets: list[str]) -> dict[str, AdapterLayer]:
        return dict(self.wrap_targets_of({name: model.get_submodule(name) for name in targets}))

    def wrap_targets_of(self, modules: dict[str, nn.Module]) -> dict[str, SparseFTLayer]:
        # One SHiRA rank for the whole adapter (peft's format has a single r): the largest any target needs.
        needed = [math.ceil(self.entries(m.out_features, m.in_features) / (m.out_features + m.in_features)) for m in modules.values()]
        shira_r = max(needed, default=1)
        layers = {}
        for name, module in modules.items():
            layer = SparseFTLayer(module, self.entries(module.out_features, module.in_features), shira_r=shira_r)
            if self.selection == "random":
                layer.set_indices(random_entries(layer.numel, layer.k, self._generator(name)))
            layers[name] = layer
        return layers

    def _generator(self, name: str) -> torch.Generator:
        # From the seed and the layer's name (crc32: stable across processes, unlike hash()), on the CPU: every
        # rank and every device type draws the same entries.
        return torch.Generator().manual_seed((self.seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63))

    # -- selection from data ---------------------------------------------------------------------------
    @property
    def needs_data(self) -> bool:
        return self.selection != "random"

    def initialise_from_data(
        self, model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[Any], Any], reduce: Callable[[Any], Any]
    ) -> None:
        """Select each layer's entries from the scores of ``selection`` over ``batches`` (averaged over the
        ranks by ``reduce``); the values restart at zero. See the module docstring for the scores and their cost."""
        if not self.needs_data:
            super().initialise_from_data(model, batches, loss_fn, reduce)
        layers = dict(sparse_layers(model))
        if not layers:
            raise ValueError(
                f"{type(model).__name__} has no SparseFT layers to select entries for (apply_peft(model, SparseFT(...)) first)"
            )
        fisher = self.selection == "fisher"
        scores = {
            name: torch.zeros(layer.out_features, layer.in_features, dtype=torch.float32, device=layer.values.device)
            for name, layer in layers.items()
        }

        def add(name: str, g: torch.Tensor, x: torch.Tensor) -> None:
            if fisher:
                gradient = g.T @ x  # this batch's dL/dW: the one transient (out, in) of the estimate
                scores[name].addcmul_(gradient, gradient)
            else:
                scores[name].addmm_(g.T, x)

        # The zero values give each output a gradient path without changing it (LoRA-GA's zero B).
        accumulate_weight_gradients(
            model, layers, [layer.values for layer in layers.values()], batches, loss_fn, add, method_name="SparseFT"
        )
        with torch.no_grad():
            for name, layer in layers.items():
                score = reduce(scores.pop(name))  # the signed sum for "magnitude": the mean gradient of all ranks
                layer.set_indices(top_entries(score.abs_() if not fisher else score, layer.k, name))

    # -- regrowth --------------------------------------------------------------------------------------
    @property
    def regrow_capture_steps(self) -> int:
        """Optimizer steps before each regrowth whose gradients are accumulated (SpIEL: 5 of every 20)."""
        return 0 if self.regrow_every is None else min(5, max(1, self.regrow_every // 4))

    def regrow_count(self, k: int, numel: int) -> int:
        """Entries dropped and regrown in a matrix of ``numel`` entries holding ``k``."""
        return min(max(1, round(self.regrow_fraction * k)), numel - k)

    def after_optimizer_step(
        self, model: nn.Module, global_step: int, reduce: Callable[[Any], Any], optimizers: Sequence[torch.optim.Optimizer] | None = None
    ) -> None:
        """Regrowth (``regrow_every``): after step ``global_step``, regrow when it is a multiple of ``regrow_every``,
        and capture gradients during the ``regrow_capture_steps`` steps before the next regrowth.

        ``optimizers``: whose state to reset for the regrown slots; ``None`` for the optimizers seen stepping the
        values (see the module docstring). ``reduce`` averages the captured gradients over the ranks.
        """
        if self.regrow_every is None or model is None:
            return
        layers = dict(sparse_layers(model))
        every = self.regrow_every
        if global_step % every == 0:
            # Every rank captured the same layers (one schedule, one model): the reduces below pair up.
            for layer in layers.values():
                if layer.capturing and layer.captured_batches > 0:
                    chosen = optimizers if optimizers is not None else seen_optimizers(layer.values)
                    if not chosen and not self._warned_no_optimizer:
                        self._warned_no_optimizer = True
                        rank_zero_warn(
                            "SparseFT regrowth found no optimizer holding the values (none stepped them yet, or it is not a "
                            "torch.optim.Optimizer): the regrown slots keep the dropped entries' optimizer state. Pass "
                            "after_optimizer_step(..., optimizers=[...])"
                        )
                    gradient = reduce(layer.stop_gradient_capture())
                    layer.regrow(gradient, self.regrow_count(layer.k, layer.numel), chosen or ())
            for layer in layers.values():
                layer.stop_gradient_capture()
        # Capture during step global_step + 1 when it is one of the last regrow_capture_steps before a regrowth.
        capture_next = global_step % every >= every - self.regrow_capture_steps
        for layer in layers.values():
            if capture_next:
                layer.start_gradient_capture()
            else:
                layer.stop_gradient_capture()

    # -- HF peft adapter_config.json (SHiRA) ------------------------------------------------------------
    def writes_peft_format(self, model: nn.Module) -> bool:
        """SHiRA when every matrix's padded count ``r * (in + out)`` fits in it (peft refuses more), else ours."""
        return all(layer.shira_entries <= layer.numel for _, layer in sparse_layers(model))

    def peft_config(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        ranks = {layer.shira_r for _, layer in sparse_layers(model)}
        if len(ranks) != 1:
            raise ValueError(f"SparseFT layers of one adapter must share one SHiRA rank, found {sorted(ranks)}")
        return {
            "peft_type": "SHIRA",
            "r": ranks.pop(),
            "mask_type": "random",
            "random_seed": None,
            "fan_in_fan_out": False,
            "init_weights": True,
        }

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> SparseFT:
        raise ValueError(
            f"this SHiRA adapter (r={config.get('r')!r}) was not written by lightning_peft: peft's SHiRA trains r * (in + out) "
            f"entries per matrix, a count no SparseFT density reproduces for every matrix. Load it with peft "
            f"(peft.PeftModel.from_pretrained); lightning_peft reads the SHiRA files its SparseFT writes"
        )


def sparse_layers(model: nn.Module) -> Iterable[tuple[str, SparseFTLayer]]:
    return ((name, layer) for name, layer in adapter_layers(model) if isinstance(layer, SparseFTLayer))


def random_entries(numel: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random set of ``k`` distinct flat indices in [0, numel), in O(k) memory (``randperm(numel)``
    would cost 8 bytes per entry of the matrix; it is used only when ``k`` is at least half of it)."""
    if 2 * k >= numel:
        return torch.randperm(numel, generator=generator)[:k]
    pool = torch.empty(0, dtype=torch.long)
    while pool.numel() < k:
        # The distinct values of i.i.d. uniform draws are a uniformly random subset given their count, and a
        # uniform k-subset of that is a uniform k-subset of [0, numel).
        draws = torch.randint(0, numel, (2 * (k - pool.numel()) + 16,), generator=generator)
        pool = torch.unique(torch.cat([pool, draws]))
    return pool[torch.randperm(pool.numel(), generator=generator)[:k]]


def top_entries(score: torch.Tensor, k: int, name: str = "") -> torch.Tensor:
    """The flat indices of the ``k`` largest entries of ``score``."""
    flat = score.reshape(-1)
    if not torch.isfinite(flat).all():
        raise ValueError(
            f"SparseFT's selection score of {name or 'a layer'} is not finite: the loss or its gradient diverged on the init batches"
        )
    return torch.topk(flat, k, sorted=False).indices


# -- which optimizers step SparseFT values ------------------------------------------------------------
# values Parameter -> the optimizers seen stepping it (weakly: neither outlives its owner). Keyed by identity:
# a tensor's == is elementwise, which a plain WeakKeyDictionary would call.
_OPTIMIZERS_OF: WeakIdKeyDictionary = WeakIdKeyDictionary()
_SCANNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> its parameter count when scanned
_HOOK: list[Any] = []


def _remember_optimizer(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    count = sum(len(group["params"]) for group in optimizer.param_groups)
    if _SCANNED.get(optimizer) == count:
        return  # scanned already (rescanned when add_param_group grew it)
    _SCANNED[optimizer] = count
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param in _OPTIMIZERS_OF:
                _OPTIMIZERS_OF[param].add(optimizer)


def _watch(values: nn.Parameter) -> None:
    if not _HOOK:
        _HOOK.append(register_optimizer_step_post_hook(_remember_optimizer))
    _OPTIMIZERS_OF[values] = weakref.WeakSet()


def seen_optimizers(values: nn.Parameter) -> list[torch.optim.Optimizer]:
    """The optimizers that have stepped ``values`` (a SparseFT layer's) so far."""
    return list(_OPTIMIZERS_OF.get(values, ()))


class SparseFTLayer(AdapterLayer):
    """``base_layer`` plus a sparse delta of ``k`` trained entries; see the module docstring for the math.

    ``values`` (k,) float32 is trained; ``indices`` (k,) int64, flat into the (out, in) weight, is a persistent
    buffer. Until entries are selected they are the placeholder ``0 .. k-1`` with zero values.
    """

    def __init__(self, base_layer: nn.Module, k: int, shira_r: int | None = None) -> None:
        super().__init__(base_layer)
        self.out_features, self.in_features = base_layer.out_features, base_layer.in_features
        if not 1 <= k <= self.numel:
            raise ValueError(f"SparseFTLayer: k={k} entries do not fit a {self.out_features} x {self.in_features} weight")
        self.k = k
        # The SHiRA rank of the adapter this layer is part of (one for all; SparseFT passes it), else its own.
        self.shira_r = shira_r if shira_r is not None else math.ceil(k / (self.out_features + self.in_features))
        device = base_layer.weight.device
        self.values = nn.Parameter(torch.zeros(k, dtype=torch.float32, device=device))
        self.register_buffer("indices", torch.arange(k, dtype=torch.long, device=device))
        self._gradient: torch.Tensor | None = None  # the dense accumulator, only while capturing for a regrowth
        self.captured_batches = 0
        _watch(self.values)

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def shira_entries(self) -> int:
        """``K = r * (in + out)``: the entries of this matrix in a SHiRA file (``k`` and zero padding)."""
        return self.shira_r * (self.in_features + self.out_features)

    @torch.no_grad()
    def set_indices(self, indices: torch.Tensor) -> None:
        """Train the entries at the flat ``indices`` (k distinct), from zero. Sorted: row-major, CSR's own order."""
        indices = indices.reshape(-1).to(device=self.indices.device, dtype=torch.long)
        self._check_indices(indices)
        self.indices.copy_(torch.sort(indices).values)
        self.values.zero_()

    def _check_indices(self, indices: torch.Tensor) -> None:
        if indices.numel() != self.k:
            raise ValueError(f"SparseFTLayer holds k={self.k} entries, got {indices.numel()} indices")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.numel):
            raise ValueError(f"SparseFT indices must lie in [0, {self.numel}) for a {self.out_features} x {self.in_features} weight")
        if torch.unique(indices).numel() != indices.numel():
            raise ValueError("SparseFT indices must be distinct (a repeated entry would be trained twice)")

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return result
        out = result + sparse_delta(x, self.values, self.indices, self.out_features, self.in_features).to(result.dtype)
        if self._gradient is not None and out.requires_grad:
            self._capture(x.detach(), out)
        return out

    # -- gradient capture for regrowth ------------------------------------------------------------------
    @property
    def capturing(self) -> bool:
        return self._gradient is not None

    def start_gradient_capture(self) -> None:
        """Accumulate ``dL/dW`` (dense, float32) over the following backward passes, until stopped."""
        if self._gradient is None:
            self._gradient = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=self.values.device)
            self.captured_batches = 0

    def stop_gradient_capture(self) -> torch.Tensor | None:
        """Stop capturing; returns the accumulated gradient (None if not capturing) and frees it here."""
        gradient, self._gradient = self._gradient, None
        return gradient

    def _capture(self, x: torch.Tensor, out: torch.Tensor) -> None:
        gradient = self._gradient

        def accumulate(grad: torch.Tensor) -> None:
            # dL/dW = sum over tokens of g_t x_t^T (as lora_ga's estimate), added to this capture's sum
            gradient.addmm_(grad.reshape(-1, grad.shape[-1]).T.float(), x.reshape(-1, x.shape[-1]).float())
            self.captured_batches += 1

        out.register_hook(accumulate)

    # -- regrowth -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def regrow(self, gradient: torch.Tensor, count: int, optimizers: Iterable[torch.optim.Optimizer] = ()) -> torch.Tensor:
        """Drop the ``count`` entries with the smallest ``|value|`` and put their slots at the ``count`` positions
        not held with the largest ``|gradient|`` (dense (out, in); consumed), from zero, with fresh optimizer state.
        Returns the slots that moved."""
        count = min(count, self.numel - self.k)
        if count <= 0:
            return torch.empty(0, dtype=torch.long, device=self.values.device)
        score = gradient.reshape(-1).abs_()
        if not torch.isfinite(score).all():
            raise ValueError("SparseFT regrowth: the accumulated gradient is not finite (the run diverged)")
        score[self.indices] = -math.inf  # only positions this matrix does not hold yet
        grown = torch.topk(score, count).indices
        slots = torch.topk(self.values.detach().abs(), count, largest=False).indices
        self.indices[slots] = grown
        self.values[slots] = 0
        if self.values.grad is not None:
            self.values.grad[slots] = 0
        self.reset_optimizer_state(optimizers, slots)
        return slots

    @torch.no_grad()
    def reset_optimizer_state(self, optimizers: Iterable[torch.optim.Optimizer], slots: torch.Tensor) -> None:
        """Zero ``slots`` of ``values`` in every per-entry state tensor of ``optimizers`` (Adam's moments, SGD's
        momentum); scalar state (Adam's ``step``) is shared by all entries and left alone."""
        for optimizer in optimizers:
            state = optimizer.state.get(self.values)
            for key, value in (state or {}).items():
                if not isinstance(value, torch.Tensor) or value.ndim == 0:
                    continue
                if value.shape != self.values.shape:
                    raise ValueError(
                        f"cannot reset the {type(optimizer).__name__} state {key!r} of regrown SparseFT entries: it has shape "
                        f"{list(value.shape)}, not the values' {list(self.values.shape)} (a factored or sharded optimizer state)"
                    )
                value[slots.to(value.device)] = 0

    # -- merging and files -------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        return scatter_dense(self.values, self.indices, self.out_features, self.in_features)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return add_at(weight, self.values, self.indices)  # no dense delta; the other entries keep their bits

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        return add_at(merged, -self.values.detach(), self.indices)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """SHiRA's tensors: the ``k`` entries first, then zero-valued padding at the first positions not held."""
        pad = self.shira_entries - self.k
        if pad < 0 or self.shira_entries > self.numel:
            raise ValueError(f"a {self.out_features} x {self.in_features} SparseFT layer has no SHiRA form with r={self.shira_r}")
        candidates = torch.arange(self.shira_entries, device=self.indices.device)
        extra = candidates[~torch.isin(candidates, self.indices)][:pad]  # at most k of the first K are held
        flat = torch.cat([self.indices, extra])
        rows, cols = flat // self.in_features, flat % self.in_features
        return {
            "shira_indices": torch.stack([rows, cols]).to(torch.int32),
            "shira_weight": torch.cat([self.values.detach(), self.values.new_zeros(pad)]),
        }

    @torch.no_grad()
    def load_peft_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        rows, cols = tensors["shira_indices"].to(device=self.indices.device, dtype=torch.long)
        weight = tensors["shira_weight"].to(device=self.values.device, dtype=self.values.dtype)
        if bool((rows < 0).any() or (rows >= self.out_features).any() or (cols < 0).any() or (cols >= self.in_features).any()):
            raise ValueError(f"SHiRA indices outside the {self.out_features} x {self.in_features} weight")
        if bool(weight[self.k :].ne(0).any()):
            raise ValueError(
                f"this SHiRA file has non-zero values beyond the first {self.k} entries of a matrix (the zero padding "
                f"lightning_peft writes was trained further, e.g. in peft): a SparseFT layer of this density cannot hold them"
            )
        flat = (rows * self.in_features + cols)[: self.k]
        self._check_indices(flat)
        self.indices.copy_(flat)
        self.values.copy_(weight[: self.k])

    def extra_repr(self) -> str:
        return f"k={self.k}, density={self.k / self.numel:.4g}"

"""Inference-time intervention: Li, Patel, Viegas, Pfister and Wattenberg, 2023, "Inference-Time
Intervention: Eliciting Truthful Answers from a Language Model" (NeurIPS 2023, arXiv:2306.03341).

No weight trains and no gradient is taken. From labelled examples of two classes (class 0 and class 1), ITI
reads every attention head's output at each example's last token, fits a linear probe per head, keeps the
``num_heads`` heads whose probes classify held-out examples best, and from then on adds a fixed shift to
those heads' outputs at every position::

    head_h(x) <- head_h(x) + alpha * sigma_h * theta_h        for the selected heads h

``theta_h`` is a unit direction from class 0 to class 1 (``direction="mass_mean"``: the difference of the class
means, the paper's best variant; ``"probe"``: the probe's weight vector), ``sigma_h`` the standard deviation of
the head's activations along ``theta_h``, and ``alpha`` the strength (positive steers towards class 1, negative
towards class 0; ``alpha=0`` is the base model exactly). The probes, directions and ``sigma`` come from
:mod:`lightning_peft.core.head_probes`, whose statistics are sums that average across DDP ranks, so every rank
selects the same heads (the paper's probe is a logistic regression on gathered activations; ours is a
ridge least-squares linear probe, which needs no gathering: see that module).

**Where the shift goes.** The heads' outputs are concatenated into the input of the attention output
projection (Llama's ``o_proj``, BERT's ``attention.output.dense``, GPT-2's ``attn.c_proj``): head ``h`` owns
the slice ``[h * d, (h + 1) * d)`` of that input. :class:`ITILayer` wraps the projection and adds the shift
vector ``s`` to its input: ``y = W (x + s) + b``. That is ``W x + (b + W s)``: a constant, so it **folds into
the projection's bias exactly**. ``merge_adapters`` and ``save_merged`` produce a plain transformers model whose
output projections carry ``b + W s``; where the architecture has no bias there, the merge adds one, and a
saved model switches its config's ``attention_bias`` on (with zero biases on the other projections it
covers: :mod:`lightning_peft.core.bias_switch`). Architectures that cannot (Mistral) are refused before
anything changes.

**Fitting.** Through a Trainer, ``PEFTCallback(ITI(...))`` with a data module of labelled examples (a batch
holds ``input_ids``, ``attention_mask`` and ``labels`` of shape (batch,) in {0, 1}: the
``ClassificationDataModule``) reads ``init_batches`` training batches when fitting starts, fits, installs the
intervention and ends ``fit`` before any optimizer step (the method trains nothing). Without a Trainer:
``ITI(...).fit(model, dataloader)``. Each example goes to the probe's training rows or, with probability
``validation_fraction``, to the held-out rows that rank the heads (a draw from ``seed`` and the batch's
position, the same on every run).

**Files.** The adapter file (lightning_peft's own format; peft has no ITI) holds per wrapped projection
the unit directions, ``sigma``, which heads are selected and each head's probe accuracy; ``alpha`` is in the
method config. :func:`steering_strength` changes ``alpha`` for a block of code (to sweep it without refitting).
Float ``nn.Linear`` and GPT-2 ``Conv1D`` projections are supported (a k-bit projection has no float weight to
fold the shift into).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, get_args

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_peft.core.adapter_layer import AdapterLayer, adapter_layers, is_kbit_weight
from lightning_peft.core.blocks import transformer_blocks
from lightning_peft.core.head_probes import HeadStatistics, probe_correct, top_heads, unit_rows
from lightning_peft.core.injection import apply_peft
from lightning_peft.core.targets import TargetSpec
from lightning_peft.methods.base import PEFTMethod

Direction = Literal["mass_mean", "probe"]
DIRECTIONS: tuple[str, ...] = get_args(Direction)

#: model_type -> the attention output projection inside each block (its input is the heads' concatenated outputs).
ATTENTION_OUTPUTS: dict[str, str] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo", "olmo2"), "self_attn.o_proj"),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), "attention.output.dense"),
    "gpt2": "attn.c_proj",
}


class ITI(PEFTMethod):
    """Inference-time intervention config: ``PEFTCallback(ITI(num_heads=48, alpha=15))``.

    Args:
        num_heads: how many attention heads (over all layers) are steered: the top ones by probe accuracy.
        alpha: the strength, in standard deviations of each head's activations; finite; 0 is the base model.
        direction: ``"mass_mean"`` (class-1 mean minus class-0 mean) or ``"probe"`` (the probe's weights).
        layers: block indices whose heads may be chosen (``None``: all).
        init_batches: training batches read when fitting through a Trainer.
        validation_fraction: share of the examples held out to rank the heads, in (0, 1).
        ridge: the probes' ridge strength, relative to the mean squared activation (>= 0).
        seed: the draw of the held-out examples.
        target_modules: the attention output projections, for architectures without a default
            (:data:`ATTENTION_OUTPUTS`); one per block.
        exclude_modules: names or regex removed from the targets.
        modules_to_save: modules saved whole beside the intervention (nothing trains them here).

    Example::

        >>> ITI(num_heads=8, alpha=5.0).direction
        'mass_mean'
    """

    name = "iti"
    has_peft_format = False
    supported_description = "a float nn.Linear or transformers Conv1D attention output projection"
    composes_inputs = False
    trains_parameters = False

    def __init__(
        self,
        num_heads: int = 48,
        alpha: float = 15.0,
        direction: Direction = "mass_mean",
        layers: Sequence[int] | None = None,
        init_batches: int = 16,
        validation_fraction: float = 0.3,
        ridge: float = 1e-2,
        seed: int = 0,
        target_modules: TargetSpec = None,
        exclude_modules: TargetSpec = None,
        modules_to_save: Sequence[str] | None = None,
    ) -> None:
        super().__init__(target_modules, exclude_modules, modules_to_save)
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads={num_heads!r}: give how many attention heads to steer, an integer >= 1")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise ValueError(f"alpha={alpha!r}: the steering strength must be a finite number (0 leaves the model unchanged)")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction={direction!r}; choose one of {list(DIRECTIONS)}")
        if isinstance(init_batches, bool) or not isinstance(init_batches, int) or init_batches < 1:
            raise ValueError(f"init_batches={init_batches!r}: ITI reads at least one labelled training batch")
        if not 0 < validation_fraction < 1:
            raise ValueError(f"validation_fraction={validation_fraction!r}: the held-out share must be in (0, 1)")
        if not ridge >= 0:
            raise ValueError(f"ridge={ridge!r}: the probes' ridge strength must be >= 0")
        self.num_heads = num_heads
        self.alpha = float(alpha)
        self.direction = direction
        self.layers = list(layers) if layers is not None else None
        self.init_batches = init_batches
        self.validation_fraction = validation_fraction
        self.ridge = ridge
        self.seed = seed

    #: ``alpha`` changes the strength, not what was fitted: a resumed run may use another.
    resume_safe_arguments = ("alpha",)

    @property
    def needs_data(self) -> bool:
        return True

    def supports(self, module: nn.Module) -> bool:
        from transformers.pytorch_utils import Conv1D

        return isinstance(module, (nn.Linear, Conv1D)) and not is_kbit_weight(module.weight)

    # -- targets: one attention output projection per chosen block ------------------------------------
    def find_targets(self, model: nn.Module) -> list[str]:
        blocks = transformer_blocks(model)
        if self.target_modules is not None:
            spec = self.target_modules
        else:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            if model_type not in ATTENTION_OUTPUTS:
                raise ValueError(
                    f"ITI knows no attention output projection for model type {model_type!r} (known: "
                    f"{', '.join(sorted(ATTENTION_OUTPUTS))}). Pass target_modules naming the projection whose input is "
                    f"the heads' concatenated outputs, e.g. ['self_attn.o_proj']"
                )
            spec = [ATTENTION_OUTPUTS[model_type]]
        targets = self.select_targets(model, spec)
        owners = [next((i for i, block in enumerate(blocks) if name.startswith(block + ".")), None) for name in targets]
        if None in owners or len(set(owners)) != len(owners):
            raise ValueError(
                f"ITI needs exactly one attention output projection per transformer block; {spec!r} selected {targets[:4]} "
                f"in blocks {owners[:4]}"
            )
        if self.layers is not None:
            bad = [i for i in self.layers if not isinstance(i, int) or not 0 <= i < len(blocks)]
            if bad:
                raise ValueError(f"layers={self.layers!r}: {bad} out of range; this model has blocks 0 .. {len(blocks) - 1}")
            targets = [name for name, owner in zip(targets, owners) if owner in set(self.layers)]
        return targets

    def wrap_targets(self, model: nn.Module, targets: list[str]) -> dict[str, AdapterLayer]:
        heads = _heads_per_layer(model)
        total = heads * len(targets)
        if self.num_heads > total:
            raise ValueError(
                f"num_heads={self.num_heads}, but the {len(targets)} steerable layers have {total} attention heads "
                f"({heads} each); choose at most {total}"
            )
        return {name: ITILayer(model.get_submodule(name), heads, self.alpha) for name in targets}

    # -- fitting --------------------------------------------------------------------------------------
    def fit(self, model: nn.Module, batches: Iterable[Any]) -> nn.Module:
        """Without a Trainer: apply ITI to ``model`` (if not yet) and fit it on every batch of ``batches`` (a
        DataLoader of labelled examples). Returns ``model``."""
        apply_peft(model, self)
        self.initialise_from_data(model, enumerate(batches), None, lambda tensor: tensor)
        return model

    @torch.no_grad()
    def initialise_from_data(
        self, model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[Any], Any] | None, reduce: Callable[[Any], Any]
    ) -> None:
        """Read the heads' activations on ``batches`` (``(index, batch)`` pairs; ``loss_fn`` is not used: nothing
        trains), fit the probes, and install the directions in the wrapped projections."""
        layers = [layer for _, layer in adapter_layers(model) if isinstance(layer, ITILayer)]
        if not layers:
            raise ValueError("ITI.initialise_from_data: this model has no ITI layers; apply_peft(model, ITI(...)) first")
        heads, width = layers[0].heads, layers[0].head_dim
        device = layers[0].iti_directions.device
        statistics = HeadStatistics.zeros(len(layers) * heads, width, device)
        held_x, held_labels = [], []
        parameter = next(model.parameters())  # where the inputs go
        was_training = model.training
        model.eval()  # dropout off: the activations the intervention will see at inference
        try:
            with _capture_last_token(layers) as capture:
                for index, batch in batches:
                    input_ids, attention_mask, labels = _labelled_batch(batch)
                    capture.positions = _last_positions(attention_mask).to(input_ids.device)
                    model(input_ids=input_ids.to(parameter.device), attention_mask=attention_mask.to(parameter.device))
                    x = capture.take(heads, width)  # (N, G, d)
                    held = self._held_out(index, len(labels))
                    statistics.add(x[~held], labels[~held])
                    held_x.append(x[held].to(device, torch.float64))
                    held_labels.append(labels[held])
        finally:
            model.train(was_training)
        if not held_labels:
            raise ValueError("ITI got no batches of labelled examples to fit on (the data loader is empty)")
        statistics = statistics.reduced(reduce)
        if (statistics.class_count == 0).any():
            seen = [label for label in (0, 1) if statistics.class_count[label] > 0]
            raise ValueError(
                f"ITI needs examples of both classes (labels 0 and 1); the probes' training rows hold only class {seen}. "
                f"Use data with both labels, or more init_batches"
            )
        weights = statistics.probe_weights(self.ridge)
        x_held, y_held = torch.cat(held_x), torch.cat(held_labels)
        correct = reduce(probe_correct(weights, x_held, y_held))
        total = reduce(torch.tensor(float(len(y_held)), dtype=torch.float64, device=correct.device))
        if float(total) == 0:
            raise ValueError(
                f"ITI held out no example to rank the heads (validation_fraction={self.validation_fraction} of "
                f"{int(statistics.class_count.sum())} examples); use more data or a larger validation_fraction"
            )
        accuracy = correct / total
        directions = statistics.mass_mean_directions() if self.direction == "mass_mean" else unit_rows(weights[:, :-1])
        sigma = statistics.sigma_along(directions)
        selected = torch.zeros(len(layers) * heads, dtype=torch.bool)
        selected[top_heads(accuracy, self.num_heads)] = True
        for i, layer in enumerate(layers):
            part = slice(i * heads, (i + 1) * heads)
            layer.install(directions[part], sigma[part], selected[part], accuracy[part])
        best = accuracy[selected].mean()
        rank_zero_info(
            f"lightning_peft: ITI steers {self.num_heads} of {len(selected)} heads (mean held-out probe accuracy "
            f"{float(best):.3f}, best head {float(accuracy.max()):.3f}) with alpha={self.alpha}"
        )

    def _held_out(self, batch_index: int, rows: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + batch_index)
        return torch.rand(rows, generator=generator) < self.validation_fraction


def _heads_per_layer(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"ITI needs the model's number of attention heads (config.num_attention_heads); {type(model).__name__} has none")
    return heads


def _labelled_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)`` of a classification batch, checked."""
    if not isinstance(batch, dict) or "input_ids" not in batch or "labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"ITI needs batches with input_ids and one class label per example (labels); got {keys}")
    input_ids, labels = batch["input_ids"], torch.as_tensor(batch["labels"])
    mask = batch.get("attention_mask")
    attention_mask = torch.ones_like(input_ids) if mask is None else mask
    if labels.ndim != 1 or labels.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"ITI needs one class label per example (labels of shape ({input_ids.shape[0]},)), got labels of shape "
            f"{tuple(labels.shape)}: use a classification data module (ClassificationDataModule), not a language-modelling one"
        )
    stray = sorted({int(v) for v in labels.tolist()} - {0, 1})
    if stray:
        raise ValueError(f"ITI steers between two classes labelled 0 and 1; the batch has labels {stray}")
    return input_ids, attention_mask, labels.cpu()


def _last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's last attended position (right or left padding alike)."""
    length = attention_mask.shape[1]
    return length - 1 - attention_mask.flip(1).to(torch.long).argmax(1)


class _LastTokenCapture:
    def __init__(self) -> None:
        self.positions: torch.Tensor | None = None
        self.rows: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> None:
        assert self.positions is not None
        self.rows.append(x[torch.arange(x.shape[0], device=x.device), self.positions].float())

    def take(self, heads: int, width: int) -> torch.Tensor:
        x = torch.stack(self.rows, dim=1)  # (N, layers, heads * d)
        self.rows = []
        return x.reshape(x.shape[0], -1, width).cpu()  # (N, layers * heads, d)


@contextlib.contextmanager
def _capture_last_token(layers: list[ITILayer]) -> Iterator[_LastTokenCapture]:
    capture = _LastTokenCapture()
    for layer in layers:
        layer.capture = capture
        layer.clear()  # read the base model's heads, not an earlier intervention's
    try:
        yield capture
    finally:
        for layer in layers:
            layer.capture = None


class ITILayer(AdapterLayer):
    """An attention output projection whose input gets the heads' steering shift: ``W (x + s) + b``."""

    def __init__(self, base_layer: nn.Module, heads: int, alpha: float) -> None:
        super().__init__(base_layer)
        from transformers.pytorch_utils import Conv1D

        self.transposed = isinstance(base_layer, Conv1D)  # W stored (in, out)
        in_features = base_layer.weight.shape[0] if self.transposed else base_layer.weight.shape[1]
        if in_features % heads:
            raise ValueError(f"the projection's input width {in_features} is not a multiple of the {heads} attention heads")
        self.heads, self.head_dim = heads, in_features // heads
        self.alpha = float(alpha)
        device = base_layer.weight.device
        self.register_buffer("iti_directions", torch.zeros(heads, self.head_dim, device=device))  # unit rows
        self.register_buffer("iti_sigma", torch.zeros(heads, device=device))
        self.register_buffer("iti_selected", torch.zeros(heads, dtype=torch.bool, device=device))
        self.register_buffer("iti_probe_accuracy", torch.zeros(heads, device=device))  # held-out, for the record
        self.capture: Callable[[torch.Tensor], None] | None = None
        self._created_bias = False

    @torch.no_grad()
    def install(self, directions: torch.Tensor, sigma: torch.Tensor, selected: torch.Tensor, accuracy: torch.Tensor) -> None:
        self.iti_directions.copy_(directions)
        self.iti_sigma.copy_(sigma)
        self.iti_selected.copy_(selected)
        self.iti_probe_accuracy.copy_(accuracy)

    @torch.no_grad()
    def clear(self) -> None:
        for buffer in (self.iti_directions, self.iti_sigma, self.iti_selected, self.iti_probe_accuracy):
            buffer.zero_()

    def shift(self) -> torch.Tensor:
        """``s`` (in_features,) float32: ``alpha * sigma_h * theta_h`` in the slice of each selected head, zero elsewhere."""
        scale = self.alpha * self.iti_sigma * self.iti_selected
        return (scale[:, None] * self.iti_directions).reshape(-1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.capture is not None:
            self.capture(x)
        if self.disabled or self.merged or self.alpha == 0 or not bool(self.iti_selected.any()):
            return self.base_layer(x, *args, **kwargs)
        return self.base_layer(x + self.shift().to(x.dtype), *args, **kwargs)

    # -- merging: the shift is a constant, W s joins the bias -----------------------------------------
    def _bias_change(self) -> torch.Tensor:
        weight = self.base_layer.weight.float()
        shift = self.shift().to(weight.device)
        return shift @ weight if self.transposed else weight @ shift

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        return merged

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias + self._bias_change().to(bias.device)

    def unmerged_bias(self, merged: torch.Tensor) -> torch.Tensor:
        return merged - self._bias_change().to(merged.device)

    def merge(self) -> None:
        if self.merged:
            return
        if getattr(self.base_layer, "bias", None) is None:
            weight = self.base_layer.weight
            out_features = weight.shape[1] if self.transposed else weight.shape[0]
            self.base_layer.bias = nn.Parameter(torch.zeros(out_features, dtype=weight.dtype, device=weight.device), requires_grad=False)
            self._created_bias = True
        super().merge()

    def unmerge(self) -> None:
        if not self.merged:
            return
        super().unmerge()
        if self._created_bias:
            self.base_layer.bias = None
            self._created_bias = False

    @property
    def adds_bias(self) -> bool:
        """Whether merging gives the base projection a bias it did not have."""
        return self._created_bias or getattr(self.base_layer, "bias", None) is None

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, alpha={self.alpha}, steered={int(self.iti_selected.sum())}"


@contextlib.contextmanager
def steering_strength(model: nn.Module, alpha: float) -> Iterator[nn.Module]:
    """Run ``model``'s ITI layers at strength ``alpha`` inside the block: ``with steering_strength(model, 5): ...``."""
    if not math.isfinite(alpha):
        raise ValueError(f"alpha={alpha!r}: the steering strength must be a finite number")
    layers = [layer for _, layer in adapter_layers(model) if isinstance(layer, ITILayer)]
    if not layers:
        raise ValueError("steering_strength: this model has no ITI layers")
    if any(layer.merged for layer in layers):
        raise ValueError("steering_strength: the intervention is merged into the biases; unmerge it first")
    previous = [layer.alpha for layer in layers]
    for layer in layers:
        layer.alpha = float(alpha)
    try:
        yield model
    finally:
        for layer, value in zip(layers, previous):
            layer.alpha = value

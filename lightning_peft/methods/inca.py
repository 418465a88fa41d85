"""InCA: Dukler, Achille, Yang, Xia, Ravichandran, Polito, Soatto and Bhotika, 2023, "Your representations are in
the network: composable and parallel adaptation for large scale models" (NeurIPS 2023, arXiv:2305.04106).

The backbone is frozen and runs once per batch **without gradient**. Small cross-attention adapters read its
intermediate activations: each one has a few learned queries that attend over the token activations ``h_l``
(B, T, width) of one chosen block ``l``, and a linear head on what they read::

    z = mean_q MultiHeadAttention(queries, LayerNorm(h_l), LayerNorm(h_l))      queries: (num_queries, hidden)
    logits_l = Linear(LayerNorm(z))                                              (B, num_classes)

One adapter per block in ``layers``, all fed by the same forward pass: the backbone's cost is paid once, and since
nothing in it requires a gradient, none of its activations is kept for a backward pass (only the chosen blocks'
outputs, which the adapters read). The loss is the **sum** of the adapters' cross-entropies: each adapter's
parameters receive the gradient of its own loss only, so with a per-parameter optimizer (SGD, Adam, AdamW) the N
adapters train exactly as N separate runs on the same batches would. A global gradient-norm clip would couple
them (it scales all by one norm): leave ``gradient_clip_val`` unset. The adapters are independent, so they
compose: :func:`keep_adapters` keeps any subset, before or after loading a file.

**What the model returns.** ``model(input_ids, attention_mask, labels)`` returns the backbone's output with
``loss`` replaced by the adapters' summed loss and ``logits`` by the *active* adapter's (the best on the latest
finished validation, the first before any; during a validation epoch it is the previous one's best): ``SequenceClassificationTask`` and a user's own module train and validate it
unchanged. ``PEFTCallback`` logs each adapter's training loss (``train_loss/inca_layer_<l>``) and validation
accuracy (``val_accuracy/inca_layer_<l>``, counts summed over DDP ranks), and the best one (``inca_best_layer``).

**Where the activations come from.** A forward hook on each chosen transformer block reads its output: the
residual stream after block ``l`` (``hidden_states[l + 1]`` of ``output_hidden_states``, except that transformers
applies the final norm to the last of those). The backbone runs in eval mode (dropout off) even while the adapters
train, and under ``torch.no_grad``.

Files: lightning_peft's own format (every adapter's tensors under ``lightning_peft_inca.adapters.layer_<l>``; peft
has no InCA). Supported: sequence classification with two or more classes, on encoders (BERT, MiniLM) and
decoders used as classifiers (``AutoModelForSequenceClassification`` of Llama/SmolLM2). Language modelling and
regression are refused.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, Literal, Union

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_peft.core.adapter_layer import AdapterModule
from lightning_peft.core.blocks import hidden_size, transformer_blocks
from lightning_peft.core.injection import METHOD_ATTRIBUTE, injected_method
from lightning_peft.methods.base import PEFTMethod

#: Where the adapters sit in the model (one attribute, like the other attached methods).
ATTRIBUTE = "lightning_peft_inca"
_LANGUAGE_MODEL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForConditionalGeneration")


class InCA(PEFTMethod):
    """InCA config: ``PEFTCallback(InCA(layers=[2, 3, 4, 5], num_queries=1, heads=4))``.

    Args:
        layers: block indices to read (one adapter each), or ``"all"``.
        num_queries: learned queries per adapter.
        heads: attention heads of each adapter's cross-attention (``hidden`` must be a multiple).
        hidden: the adapters' width; ``None`` for the backbone's hidden size.
        num_classes: classes of the task; ``None`` for ``config.num_labels``.
        seed: each adapter's initial weights are drawn from ``(seed, layer)``, so an adapter starts the same
            whichever other adapters train beside it.
    """

    name = "inca"
    has_peft_format = False
    composes_with_others = (
        "InCA runs the backbone without gradient, so another method's tensors inside it would never train (and a "
        "block LayerDrop skips would leave its adapter nothing to read); train them in separate runs"
    )
    supported_description = "no layer (InCA attaches adapters beside the frozen backbone)"

    def __init__(
        self,
        layers: Union[Literal["all"], Sequence[int]] = "all",
        num_queries: int = 1,
        heads: int = 4,
        hidden: int | None = None,
        num_classes: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if layers != "all":
            if isinstance(layers, (str, int)) or not layers or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
                raise ValueError(f"layers={layers!r}: give 'all' or a non-empty list of block indices")
            if len(set(layers)) != len(layers):
                raise ValueError(f"layers={layers!r} names a block twice; each block gets one adapter")
        for arg, value in (("num_queries", num_queries), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg}={value!r}: must be an integer >= 1")
        if hidden is not None and (not isinstance(hidden, int) or hidden < 1 or hidden % heads):
            raise ValueError(f"hidden={hidden!r}: the adapters' width must be a positive multiple of heads={heads}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes={num_classes!r}: InCA classifies into 2 or more classes (regression is not supported)")
        self.layers = "all" if layers == "all" else list(layers)
        self.num_queries = num_queries
        self.heads = heads
        self.hidden = hidden
        self.num_classes = num_classes
        self.seed = seed

    def supports(self, module: nn.Module) -> bool:
        return False  # wraps no layer

    def find_targets(self, model: nn.Module) -> list[str]:
        return []

    def attach(self, model: nn.Module) -> list[str]:
        if hasattr(model, ATTRIBUTE):
            raise ValueError(f"{type(model).__name__} already has InCA adapters ({ATTRIBUTE}); give one InCA all its layers")
        blocks = transformer_blocks(model)
        layers = list(range(len(blocks))) if self.layers == "all" else self.layers
        bad = [i for i in layers if not 0 <= i < len(blocks)]
        if bad:
            raise ValueError(f"InCA layers={self.layers!r}: {bad} out of range; this model has blocks 0 .. {len(blocks) - 1}")
        classes = self._classes(model)
        width = hidden_size(model)
        hidden = self.hidden or width
        if hidden % self.heads:
            raise ValueError(f"InCA heads={self.heads} does not divide the adapters' width {hidden}; pass hidden= or other heads")
        device = next(model.parameters()).device
        adapters = {}
        for layer in layers:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 100_003 + layer)  # the same start beside any other adapters
                adapters[f"layer_{layer}"] = CrossAttentionAdapter(width, hidden, self.num_queries, self.heads, classes).to(device)
        InCAAdapters(adapters, {f"layer_{i}": model.get_submodule(blocks[i]) for i in layers}).attach(model)
        return [ATTRIBUTE]

    def _classes(self, model: nn.Module) -> int:
        kind = type(model).__name__
        if kind.endswith(_LANGUAGE_MODEL_SUFFIXES):
            raise ValueError(
                f"InCA classifies sequences; {kind} is a language model. Load the backbone as a classifier "
                f"(AutoModelForSequenceClassification, num_labels=...) or use another method for language modelling"
            )
        config = getattr(model, "config", None)
        if getattr(config, "problem_type", None) == "regression" or (self.num_classes is None and getattr(config, "num_labels", 2) < 2):
            raise ValueError(
                f"InCA classifies into 2 or more classes; this model is set up for regression "
                f"(problem_type={getattr(config, 'problem_type', None)!r}, num_labels={getattr(config, 'num_labels', None)})"
            )
        return self.num_classes or int(getattr(config, "num_labels", 2))

    # -- what the callback logs ----------------------------------------------------------------------
    def training_metrics(self, model: nn.Module) -> dict[str, torch.Tensor]:
        adapters = getattr(model, ATTRIBUTE, None)
        if adapters is None or adapters.last_losses is None:
            return {}
        return {f"train_loss/inca_{name}": loss for name, loss in zip(adapters.adapters, adapters.last_losses)}

    def validation_metrics(self, model: nn.Module, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        adapters = getattr(model, ATTRIBUTE, None)
        if adapters is None:
            return {}
        correct, total = reduce_sum(adapters.correct.clone()), reduce_sum(adapters.total.clone())
        adapters.correct.zero_()
        adapters.total.zero_()
        if float(total) == 0:
            return {}
        accuracy = correct / total
        names = list(adapters.adapters)
        best = int(torch.argmax(accuracy))  # ties: the first (lowest layer)
        adapters.active = best
        rank_zero_info(f"lightning_peft: best InCA adapter on validation: {names[best]} (accuracy {float(accuracy[best]):.4f})")
        metrics = {f"val_accuracy/inca_{name}": float(a) for name, a in zip(names, accuracy)}
        metrics["inca_best_layer"] = float(adapters.layers[best])
        return metrics


class CrossAttentionAdapter(nn.Module):
    """Learned queries attending over one block's token activations, then a linear head."""

    def __init__(self, width: int, hidden: int, num_queries: int, heads: int, num_classes: int) -> None:
        super().__init__()
        self.input_norm = nn.LayerNorm(width)
        self.queries = nn.Parameter(torch.randn(num_queries, hidden) * hidden**-0.5)
        self.attention = nn.MultiheadAttention(hidden, heads, kdim=width, vdim=width, batch_first=True)
        self.output_norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, activations: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        keys = self.input_norm(activations.float())
        queries = self.queries.expand(keys.shape[0], -1, -1)
        padding = None if attention_mask is None else attention_mask == 0
        read, _ = self.attention(queries, keys, keys, key_padding_mask=padding, need_weights=False)
        return self.classifier(self.output_norm(read.mean(dim=1)))


class InCAAdapters(AdapterModule):
    """The adapters, the hooks that hand them the chosen blocks' outputs, and the model forward that runs the
    backbone without gradient and returns the adapters' loss and logits."""

    def __init__(self, adapters: dict[str, CrossAttentionAdapter], blocks: dict[str, nn.Module]) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict(adapters)
        self.layers = [int(name.removeprefix("layer_")) for name in adapters]
        self.active = 0
        self.last_losses: torch.Tensor | None = None
        self.register_buffer("correct", torch.zeros(len(adapters), dtype=torch.float64), persistent=False)
        self.register_buffer("total", torch.zeros((), dtype=torch.float64), persistent=False)
        self._blocks = blocks
        self._captured: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []

    # -- attaching ----------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        model.add_module(ATTRIBUTE, self)
        self._hook_blocks()
        model.forward = InCAForward(model, self)  # on the instance: the class and the state dict stay

    def _hook_blocks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = [block.register_forward_hook(self._reader(name)) for name, block in self._blocks.items()]

    def _reader(self, name: str) -> Callable[..., None]:
        def read(module: nn.Module, args: Any, output: Any) -> None:
            self._captured[name] = output[0] if isinstance(output, tuple) else output

        return read

    def detach(self, model: nn.Module) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if isinstance(vars(model).get("forward"), InCAForward):
            del model.forward
        delattr(model, ATTRIBUTE)

    def keep(self, names: list[str]) -> None:
        for name in [n for n in self.adapters if n not in names]:
            del self.adapters[name]
            self._blocks.pop(name)
        self.layers = [int(name.removeprefix("layer_")) for name in self.adapters]
        self.correct = torch.zeros(len(self.adapters), dtype=torch.float64, device=self.correct.device)
        self.active = 0
        self._hook_blocks()

    # -- a forward --------------------------------------------------------------------------------------
    def classify(self, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(N, B, classes) logits of every adapter from the activations the last backbone pass left."""
        missing = [name for name in self.adapters if name not in self._captured]
        if missing:
            raise RuntimeError(f"InCA: the backbone's forward did not run blocks {missing}")
        logits = torch.stack([adapter(self._captured[name], attention_mask) for name, adapter in self.adapters.items()])
        self._captured.clear()
        return logits

    @torch.no_grad()
    def count(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.correct += (logits.argmax(-1) == labels[None]).sum(-1).to(self.correct.dtype)
        self.total += labels.numel()


class InCAForward:
    """The model's forward with InCA attached: the backbone (every module but the adapters) in eval mode under
    ``torch.no_grad``, then the adapters on the chosen blocks' outputs."""

    def __init__(self, model: nn.Module, adapters: InCAAdapters) -> None:
        self.model = model
        self.adapters = adapters
        self.signature = inspect.signature(type(model).forward)
        own = set(adapters.modules())
        # The backbone's modules, listed once: each forward switches their dropout off and back.
        self.backbone = [module for module in model.modules() if module not in own]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model, adapters = self.model, self.adapters
        call = self.signature.bind_partial(model, *args, **kwargs).arguments
        call.pop("self", None)
        extra = call.pop("kwargs", {})
        call.update(extra)
        if adapters.disabled:
            return type(model).forward(model, **call)
        labels = call.pop("labels", None)
        modes = [module.training for module in self.backbone]
        for module in self.backbone:
            module.training = False  # the backbone's dropout stays off while the adapters train
        try:
            with torch.no_grad():
                outputs = type(model).forward(model, **call)
        finally:
            for module, mode in zip(self.backbone, modes):
                module.training = mode
        logits = adapters.classify(call.get("attention_mask"))
        if labels is not None:
            labels = labels.to(logits.device)
            losses = torch.stack([F.cross_entropy(per_adapter, labels) for per_adapter in logits])
            adapters.last_losses = losses.detach()
            outputs["loss"] = losses.sum()
            if not adapters.training:
                adapters.count(logits, labels)
        outputs["logits"] = logits[adapters.active]
        outputs["inca_logits"] = logits
        return outputs


def inca_adapters(model: nn.Module) -> InCAAdapters:
    adapters = getattr(model, ATTRIBUTE, None)
    if not isinstance(adapters, InCAAdapters):
        raise ValueError(f"{type(model).__name__} has no InCA adapters; apply_peft(model, InCA(...)) or load_adapter first")
    return adapters


def keep_adapters(model: nn.Module, layers: Sequence[int]) -> nn.Module:
    """Keep only the adapters reading ``layers`` (the others are removed, and the model's method and its adapter
    files then name only these). Returns ``model``."""
    adapters = inca_adapters(model)
    unknown = [i for i in layers if i not in adapters.layers]
    if unknown or not layers:
        raise ValueError(f"keep_adapters(layers={list(layers)!r}): this model's InCA adapters read layers {adapters.layers}; keep a non-empty subset")
    adapters.keep([f"layer_{i}" for i in layers])
    method = injected_method(model)
    if isinstance(method, InCA):
        kept = InCA(sorted(layers), method.num_queries, method.heads, method.hidden, method.num_classes, method.seed)
        object.__setattr__(model, METHOD_ATTRIBUTE, kept)
    return model

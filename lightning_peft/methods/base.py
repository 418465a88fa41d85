"""What every PEFT method provides to the shared machinery.

A method is a plain class with a typed ``__init__`` (so LightningCLI/jsonargparse can build it from YAML
by ``class_path``) whose every argument is stored under the same attribute name. That convention makes
the config serialisable (:meth:`PEFTMethod.to_dict`, stored in checkpoints so ``load_from_checkpoint`` can
rebuild the adapters) without a second, hand-kept list of fields.
"""

from __future__ import annotations

import abc
import importlib
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

from torch import nn

from lightning_peft.core.adapter_layer import AdapterLayer
from lightning_peft.core.targets import TargetSpec, find_targets


class PEFTMethod(abc.ABC):
    """Base class of method configs (abstract: ``lightning-peft fit --help`` lists only usable methods).

    Args:
        target_modules: module names (suffix match), a full-name regex, ``"all-linear"``, or ``None`` for
            the per-architecture defaults.
        exclude_modules: names or a regex removed from the targets.
        modules_to_save: modules trained in full beside the adapters (e.g. a new classifier head); they
            are exported as whole tensors.
    """

    #: Short name used in logs and errors.
    name = "adapter"
    #: What :meth:`supports` accepts, for error messages.
    supported_description = "nn.Linear"
    #: Whether HF peft has a file format for this method (:meth:`peft_config`). Methods without one are
    #: saved in lightning_peft's own format (:mod:`lightning_peft.formats.native_format`).
    has_peft_format = True
    #: The ``peft_type`` of the HF peft ``adapter_config.json`` files this class reads (:meth:`reads_peft_config`);
    #: ``None`` for methods peft has no format for. Declared on the class itself, a subclass (a user's variant)
    #: does not claim its parent's files.
    peft_type: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Self-registration: defining a method class is all it takes for peft files, the CLI's list of methods
        # and the package's public names to know it (no table to keep in step elsewhere).
        super().__init_subclass__(**kwargs)
        _REGISTERED.append(cls)

    def __init__(
        self,
        target_modules: TargetSpec = None,
        exclude_modules: TargetSpec = None,
        modules_to_save: Sequence[str] | None = None,
    ) -> None:
        self.target_modules = list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules
        self.exclude_modules = list(exclude_modules) if isinstance(exclude_modules, (list, tuple)) else exclude_modules
        self.modules_to_save = list(modules_to_save) if modules_to_save else []
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules=[] selects nothing; give names, a regex, 'all-linear' or None")

    @classmethod
    def reads_peft_config(cls, config: dict[str, Any]) -> bool:
        """Whether this class is the one that reads a peft ``adapter_config.json`` (``config``)."""
        return "peft_type" in vars(cls) and cls.peft_type is not None and config.get("peft_type") == cls.peft_type

    # -- what a method implements -----------------------------------------------------------------
    @abc.abstractmethod
    def supports(self, module: nn.Module) -> bool:
        """Whether this method can adapt ``module`` (a target's type and shape)."""

    def wrap(self, name: str, module: nn.Module) -> AdapterLayer:
        """Return the adapter layer that replaces ``module`` (named ``name`` in the model)."""
        raise NotImplementedError

    def wrap_targets(self, model: nn.Module, targets: list[str]) -> dict[str, AdapterLayer]:
        """The adapter layers for ``targets`` of ``model``, by name: :meth:`wrap` for each by default. A
        method whose layers share tensors (Compacter's rule matrices) or depend on the model (per-architecture
        choices) builds them together here."""
        return {name: self.wrap(name, model.get_submodule(name)) for name in targets}

    def attach(self, model: nn.Module) -> list[str]:
        """Add the modules this method puts *beside* the model rather than around a layer (prompt tuning's
        virtual tokens, with the forward hooks that feed them in); returns their names. None by default."""
        return []

    # -- training-time hooks (most methods need none) ---------------------------------------------
    #: Whether applying the method freezes the base model. LayerDrop alone does not: it regularises a full
    #: fine-tune (every parameter trains, and checkpoints then hold them all).
    freezes_base: ClassVar[bool] = True

    @property
    def needs_data(self) -> bool:
        """Whether the adapters are initialised from training batches when fitting starts
        (:meth:`initialise_from_data`: LoRA-GA's gradient SVD, sparse fine-tuning's index selection)."""
        return False

    #: Whether the method changes the model's input (virtual token positions or the attention cache): at most one
    #: such method can be composed with others.
    composes_inputs: ClassVar[bool] = False
    #: Whether the set of modules a training step runs changes from step to step (LayerDrop): under DDP, the
    #: reducer must then look for unused parameters, and sharded strategies cannot be used.
    changes_graph_per_step: ClassVar[bool] = False

    #: Whether the method has tensors that train. Inference-time intervention fits from data when fitting starts
    #: and takes no optimizer step: ``PEFTCallback`` then ends ``fit`` right after, and the tasks build no optimizer.
    trains_parameters: ClassVar[bool] = True

    #: ``True``, or the reason this method cannot share a model with others in a composition.
    composes_with_others: ClassVar[bool | str] = True

    #: How many training batches :meth:`initialise_from_data` reads (when :attr:`needs_data`).
    init_batches: int = 0

    def initialise_from_data(
        self, model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[Any], Any], reduce: Callable[[Any], Any]
    ) -> None:
        """Initialise the injected adapters of ``model`` from training data (when :attr:`needs_data`).

        ``batches`` yields what ``loss_fn`` takes; ``loss_fn(batch)`` runs the forward pass and returns the
        scalar loss (the caller's ``training_step``); this method calls backward itself. ``reduce(tensor)``
        averages a tensor over the data-parallel ranks, so every rank ends with the same adapters.
        """
        raise NotImplementedError(f"{type(self).__name__} has no data-driven initialisation")

    def after_optimizer_step(self, model: nn.Module, global_step: int, reduce: Callable[[Any], Any]) -> None:
        """Called by ``PEFTCallback`` after each optimizer step (``global_step`` is the new step count):
        for methods whose structure changes during training (sparse fine-tuning's drop and regrow).
        ``reduce`` averages a tensor over the data-parallel ranks. Nothing by default."""

    def before_training_batch(self, model: nn.Module, global_step: int, batch_idx: int) -> None:
        """Called by ``PEFTCallback`` before each training batch: for methods whose forward depends on the step
        (LayerDrop draws which layers to skip from ``(seed, global_step, batch_idx)``, the same on every rank and
        after a resume). Nothing by default."""

    def training_metrics(self, model: nn.Module) -> dict[str, Any]:
        """Values ``PEFTCallback`` logs after each training batch (InCA: each adapter's own loss). None by default."""
        return {}

    def validation_metrics(self, model: nn.Module, reduce_sum: Callable[[Any], Any]) -> dict[str, float]:
        """Values ``PEFTCallback`` logs at the end of each validation epoch, from counts the method kept during it
        (InCA: each adapter's accuracy); ``reduce_sum`` sums a tensor over the data-parallel ranks. None by default."""
        return {}

    def exported(self) -> PEFTMethod | None:
        """The method a saved adapter file describes: this one, unless export folds a part that only
        serves training away (P-tuning's prompt encoder, prefix tuning's reparameterisation MLP); ``None``
        for a method that leaves nothing to export (LayerDrop changes how training runs, not the weights)."""
        return self

    def writes_peft_format(self, model: nn.Module) -> bool:
        """Whether ``save_adapter`` writes HF peft's format for this method on ``model`` (else ours)."""
        return self.has_peft_format

    def peft_config(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        """The ``adapter_config.json`` fields specific to this method, or raise if peft has no such format."""
        raise NotImplementedError(f"{type(self).__name__} has no HF peft file format")

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> PEFTMethod:
        raise NotImplementedError

    # -- shared behaviour -------------------------------------------------------------------------
    def find_targets(self, model: nn.Module) -> list[str]:
        return self.select_targets(model, self.target_modules)

    def select_targets(self, model: nn.Module, spec: TargetSpec) -> list[str]:
        """The modules ``spec`` selects in ``model``, minus ``exclude_modules``, checked against :meth:`supports`
        (methods that choose their own default targets pass them here as ``spec``)."""
        return find_targets(
            model,
            spec,
            self.exclude_modules,
            supports=self.supports,
            method_name=type(self).__name__,
            supported_description=self.supported_description,
        )

    #: Arguments a resumed run may change from the checkpoint's: they change how training proceeds, not what
    #: the trained tensors mean (dropout). Any other difference is refused on resume.
    resume_safe_arguments: ClassVar[tuple[str, ...]] = ()

    def differences(self, other: PEFTMethod) -> dict[str, tuple[Any, Any]]:
        """``{argument: (this value, other's value)}`` for every init argument the two methods disagree on."""
        mine, theirs = self.init_args(), other.init_args()
        return {k: (mine.get(k), theirs.get(k)) for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)}

    def init_args(self) -> dict[str, Any]:
        params = inspect.signature(type(self).__init__).parameters
        return {k: getattr(self, k) for k in params if k != "self" and params[k].kind is not inspect.Parameter.VAR_KEYWORD}

    def to_dict(self) -> dict[str, Any]:
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": self.init_args()}

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.init_args() == other.init_args()  # type: ignore[union-attr]

    def __hash__(self) -> int:
        return hash(type(self).__qualname__)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args().items())
        return f"{type(self).__name__}({args})"


_REGISTERED: list[type[PEFTMethod]] = []


def registered_methods() -> list[type[PEFTMethod]]:
    """Every concrete method class defined so far, in definition order (abstract bases left out)."""
    return [cls for cls in _REGISTERED if not inspect.isabstract(cls)]


def method_for_peft_config(config: dict[str, Any]) -> type[PEFTMethod]:
    """The method class that reads a peft ``adapter_config.json``; a clear error for a ``peft_type`` none reads."""
    readers = [cls for cls in registered_methods() if cls.reads_peft_config(config)]
    if not readers:
        known = sorted({cls.peft_type for cls in registered_methods() if "peft_type" in vars(cls) and cls.peft_type})
        raise ValueError(f"unsupported adapter peft_type {config.get('peft_type')!r}; this version reads {known}")
    return readers[0]


def require_peft_targets(config: dict[str, Any]) -> None:
    """Refuse a peft ``adapter_config.json`` of a layer-wrapping method that names no ``target_modules``.

    peft then falls back to its own per-architecture default list, which is not ours (its Llama default is
    q_proj and v_proj, ours every projection), so which layers the file adapts cannot be read from it.
    """
    if not config.get("target_modules"):
        raise ValueError(
            f"this {config.get('peft_type')} adapter_config.json has no target_modules; peft would fall back to its own "
            f"per-architecture defaults, which lightning_peft does not guess. Add the adapted modules' names (the module "
            f"paths in the tensor keys, e.g. [\"q_proj\", \"v_proj\"]) as target_modules"
        )


def method_from_dict(data: dict[str, Any]) -> PEFTMethod:
    """Rebuild a method from :meth:`PEFTMethod.to_dict` output (only classes deriving from PEFTMethod)."""
    module_name, _, class_name = data["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, PEFTMethod)):
        raise ValueError(f"{data['class_path']!r} is not a lightning_peft method class")
    return cls(**data.get("init_args", {}))

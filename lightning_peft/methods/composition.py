"""Several methods on one model: ``PEFTCallback([LoRA(...), BitFit(...), LayerDrop(p=0.1)])``.

Methods combine in the literature and in practice: LoRA beside a trained head or BitFit's biases (Ben Zaken et
al., 2021, train biases "on top of" other methods), and a structural regulariser such as LayerDrop (Fan et al.,
2019) on top of any of them. :class:`Composition` is itself a :class:`PEFTMethod` (the composite pattern), so
every path that takes one method (injection and freezing, adapter-only checkpoints and resume, the fingerprint,
distributed broadcast, parameter groups, merging and export) takes a composition unchanged: it answers each
question of the method protocol from its members.

What cannot work is refused before the model changes, naming the pair and the reason:

- **two members wrapping the same layer, or one wrapping a layer inside another's** (LoRA on ``q_proj`` and
  LLaMA-Adapter on the attention holding it). The wrappers of this package do not nest: each keeps the
  wrapped module as ``base_layer``, and a wrapper inside a wrapper would move the inner one's tensors to other
  names in checkpoints and files. Exclude the shared layers from one member (``exclude_modules``);
- **two members that change the model's input** (prompt tuning, P-tuning, prefix tuning): each owns the
  model's input positions or attention cache, and two would each assume they are the only one.

Export (``save_adapter``): members that train nothing to export (LayerDrop) are left out. One exported member
left is written in its own format, exactly as if used alone (LoRA + LayerDrop gives a peft LoRA directory that
peft and vLLM read). Several are written as one directory in lightning_peft's format: HF peft's format holds one
adapter type per directory, and ours holds every member's tensors under their module names beside the
composition's config, so ``load_adapter`` rebuilds the whole composition. Members that fold a training-only
part away on their own export (P-tuning's encoder) are stored in training form there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from lightning_peft.core.adapter_layer import AdapterLayer
from lightning_peft.methods.base import PEFTMethod, method_from_dict


class Composition(PEFTMethod):
    """Apply ``methods`` together, in order (each on its own layers).

    Args:
        methods: two or more methods (or their ``to_dict()`` form); a nested composition is flattened.

    ``PEFTCallback`` and ``apply_peft`` build one from a list (:func:`as_method`)::

        PEFTCallback([LoRA(r=8, target_modules=["query", "value"]), BitFit(target_modules=["key"]), LayerDrop(p=0.1)])
    """

    name = "composition"
    supported_description = "the modules each member method supports"

    def __init__(self, methods: Sequence[PEFTMethod]) -> None:
        members: list[PEFTMethod] = []
        for method in methods:
            method = method_from_dict(method) if isinstance(method, dict) else method
            if not isinstance(method, PEFTMethod):
                raise TypeError(f"a composition takes lightning_peft methods such as LoRA(...), got {type(method).__name__}: {method!r}")
            members.extend(method.methods if isinstance(method, Composition) else [method])
        if len(members) < 2:
            raise ValueError(f"a composition needs two or more methods, got {len(members)} ({members!r}); use the method itself")
        super().__init__(modules_to_save=_union(m.modules_to_save for m in members))
        self.methods = members
        _refuse_two_input_methods(members)
        _refuse_solitary_methods(members)

    # -- the protocol, answered from the members -----------------------------------------------------
    @property
    def freezes_base(self) -> bool:  # type: ignore[override]
        return any(m.freezes_base for m in self.methods)

    @property
    def needs_data(self) -> bool:
        return any(m.needs_data for m in self.methods)

    @property
    def init_batches(self) -> int:  # type: ignore[override]
        return max((m.init_batches for m in self.methods if m.needs_data), default=0)

    @property
    def trains_parameters(self) -> bool:  # type: ignore[override]
        return any(m.trains_parameters for m in self.methods)

    @property
    def changes_graph_per_step(self) -> bool:  # type: ignore[override]
        return any(m.changes_graph_per_step for m in self.methods)

    def supports(self, module: nn.Module) -> bool:
        return any(m.supports(module) for m in self.methods)

    def member_targets(self, model: nn.Module) -> list[list[str]]:
        """Each member's targets in ``model`` (read before any member wraps anything), after the nesting check."""
        targets = [m.find_targets(model) for m in self.methods]
        _refuse_nested_wrappers(self.methods, targets)
        return targets

    def find_targets(self, model: nn.Module) -> list[str]:
        return [name for names in self.member_targets(model) for name in names]

    def wrap_targets(self, model: nn.Module, targets: list[str]) -> dict[str, AdapterLayer]:
        # Every member's layers are built from the unwrapped model: the targets are disjoint, so no member sees
        # another's wrapper. ``targets`` is the concatenation find_targets returned.
        layers: dict[str, AdapterLayer] = {}
        for method, names in zip(self.methods, self.member_targets(model)):
            layers.update(method.wrap_targets(model, names))
        return layers

    def attach(self, model: nn.Module) -> list[str]:
        return [name for method in self.methods for name in method.attach(model)]

    def initialise_from_data(
        self, model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[Any], Any], reduce: Callable[[Any], Any]
    ) -> None:
        batches = list(batches)  # each member reads its own first init_batches of the same batches
        for method in self.methods:
            if method.needs_data:
                method.initialise_from_data(model, batches[: method.init_batches], loss_fn, reduce)

    def after_optimizer_step(self, model: nn.Module, global_step: int, reduce: Callable[[Any], Any]) -> None:
        for method in self.methods:
            method.after_optimizer_step(model, global_step, reduce)

    def before_training_batch(self, model: nn.Module, global_step: int, batch_idx: int) -> None:
        for method in self.methods:
            method.before_training_batch(model, global_step, batch_idx)

    # -- files -----------------------------------------------------------------------------------------
    def training_metrics(self, model: nn.Module) -> dict[str, Any]:
        return {k: v for method in self.methods for k, v in method.training_metrics(model).items()}

    def validation_metrics(self, model: nn.Module, reduce_sum: Callable[[Any], Any]) -> dict[str, float]:
        return {k: v for method in self.methods for k, v in method.validation_metrics(model, reduce_sum).items()}

    def exported_members(self) -> list[PEFTMethod]:
        """The members an adapter file holds: those with something to export (not LayerDrop)."""
        return [m for m in self.methods if m.exported() is not None]

    def exported(self) -> PEFTMethod | None:
        members = self.exported_members()
        if not members:
            return None
        if len(members) == 1:
            return members[0].exported()  # written as if used alone: its own (peft) format
        return Composition(members)

    def writes_peft_format(self, model: nn.Module) -> bool:
        members = self.exported_members()
        return len(members) == 1 and members[0].writes_peft_format(model)

    def peft_config(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        members = self.exported_members()
        if len(members) != 1:
            raise NotImplementedError(f"HF peft's format holds one adapter type; this composition exports {len(members)}")
        return members[0].peft_config(model, targets)

    def init_args(self) -> dict[str, Any]:
        return {"methods": list(self.methods)}

    def to_dict(self) -> dict[str, Any]:
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": {"methods": [m.to_dict() for m in self.methods]}}

    def __repr__(self) -> str:
        return f"Composition([{', '.join(repr(m) for m in self.methods)}])"


def as_method(method: PEFTMethod | Sequence[PEFTMethod]) -> PEFTMethod:
    """A method from what a user passes: a method, or a list of them (a :class:`Composition`; one item: itself)."""
    if isinstance(method, PEFTMethod):
        return method
    if isinstance(method, (list, tuple)):
        if len(method) == 1 and isinstance(method[0], PEFTMethod):
            return method[0]
        return Composition(method)
    raise TypeError(f"method must be a lightning_peft method such as LoRA(...) or a list of them, got {type(method).__name__}")


def _union(lists: Iterable[list[str]]) -> list[str]:
    return list(dict.fromkeys(name for names in lists for name in names))


def _refuse_solitary_methods(members: list[PEFTMethod]) -> None:
    """A method whose forward cannot share the model (InCA runs the backbone without gradient, so any other method's
    tensors inside it would never train, and a skipped block would give its adapter nothing to read)."""
    for method in members:
        reason = method.composes_with_others
        if reason is not True:
            other = next(m for m in members if m is not method)
            raise ValueError(f"{type(method).__name__} cannot be composed with {type(other).__name__}: {reason}")


def _refuse_two_input_methods(members: list[PEFTMethod]) -> None:
    inputs = [m for m in members if m.composes_inputs]
    if len(inputs) > 1:
        first, second = (type(m).__name__ for m in inputs[:2])
        raise ValueError(
            f"{first} and {second} cannot be composed: both change the model's input (its virtual token positions or "
            f"attention cache), and each assumes it is the only one. Keep one of them"
        )


def _refuse_nested_wrappers(members: list[PEFTMethod], targets: list[list[str]]) -> None:
    for i, (first, first_names) in enumerate(zip(members, targets)):
        for second, second_names in zip(members[i + 1 :], targets[i + 1 :]):
            clashes = [(a, b) for a in first_names for b in second_names if a == b or b.startswith(a + ".") or a.startswith(b + ".")]
            if clashes:
                a, b = clashes[0]
                where = f"both wrap {a!r}" if a == b else f"{type(first).__name__} wraps {a!r} and {type(second).__name__} wraps {b!r} inside it"
                raise ValueError(
                    f"{type(first).__name__} and {type(second).__name__} cannot be composed on these layers: {where} "
                    f"({len(clashes)} such pairs), and adapter wrappers do not nest. Give one of them "
                    f"exclude_modules=[{b.rsplit('.', 1)[-1]!r}] (or other target_modules)"
                )

"""Putting a method's adapter layers into a model and freezing everything else.

``apply_peft`` is the one entry point the callback, the mixin, ``load_adapter`` and checkpoint restore
all use, so injection behaves the same whichever path a user takes. It is idempotent: a model that
already carries this method's adapters is left as it is (Lightning calls ``setup`` once per stage).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from lightning_peft.core.adapter_layer import AdapterLayer, adapter_modules
from lightning_peft.core.fingerprint import forget_base_fingerprint, remember_base_fingerprint
from lightning_peft.core.kbit_cpu_kernel import select_cpu_kernel
from lightning_peft.core.sharding import state_dict_name

if TYPE_CHECKING:  # annotations only: methods build on core, core never runs method code by name
    from lightning_peft.methods.base import PEFTMethod

# Set on the model root so later calls (another stage, a checkpoint restore, an export) know which
# method the adapters came from.
METHOD_ATTRIBUTE = "_lightning_peft_method"


@dataclass(frozen=True)
class ParameterSummary:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} / {self.total:,} ({self.percent:.4f}%)"


def injected_method(model: nn.Module) -> PEFTMethod | None:
    return getattr(model, METHOD_ATTRIBUTE, None)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject_adapters(model: nn.Module, method: PEFTMethod) -> list[str]:
    """Wrap every target of ``method`` in its adapter layer and attach the modules it adds beside the
    model (prompt tuning's virtual tokens); returns the names of the adapters."""
    targets = method.find_targets(model)
    for name, layer in method.wrap_targets(model, targets).items():
        set_submodule(model, name, layer)
    return targets + method.attach(model)


def modules_to_save_matches(model: nn.Module, name: str) -> list[nn.Module]:
    """The modules a ``modules_to_save`` entry names: the exact qualified name or a ``.name`` suffix."""
    return [m for n, m in model.named_modules() if n == name or n.endswith("." + name)]


def modules_to_save_parameters(model: nn.Module, method: PEFTMethod) -> dict[str, nn.Parameter]:
    """The trained parameters of ``method.modules_to_save`` in ``model``, by state-dict name (without FSDP1's
    wrapper segments), matched by the same rule as :func:`freeze_base` uses to unfreeze them."""
    found: dict[str, nn.Parameter] = {}
    for entry in method.modules_to_save:
        for module_name, module in model.named_modules():
            if module_name == entry or module_name.endswith("." + entry):
                for name, param in module.named_parameters():
                    if param.requires_grad:
                        found.setdefault(state_dict_name(f"{module_name}.{name}"), param)
    return dict(sorted(found.items()))


def check_modules_to_save(model: nn.Module, method: PEFTMethod) -> None:
    """Refuse a ``modules_to_save`` entry that names nothing, before anything in the model changes."""
    unmatched = [name for name in method.modules_to_save if not modules_to_save_matches(model, name)]
    if unmatched:
        children = ", ".join(name for name, _ in model.named_children())
        raise ValueError(
            f"modules_to_save entry {unmatched[0]!r} matched no module of {type(model).__name__}; give a module's "
            f"qualified name or its last segment (the model's top-level modules: {children})"
        )


def freeze_base(model: nn.Module, method: PEFTMethod) -> None:
    """Only adapter parameters and ``modules_to_save`` stay trainable (nothing is frozen for a method that trains
    the whole model, such as LayerDrop alone)."""
    check_modules_to_save(model, method)
    if not method.freezes_base:
        return
    for param in model.parameters():
        param.requires_grad_(False)
    for _, adapter in adapter_modules(model):
        for _, param in adapter.adapter_named_parameters():
            param.requires_grad_(True)
    for name in method.modules_to_save:
        for module in modules_to_save_matches(model, name):
            for param in module.parameters():
                param.requires_grad_(True)


def apply_peft(model: nn.Module, method: PEFTMethod) -> list[str]:
    """Inject ``method`` into ``model`` and freeze the base; a no-op when already applied.

    Returns the names of the adapted modules. Applying a *different* method to a model that already
    has adapters is an error rather than a silent stack of two methods.

    Transactional: if anything fails (a target that matches nothing, a ``modules_to_save`` typo, a layer a
    method cannot wrap), the model is left exactly as it was (no wrapper, no attached module, every
    parameter's ``requires_grad`` as before), so a corrected retry starts from the same model.
    """
    if isinstance(method, (list, tuple)):
        raise TypeError(f"apply_peft takes one method; compose several with lightning_peft.Composition({list(method)!r})")
    current = injected_method(model)
    if current is not None:
        if current != method:
            raise ValueError(f"model already has adapters from {current!r}; refusing to also inject {method!r}")
        freeze_base(model, method)  # a stage may have unfrozen things (e.g. a user's on_fit_start)
        return [name for name, _ in adapter_modules(model)]
    if any(True for _ in adapter_modules(model)):
        raise ValueError("model already contains adapter layers that were not injected by apply_peft")
    check_modules_to_save(model, method)
    # A 4-bit base quantized outside lightning_peft (from_pretrained(quantization_config=...)) gets the exact
    # CPU kernel too: bitsandbytes' packed one changes eval results with the CPU model.
    select_cpu_kernel(model, "exact", keep_existing=True)
    with injection_rolled_back_on_error(model):
        targets = inject_adapters(model, method)
        freeze_base(model, method)
        object.__setattr__(model, METHOD_ATTRIBUTE, method)  # not a submodule: bypass nn.Module.__setattr__
        remember_base_fingerprint(model)  # sharding comes after injection; the whole base is readable only now
    return targets


@contextmanager
def injection_rolled_back_on_error(model: nn.Module) -> Iterator[None]:
    """Run a block that may inject adapters into ``model`` (``apply_peft``, or loading an adapter file into a
    model without adapters); if it raises, put the model back as it was: adapters out, every parameter's
    ``requires_grad`` as before. A model that already had adapters is left to the block (it injects nothing)."""
    if injected_method(model) is not None:
        yield
        return
    trainable = {param: param.requires_grad for param in model.parameters()}
    try:
        yield
    except BaseException:
        remove_adapters(model)
        for param, flag in trainable.items():
            param.requires_grad_(flag)
        forget_base_fingerprint(model)
        raise


def _numel(param: nn.Parameter) -> int:
    # A bitsandbytes 4-bit weight is stored packed (two codes per byte): count the weights it stands for.
    quant_state = getattr(param, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else param.numel()


def parameter_summary(model: nn.Module) -> ParameterSummary:
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    return ParameterSummary(trainable, total)


def remove_adapters(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by its ``base_layer`` and detach attached adapters (the adapters'
    effect is dropped unless merged)."""
    for name, adapter in list(adapter_modules(model)):
        if isinstance(adapter, AdapterLayer):
            set_submodule(model, name, adapter.base_layer)
        else:
            adapter.detach(model)
    if hasattr(model, METHOD_ATTRIBUTE):
        object.__delattr__(model, METHOD_ATTRIBUTE)
    return model


def is_adapter_layer(module: nn.Module) -> bool:
    return isinstance(module, AdapterLayer)

"""Finding the model to adapt inside a LightningModule.

Users keep their transformers model as an attribute (``self.model``, ``self.backbone``, ...). We look for
exactly one ``transformers.PreTrainedModel`` among the module's submodules; failing that, the
LightningModule itself is the model (any torch model works: targets are matched by name). The user can
always name the attribute instead, which is the unambiguous choice when there are several.
"""

from __future__ import annotations

from torch import nn


def _is_pretrained(module: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency, but keep torch-only use working
        return False
    return isinstance(module, PreTrainedModel)


def find_model(module: nn.Module, attribute: str | None = None) -> nn.Module | None:
    """The model inside ``module``: ``module.<attribute>`` if named (``None`` while it is unset), else the
    single transformers model found among its submodules, else ``module`` itself."""
    if attribute is not None:
        if not hasattr(module, attribute):
            raise AttributeError(f"{type(module).__name__} has no attribute {attribute!r} (model_attr) to adapt")
        return getattr(module, attribute)
    if _is_pretrained(module):
        return module
    found: list[tuple[str, nn.Module]] = []
    for name, sub in module.named_modules():
        if name and _is_pretrained(sub) and not any(name.startswith(prev + ".") for prev, _ in found):
            found.append((name, sub))
    if len(found) > 1:
        raise ValueError(
            f"{type(module).__name__} holds several transformers models ({', '.join(n for n, _ in found)}); "
            f"name the one to adapt with model_attr=..."
        )
    if found:
        return found[0][1]
    return module if next(module.parameters(), None) is not None else None


def resolve_model(model: nn.Module) -> nn.Module:
    """``model`` itself, or the model inside it when ``model`` is a LightningModule."""
    from lightning.pytorch import LightningModule

    if isinstance(model, LightningModule):
        attribute = getattr(model, "peft_model_attr", None)
        found = find_model(model, attribute)
        if found is None:
            raise ValueError(f"{type(model).__name__} has no model yet (is it built in configure_model?)")
        return found
    return model

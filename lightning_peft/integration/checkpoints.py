"""Adapter-only Lightning checkpoints.

A checkpoint of a PEFT run needs the trainable tensors, the optimizer and the loop state, not a second
copy of the frozen base (for SmolLM2 with LoRA r=8 on q,v: about 1 MB instead of 540 MB). We get that
with a ``state_dict`` post-hook on the LightningModule that keeps only trainable parameters, so every
save path that goes through ``LightningModule.state_dict`` (full, weights-only, every strategy that
asks the module) writes adapter-only weights without Lightning knowing about it.

Because frozen keys are absent by design, loading runs with ``strict_loading = False``; we then check
ourselves that every trainable tensor is in the checkpoint and that the checkpoint was made for this
base model (a fingerprint of the frozen weights, see :mod:`lightning_peft.core.fingerprint`).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_peft.core.adapter_layer import adapter_layers
from lightning_peft.core.fingerprint import base_fingerprint, check_fingerprint
from lightning_peft.core.injection import injected_method
from lightning_peft.core.model_lookup import find_model
from lightning_peft.core.sharding import state_dict_name
from lightning_peft.integration.rng_state import restore_rng_states, rng_states
from lightning_peft.methods.base import method_from_dict

CHECKPOINT_KEY = "lightning_peft"
_HOOK_FLAG = "_lightning_peft_adapter_only_hook"


def adapter_state_names(module: nn.Module) -> set[str]:
    """State-dict names of what an adapter-only checkpoint holds: the trainable parameters and the
    adapter layers' persistent buffers (e.g. the initial factors of a PiSSA or LoRA-GA init, without
    which the adapter is wrong against the unmodified base)."""
    names = {state_dict_name(name) for name, param in module.named_parameters() if param.requires_grad}
    for layer_name, layer in adapter_layers(module):
        names |= {state_dict_name(f"{layer_name}.{name}") for name, _ in layer.adapter_named_buffers()}
    return names


def _drop_frozen(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    keep = {prefix + name for name in adapter_state_names(module)}
    for key in [k for k in state_dict if k.startswith(prefix) and k not in keep]:
        del state_dict[key]


def make_state_dict_adapter_only(lightning_module: nn.Module) -> None:
    """Make ``lightning_module.state_dict()`` hold only trainable parameters (idempotent)."""
    if getattr(lightning_module, _HOOK_FLAG, False):
        return
    lightning_module.register_state_dict_post_hook(_drop_frozen)
    object.__setattr__(lightning_module, _HOOK_FLAG, True)


def checkpoint_metadata(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint records about its adapters: the method config, the base's fingerprint, and the random
    generators' states (dropout masks after a resume are the uninterrupted run's, see rng_state.py)."""
    method = injected_method(model)
    return {"method": method.to_dict() if method else None, "base": base_fingerprint(model), "rng": rng_states()}


def restore_training_state(checkpoint: dict[str, Any], lightning_module: nn.Module) -> None:
    """Restore the random generators when the checkpoint resumes a ``fit`` (not for a test or a predict run,
    whose randomness the checkpoint should not dictate)."""
    metadata = checkpoint.get(CHECKPOINT_KEY) or {}
    trainer = getattr(lightning_module, "_trainer", None)
    fitting = trainer is not None and getattr(trainer.state, "fn", None) == "fit"
    if fitting and "rng" in metadata:
        restore_rng_states(metadata["rng"])


def verify_checkpoint(checkpoint: dict[str, Any], lightning_module: nn.Module, model: nn.Module) -> None:
    """Raise if ``checkpoint`` was made for another base model or lacks trainable tensors."""
    metadata = checkpoint.get(CHECKPOINT_KEY)
    if metadata is not None:
        check_fingerprint(metadata["base"], model, what="checkpoint")
        # Another config is not always a shape error: a different alpha loads and trains at another scale,
        # and fewer targets silently drop trained adapters (their keys are merely "unexpected").
        # Compared as rebuilt methods, so an argument added later with a default still matches old checkpoints.
        current = injected_method(model)
        saved = method_from_dict(metadata["method"]) if metadata.get("method") else None
        if saved is not None and current is not None and saved != current:
            check_method_change(saved, current)
    if "state_dict" not in checkpoint:
        # A sharded (distributed checkpoint) directory: the strategy has already loaded the tensors itself,
        # asking for exactly the keys of the module's state_dict (adapter-only, see make_state_dict_adapter_only),
        # and torch.distributed.checkpoint refuses a missing one. What reaches this hook is the metadata only.
        return
    state = checkpoint["state_dict"]
    missing = sorted(n for n in adapter_state_names(lightning_module) if n not in state)
    if missing:
        raise KeyError(
            f"checkpoint lacks {len(missing)} trainable tensors of this model (e.g. {missing[:3]}); it was saved "
            f"with a different adapter configuration"
        )


def check_method_change(saved: Any, current: Any) -> None:
    """Refuse loading a checkpoint into a model whose method config differs, naming each differing argument;
    allow, with a warning, the arguments that do not change what the trained tensors mean (dropout)."""
    if type(saved) is not type(current):
        raise ValueError(f"checkpoint was trained with {type(saved).__name__}, but this model has {type(current).__name__} adapters; use {type(saved).__name__}")
    changed = saved.differences(current)
    refused = {k: v for k, v in changed.items() if k not in type(current).resume_safe_arguments}
    described = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changed.items())
    if refused:
        raise ValueError(
            f"checkpoint was trained with another {type(current).__name__} config ({described}); the trained tensors mean "
            f"something else under the new values: resume or load with the checkpoint's values"
            + (f" (only {', '.join(type(current).resume_safe_arguments)} may change)" if type(current).resume_safe_arguments else "")
        )
    rank_zero_warn(f"resuming {type(current).__name__} with changed {described}: allowed (it changes training, not what the trained tensors mean)")


# -- checkpoint hooks for LightningModules that are not a PEFTMixin (the PEFTCallback path) -----------
# A Callback's own on_save_checkpoint is skipped for weights-only saves, and its on_load_checkpoint runs
# after the weights were loaded, and not at all when the checkpoint has no "callbacks" key (weights-only
# checkpoints, e.g. in ``trainer.test(ckpt_path=...)``). The LightningModule's hooks have neither gap, so
# the callback installs its metadata writer and its check there, on the instance (what PEFTMixin does
# in its class). A weights-only checkpoint then still carries the fingerprint, and a wrong base, a
# different hidden size or a missing adapter tensor is refused before any weight is copied.
_MODULE_HOOKS_FLAG = "_lightning_peft_checkpoint_hooks"


class _ModuleCheckpointHook:
    """``lightning_module.<name>`` replaced on the instance: the class's hook (the user's override or
    Lightning's no-op) first, then ours. A class rather than a closure so the module still pickles."""

    def __init__(self, lightning_module: nn.Module, name: str, model_attr: str | None) -> None:
        self.lightning_module = lightning_module
        self.name = name
        self.model_attr = model_attr

    def __call__(self, checkpoint: dict[str, Any]) -> None:
        getattr(type(self.lightning_module), self.name)(self.lightning_module, checkpoint)
        model = find_model(self.lightning_module, self.model_attr)
        if self.name == "on_save_checkpoint":
            checkpoint[CHECKPOINT_KEY] = checkpoint_metadata(model)
        else:
            verify_checkpoint(checkpoint, self.lightning_module, model)
            restore_training_state(checkpoint, self.lightning_module)


def attach_checkpoint_hooks(lightning_module: nn.Module, model_attr: str | None) -> None:
    """Write adapter metadata on every save and verify every load before the weights (idempotent)."""
    if getattr(lightning_module, _MODULE_HOOKS_FLAG, False):
        return
    for name in ("on_save_checkpoint", "on_load_checkpoint"):
        object.__setattr__(lightning_module, name, _ModuleCheckpointHook(lightning_module, name, model_attr))
    object.__setattr__(lightning_module, _MODULE_HOOKS_FLAG, True)

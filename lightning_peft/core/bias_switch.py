"""Giving a bias-less layer a bias in a way transformers can load back: the config switch that makes one.

A merge that folds a constant into a layer's output (inference-time intervention's shift before the
attention output projection, :mod:`lightning_peft.methods.iti`) needs a bias where many architectures have
none: Llama's ``o_proj`` is ``nn.Linear(..., bias=config.attention_bias)``. In memory the merged layer can
simply get a bias parameter; a *saved* merged model must also say so in its config, or
``from_pretrained`` builds the layer without one and drops the tensor as unexpected. A config switch rarely
covers one layer alone: ``attention_bias=True`` gives the query, key, value and output projections of every
layer a bias, so the merged model carries zero biases for those the merge did not need (zeros change nothing;
a missing bias would be initialised by transformers, which is not a promise we can rely on).

:data:`BIAS_SWITCHES` lists the architectures whose config can switch such biases on, with the layers each
switch covers. An architecture that hard-codes ``bias=False`` (Mistral, Qwen2's ``o_proj``) cannot express
the merged model: :func:`bias_switch_plan` says so before anything is changed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

#: model_type -> (config attribute that gives the layers a bias, the leaf names of the layers it covers).
BIAS_SWITCHES: dict[str, tuple[str, tuple[str, ...]]] = {
    model_type: ("attention_bias", ("q_proj", "k_proj", "v_proj", "o_proj"))
    for model_type in ("llama", "qwen3", "gemma", "gemma2", "granite", "olmo", "olmo2")
}


@dataclass(frozen=True)
class BiasSwitchPlan:
    """What a merged model needs besides the merged layers' new biases: ``config.<attribute> = True`` and a
    zero bias on each of ``zero_biases`` (modules the switch covers that have none and get none from the merge)."""

    attribute: str | None
    zero_biases: tuple[str, ...]


NO_CHANGE = BiasSwitchPlan(None, ())


def bias_switch_plan(model: nn.Module, new_biases: list[str]) -> BiasSwitchPlan:
    """The config change and zero biases that let a saved ``model`` carry biases on ``new_biases`` (module
    names of layers that have none and get one from a merge); raise when its architecture cannot."""
    if not new_biases:
        return NO_CHANGE
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    switch = BIAS_SWITCHES.get(model_type)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in new_biases})
    if switch is None or not set(leaves) <= set(switch[1]):
        raise ValueError(
            f"merging needs a bias on {new_biases[0]!r} (and {len(new_biases) - 1} more), which this {model_type!r} "
            f"architecture builds without one and whose config cannot add one (config switches are known for: "
            f"{', '.join(sorted(BIAS_SWITCHES))}). Serve the model with the adapter loaded (lightning_peft.load_adapter) "
            f"instead of merging"
        )
    attribute, covered = switch
    needing = set(new_biases)
    zero = []
    for name, module in model.named_modules():
        layer = getattr(module, "base_layer", module)  # another method's wrapper: its base layer's bias counts
        if name.rsplit(".", 1)[-1] in covered and name not in needing and isinstance(layer, nn.Linear) and layer.bias is None:
            zero.append(name)
    return BiasSwitchPlan(attribute, tuple(zero))

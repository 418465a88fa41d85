"""Prompt tuning: Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"
(arXiv:2104.08691).

``P`` learned "soft prompt" vectors are prepended to the token embeddings of every input; the model
itself is frozen::

    h_0 = [p_1, ..., p_P, e(x_1), ..., e(x_T)]          p_i: (hidden,), P x hidden parameters in all

The attention mask, labels and positions are extended around them (see
:mod:`lightning_peft.methods.virtual_tokens`), so a plain ``model(input_ids=..., labels=...)`` call
returns the loss on the real tokens and logits aligned with them.

Initialisation (Lester et al., section 3.2):

- ``init="random"``: uniform in [-0.5, 0.5], as in the paper;
- ``init="vocab"``: embeddings of tokens drawn uniformly from the vocabulary (the paper draws from the
  5,000 most frequent tokens; the tokenizer's frequency order is not available in general);
- ``init="text"``: the embeddings of ``init_text``'s tokens (e.g. a task description), repeated or cut
  to ``P`` (Lester et al. use class labels; HF peft's "TEXT" init does the same as ours).

The adapter file is HF peft's: ``adapter_config.json`` with ``peft_type: "PROMPT_TUNING"`` and one
tensor ``prompt_embeddings`` of shape (P, hidden). Prompts cannot be merged into weights; vLLM does
not serve them (it serves LoRA adapters only).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
from torch import nn

from lightning_peft.core.model_geometry import ModelGeometry, input_embeddings
from lightning_peft.methods.virtual_tokens import VirtualTokenMethod, VirtualTokens, check_choice, prepend_to_labels

PromptInit = Literal["random", "vocab", "text"]
#: Lester et al.'s random init: uniform in [-RANDOM_RANGE, RANDOM_RANGE].
RANDOM_RANGE = 0.5


class VirtualPrompt(VirtualTokens):
    """``P`` virtual input embeddings (P, hidden), optionally produced by a prompt encoder from trainable
    inputs (P-tuning); prepended to the token embeddings of every call that starts a sequence."""

    def start_sequence(self, model: nn.Module, call: dict[str, Any], batch: int, length: int) -> None:
        embeds = call.get("inputs_embeds")
        if embeds is None:
            embeds = input_embeddings(model)(call["input_ids"])  # (B, T, hidden)
        prompt = self.values().to(device=embeds.device, dtype=embeds.dtype)  # (P, hidden)
        call["inputs_embeds"] = torch.cat([prompt.expand(batch, -1, -1), embeds], dim=1)  # (B, P+T, hidden)
        call["input_ids"] = None
        call["labels"] = prepend_to_labels(call.get("labels"), self.num_virtual_tokens, length)
        token_types = call.get("token_type_ids")
        if token_types is not None:
            call["token_type_ids"] = torch.cat([token_types.new_zeros(batch, self.num_virtual_tokens), token_types], dim=1)


class PromptTuning(VirtualTokenMethod):
    """Prompt tuning config: ``PEFTCallback(PromptTuning(num_virtual_tokens=20, init="text", init_text="..."))``.

    Args:
        num_virtual_tokens: the prompt length ``P`` (Lester et al. find 20 enough, beyond it little gain).
        init: ``"random"``, ``"vocab"`` (sampled vocabulary embeddings) or ``"text"`` (``init_text``'s embeddings).
        init_text: the text whose token embeddings start the prompt (``init="text"`` only).
        tokenizer: name or path of the tokenizer for ``init_text``; default: the model's own
            (``config._name_or_path``).
        modules_to_save: modules trained in full (e.g. ``["classifier"]`` for a new classification head).

    Example::

        >>> PromptTuning(num_virtual_tokens=8).num_virtual_tokens
        8
    """

    name = "prompt_tuning"
    peft_type = "PROMPT_TUNING"

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        init: PromptInit = "random",
        init_text: Optional[str] = None,
        tokenizer: Optional[str] = None,
        modules_to_save: Optional[list[str]] = None,
    ) -> None:
        super().__init__(num_virtual_tokens, modules_to_save)
        check_choice(init, PromptInit, "prompt init")
        if init == "text" and not init_text:
            raise ValueError("init='text' needs init_text, the text whose token embeddings start the prompt (e.g. 'Classify the sentiment:')")
        if init != "text" and init_text is not None:
            raise ValueError(f"init_text={init_text!r} is only used with init='text' (got init={init!r})")
        self.init = init
        self.init_text = init_text
        self.tokenizer = tokenizer

    def build(self, model: nn.Module, geometry: ModelGeometry) -> VirtualTokens:
        return VirtualPrompt(self.initial_prompt(model, geometry), geometry)

    def initial_prompt(self, model: nn.Module, geometry: ModelGeometry) -> torch.Tensor:
        """(P, hidden) starting values, on the embeddings' device."""
        table = input_embeddings(model).weight  # (vocab, hidden)
        size = (self.num_virtual_tokens, geometry.hidden_size)
        if self.init == "random":
            return torch.empty(size, device=table.device).uniform_(-RANDOM_RANGE, RANDOM_RANGE)
        ids = self._text_ids(model) if self.init == "text" else torch.randint(0, table.shape[0], (self.num_virtual_tokens,))
        return table.detach()[ids.to(table.device)].float().clone()

    def _text_ids(self, model: nn.Module) -> torch.Tensor:
        from transformers import AutoTokenizer

        source = self.tokenizer or getattr(getattr(model, "config", None), "_name_or_path", None)
        if not source:
            raise ValueError("init='text' needs a tokenizer: pass tokenizer=<name or path> (the model does not say where it came from)")
        ids = AutoTokenizer.from_pretrained(source)(self.init_text)["input_ids"]
        if not ids:
            raise ValueError(f"init_text={self.init_text!r} tokenizes to no tokens")
        repeats = math.ceil(self.num_virtual_tokens / len(ids))
        return torch.tensor((ids * repeats)[: self.num_virtual_tokens])

    def peft_config(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        # The file holds the trained prompt, so peft must not initialise anything from text.
        return {**super().peft_config(model, targets), "prompt_tuning_init": "RANDOM"}

    def exported(self) -> PromptTuning:
        # A saved prompt is trained values: rebuilding it needs no init text or tokenizer.
        return PromptTuning(self.num_virtual_tokens, modules_to_save=self.modules_to_save or None)

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> PromptTuning:
        return cls(config["num_virtual_tokens"], modules_to_save=config.get("modules_to_save"))

"""Which of our methods reads an adapter file of a given HF peft ``peft_type``."""

from __future__ import annotations

from lightning_peft.methods.base import PEFTMethod
from lightning_peft.methods.ia3 import IA3
from lightning_peft.methods.llama_adapter import LlamaAdapter
from lightning_peft.methods.lora import LoRA
from lightning_peft.methods.p_tuning import PTuning
from lightning_peft.methods.prefix_tuning import PrefixTuning
from lightning_peft.methods.prompt_tuning import PromptTuning

PEFT_TYPES: dict[str, type[PEFTMethod]] = {
    "LORA": LoRA,
    "IA3": IA3,
    "PROMPT_TUNING": PromptTuning,
    "P_TUNING": PTuning,
    "PREFIX_TUNING": PrefixTuning,
    "ADAPTION_PROMPT": LlamaAdapter,
}


def method_for_peft_type(peft_type: str | None) -> type[PEFTMethod]:
    if peft_type not in PEFT_TYPES:
        raise ValueError(f"unsupported adapter peft_type {peft_type!r}; this version reads {sorted(PEFT_TYPES)}")
    return PEFT_TYPES[peft_type]

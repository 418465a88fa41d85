"""PEFT methods: one module per method holding its config, its layer(s) and how it is injected."""

from lightning_peft.methods.adapter import Adapter, BottleneckAdapterLayer
from lightning_peft.methods.base import PEFTMethod, method_from_dict
from lightning_peft.methods.bitfit import BitFit, BitFitLayer
from lightning_peft.methods.compacter import Compacter
from lightning_peft.methods.dora import DoRA, DoRALayer
from lightning_peft.methods.ia3 import IA3, IA3Layer
from lightning_peft.methods.llama_adapter import AdaptedAttention, LlamaAdapter
from lightning_peft.methods.lora import LoRA, LoRALayer
from lightning_peft.methods.p_tuning import PTuning
from lightning_peft.methods.prefix_tuning import PrefixTuning
from lightning_peft.methods.prompt_tuning import PromptTuning

__all__ = [
    "AdaptedAttention",
    "Adapter",
    "BitFit",
    "BitFitLayer",
    "BottleneckAdapterLayer",
    "Compacter",
    "DoRA",
    "DoRALayer",
    "IA3",
    "IA3Layer",
    "LlamaAdapter",
    "LoRA",
    "LoRALayer",
    "PEFTMethod",
    "PTuning",
    "PrefixTuning",
    "PromptTuning",
    "method_from_dict",
]

"""PEFT methods: one module per method holding its config, its layer(s) and how it is injected."""

from lightning_peft.methods.adapter import Adapter, BottleneckAdapterLayer
from lightning_peft.methods.base import PEFTMethod, method_from_dict
from lightning_peft.methods.bitfit import BitFit, BitFitLayer
from lightning_peft.methods.compacter import Compacter
from lightning_peft.methods.dora import DoRA, DoRALayer
from lightning_peft.methods.ia3 import IA3, IA3Layer
from lightning_peft.methods.lora import LoRA, LoRALayer

__all__ = [
    "Adapter",
    "BitFit",
    "BitFitLayer",
    "BottleneckAdapterLayer",
    "Compacter",
    "DoRA",
    "DoRALayer",
    "IA3",
    "IA3Layer",
    "LoRA",
    "LoRALayer",
    "PEFTMethod",
    "method_from_dict",
]

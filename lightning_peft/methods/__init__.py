"""PEFT methods: one module per method holding its config, its layer(s) and how it is injected."""

from lightning_peft.methods.base import PEFTMethod, method_from_dict
from lightning_peft.methods.dora import DoRA, DoRALayer
from lightning_peft.methods.lora import LoRA, LoRALayer

__all__ = ["PEFTMethod", "method_from_dict", "DoRA", "DoRALayer", "LoRA", "LoRALayer"]

"""lightning_peft: parameter-efficient fine-tuning for PyTorch Lightning.

    trainer = L.Trainer(callbacks=[PEFTCallback(LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))])
"""

from lightning_peft.callback import PEFTCallback
from lightning_peft.core.fingerprint import BaseModelMismatchError
from lightning_peft.core.injection import apply_peft, parameter_summary
from lightning_peft.export.adapter_dir import AdapterFileError
from lightning_peft.export.peft_format import load_adapter, save_adapter
from lightning_peft.merge import disable_adapters, merge_adapters, unmerge_adapters
from lightning_peft.methods import IA3, Adapter, BitFit, Compacter, DoRA, LlamaAdapter, LoRA, PEFTMethod, PrefixTuning, PromptTuning, PTuning
from lightning_peft.mixin import PEFTMixin
from lightning_peft.optim import ParamGroups, apply_lr_scales, build_param_groups, lr_multipliers, param_groups
from lightning_peft.quantization import Quantization

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterFileError",
    "BaseModelMismatchError",
    "BitFit",
    "Compacter",
    "DoRA",
    "IA3",
    "LlamaAdapter",
    "LoRA",
    "PEFTCallback",
    "PEFTMethod",
    "PEFTMixin",
    "PTuning",
    "ParamGroups",
    "PrefixTuning",
    "PromptTuning",
    "Quantization",
    "apply_lr_scales",
    "apply_peft",
    "build_param_groups",
    "disable_adapters",
    "load_adapter",
    "lr_multipliers",
    "merge_adapters",
    "param_groups",
    "parameter_summary",
    "save_adapter",
    "unmerge_adapters",
]

"""lightning_peft: parameter-efficient fine-tuning for PyTorch Lightning.

    trainer = L.Trainer(callbacks=[PEFTCallback(LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))])
"""

from lightning_peft.callback import PEFTCallback
from lightning_peft.core.fingerprint import BaseModelMismatchError
from lightning_peft.core.injection import apply_peft, parameter_summary
from lightning_peft.export.peft_format import AdapterFileError, load_adapter, save_adapter
from lightning_peft.merge import disable_adapters, merge_adapters, unmerge_adapters
from lightning_peft.methods import LoRA, PEFTMethod
from lightning_peft.mixin import PEFTMixin
from lightning_peft.quantization import Quantization

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "BaseModelMismatchError",
    "LoRA",
    "PEFTCallback",
    "PEFTMethod",
    "PEFTMixin",
    "Quantization",
    "apply_peft",
    "disable_adapters",
    "load_adapter",
    "merge_adapters",
    "parameter_summary",
    "save_adapter",
    "unmerge_adapters",
]

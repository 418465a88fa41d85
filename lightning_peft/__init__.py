"""lightning_peft: parameter-efficient fine-tuning for PyTorch Lightning.

    trainer = L.Trainer(callbacks=[PEFTCallback(LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))])
"""

from lightning_peft import _legacy_paths
from lightning_peft.core.fingerprint import BaseModelMismatchError
from lightning_peft.core.injection import apply_peft, parameter_summary
from lightning_peft.formats.adapter_dir import AdapterFileError
from lightning_peft.formats.peft_format import load_adapter, save_adapter
from lightning_peft.integration.callback import PEFTCallback
from lightning_peft.integration.forgetting import ForgettingMonitor
from lightning_peft.integration.mixin import PEFTMixin
from lightning_peft.methods import METHODS, PEFTMethod
from lightning_peft.operations.merging import disable_adapters, merge_adapters, unmerge_adapters
from lightning_peft.operations.param_groups import ParamGroups, apply_lr_scales, build_param_groups, lr_multipliers, param_groups
from lightning_peft.operations.pruning import prune_layers
from lightning_peft.operations.spectrum import WeightSpectrum, weight_spectrum
from lightning_peft.quantization import Quantization

__version__ = "0.1.0"

_legacy_paths.install()  # old module paths (lightning_peft.tasks, lightning_peft.export.*, ...) still import

# Every method class of lightning_peft.methods (LoRA, DoRA, IA3, ...), each registered where it is defined: a new
# method module becomes `from lightning_peft import NewMethod` without an edit here.
globals().update(METHODS)

__all__ = sorted(
    [
        *METHODS,
        "AdapterFileError",
        "BaseModelMismatchError",
        "ForgettingMonitor",
        "PEFTCallback",
        "PEFTMethod",
        "PEFTMixin",
        "ParamGroups",
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
        "prune_layers",
        "save_adapter",
        "unmerge_adapters",
        "WeightSpectrum",
        "weight_spectrum",
    ]
)

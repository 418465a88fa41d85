"""PEFT methods: one module per method holding its config, its layer(s) and how it is injected.

Every module of this package is imported here, so every method class is defined and has registered itself
(:meth:`PEFTMethod.__init_subclass__`): the peft-file reader, the CLI's list of methods and the package's public
names all come from :func:`registered_methods`. A new method is one new module here; nothing else to edit.
"""

import importlib
import pkgutil

from lightning_peft.methods.base import PEFTMethod, method_for_peft_config, method_from_dict, registered_methods

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

#: The method classes, by name (``LoRA``, ``DoRA``, ...), as ``from lightning_peft.methods import LoRA`` reads them.
METHODS = {cls.__name__: cls for cls in registered_methods() if cls.__module__.startswith(__name__)}
globals().update(METHODS)

# Layer classes that tests and users reach through this package.
from lightning_peft.methods.adapter import BottleneckAdapterLayer  # noqa: E402
from lightning_peft.methods.bitfit import BitFitLayer  # noqa: E402
from lightning_peft.methods.dora import DoRALayer  # noqa: E402
from lightning_peft.methods.ia3 import IA3Layer  # noqa: E402
from lightning_peft.methods.iti import ITILayer  # noqa: E402
from lightning_peft.methods.llama_adapter import AdaptedAttention  # noqa: E402
from lightning_peft.methods.lora import LoRALayer  # noqa: E402
from lightning_peft.methods.sparse_ft import SparseFTLayer  # noqa: E402

__all__ = sorted(
    [*METHODS, "PEFTMethod", "method_for_peft_config", "method_from_dict", "registered_methods"]
    + ["AdaptedAttention", "BitFitLayer", "BottleneckAdapterLayer", "DoRALayer", "IA3Layer", "ITILayer", "LoRALayer", "SparseFTLayer"]
)

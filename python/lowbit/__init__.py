"""lowbit: 8-bit and 4-bit quantized linear layers for PyTorch, with native kernels,
bitsandbytes-compatible checkpoints and an accuracy-tradeoff report.

    import lowbit
    model = lowbit.quantize_model(model, lowbit.LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
"""

import torch  # noqa: F401  (first: the native library links against it)

from . import _native

_BUILD = _native.load()

from . import fallback, ops, reference  # noqa: E402, F401  (fallback registers the reference kernels)
from .config import BitsAndBytesConfig, LowbitConfig  # noqa: E402
from .nn import Linear4bit, Linear8bit  # noqa: E402
from .quantize import quantize_model, replace_linears  # noqa: E402
from .fsdp import prepare_fsdp  # noqa: E402
from .integrations.transformers import bnb_checkpoint_config, register as _register_with_transformers  # noqa: E402
from .integrations.export import export_bitsandbytes  # noqa: E402
from .integrations.peft import install_on_import as _connect_peft_when_imported  # noqa: E402
from . import compare  # noqa: E402  (the report: a leaf, nothing above imports it; callable as compare.compare)

_register_with_transformers()
_connect_peft_when_imported()

__version__ = _BUILD["version"]
build_info = _native.build_info
cpu_isa = _native.cpu_isa

__all__ = [
    "BitsAndBytesConfig",
    "Linear4bit",
    "Linear8bit",
    "bnb_checkpoint_config",
    "LowbitConfig",
    "build_info",
    "cpu_isa",
    "compare",
    "export_bitsandbytes",
    "ops",
    "prepare_fsdp",
    "quantize_model",
    "reference",
    "replace_linears",
]

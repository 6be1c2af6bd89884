"""reft_kernels: fused kernels for representation fine-tuning (RED and the ReFT family)."""
from ._activations import ACTIVATION_NAMES
from .lowrank_edit import LowrankEditFunction, lowrank_edit, lowrank_edit_
from .red import RedFunction, red

__version__ = "0.1.0"
__all__ = ["red", "RedFunction", "lowrank_edit", "lowrank_edit_", "LowrankEditFunction", "ACTIVATION_NAMES"]

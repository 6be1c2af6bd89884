"""reft_kernels: fused kernels for representation fine-tuning (RED and the ReFT family).

Functional ops (autograd-aware, any leading shape (..., d)): ``red``, ``lowrank_edit`` (+ in-place
``lowrank_edit_``) and pyreft's six interventions ``loreft``, ``noreft``, ``direft``, ``nodireft``,
``consreft``, ``lobireft`` (each with an in-place twin). Modules: ``RED``, ``LoReFT``, ``NoReFT``,
``DiReFT``, ``NodiReFT``, ``ConsReFT``, ``LoBiReFT``. Eager baselines: ``reft_kernels.reference``.
"""
from ._activations import ACTIVATION_NAMES
from ._backend import available_backends
from .functional import lowrank_edit, lowrank_edit_, red
from .interventions import (
    consreft, consreft_, direft, direft_, lobireft, lobireft_, loreft, loreft_, nodireft, nodireft_,
    noreft, noreft_,
)
from .modules import RED, ConsReFT, DiReFT, LoBiReFT, LoReFT, NodiReFT, NoReFT
from .ops.lowrank_edit.function import LowrankEditFunction
from .ops.red.function import RedFunction
from .orthogonal import orthonormal_rows

__version__ = "0.1.0"
__all__ = [
    "red", "RedFunction", "lowrank_edit", "lowrank_edit_", "LowrankEditFunction",
    "loreft", "noreft", "direft", "nodireft", "consreft", "lobireft",
    "loreft_", "noreft_", "direft_", "nodireft_", "consreft_", "lobireft_",
    "RED", "LoReFT", "NoReFT", "DiReFT", "NodiReFT", "ConsReFT", "LoBiReFT",
    "orthonormal_rows", "available_backends", "ACTIVATION_NAMES",
]

"""reft_kernels: fused kernels for representation fine-tuning (RED and the ReFT family).

Functional ops (autograd-aware, any leading shape (..., d)): ``red``, ``lowrank_edit`` (+ in-place
``lowrank_edit_``) and pyreft's six interventions ``loreft``, ``noreft``, ``direft``, ``nodireft``,
``consreft``, ``lobireft`` (each with an in-place twin). Modules: ``RED``, ``LoReFT``, ``NoReFT``,
``DiReFT``, ``NodiReFT``, ``ConsReFT``, ``LoBiReFT``. Eager baselines: ``reft_kernels.reference``.
"""
# The public names load their modules (and torch) on first access, so that ``import reft_kernels``
# and ``reft-kernels --help`` cost nothing until something is used (PEP 562).
_EXPORTS = {
    "ACTIVATION_NAMES": "._activations",
    "available_backends": "._backend",
    "lowrank_edit": ".functional", "lowrank_edit_": ".functional", "red": ".functional",
    "red_multi": ".multi", "lowrank_edit_multi": ".multi", "lowrank_edit_multi_": ".multi",
    **{name: ".interventions" for name in (
        "consreft", "consreft_", "direft", "direft_", "lobireft", "lobireft_", "loreft", "loreft_",
        "nodireft", "nodireft_", "noreft", "noreft_")},
    **{name: ".modules" for name in ("RED", "ConsReFT", "DiReFT", "LoBiReFT", "LoReFT", "NodiReFT", "NoReFT")},
    "LowrankEditFunction": ".ops.lowrank_edit.function",
    "RedFunction": ".ops.red.function",
    "orthonormal_rows": ".orthogonal",
    "kernels": ".ops.variants",
}


def __getattr__(name):
    import importlib

    module = _EXPORTS.get(name)
    if module is None:  # a submodule (``rk.reference``, ``rk._cuda``), as an eager import made them
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"
__all__ = [
    "red", "RedFunction", "lowrank_edit", "lowrank_edit_", "LowrankEditFunction",
    "red_multi", "lowrank_edit_multi", "lowrank_edit_multi_",
    "loreft", "noreft", "direft", "nodireft", "consreft", "lobireft",
    "loreft_", "noreft_", "direft_", "nodireft_", "consreft_", "lobireft_",
    "RED", "LoReFT", "NoReFT", "DiReFT", "NodiReFT", "ConsReFT", "LoBiReFT",
    "orthonormal_rows", "available_backends", "ACTIVATION_NAMES", "kernels",
]

"""The CPU extension: C++ ops for the calls whose cost on a CPU is their launches and Python, not
their arithmetic, built on first use with the machine's C++ compiler (``lowrank_rows.cpp``,
``lowrank_all.cpp``, ``red.cpp``, ``const_rows.cpp``, ``row_kernels.h``, ``common.h``;
docs/backends.md, "The CPU extension").

- ``torch.ops.reft_kernels_cpu.lowrank_rows_``: the in-place low-rank edit of listed rows,
  forward and backward each one pass, with its autograd node in C++. A model's ReFT hooks call
  ``lowrank_edit_`` once per layer and step; on the PyTorch path that call is 7 ATen launches
  forward and 9 backward plus an autograd Function in Python, and inside a training step,
  between the model's large matrix products, each launch or Python call costs 30-40 us (caches
  cold). Measured in the d = 256 LLaMA step of ``bench --e2e`` at f7+l7 on the 2-core CPU (6
  layers, 56 of 1024 rows; both paths in one process, alternating steps, 30 rounds): the hook's
  forward 524 -> 209 us per layer, the step's backward 95.0 -> 90.8 ms against 89.2 frozen, the
  whole step +4.6% -> +1.2% over the frozen step (+3.2% -> +1.8% in a 40-round rerun).
- ``torch.ops.reft_kernels_cpu.red``: RED, ``y = h * scale + bias``, the same way (one op
  forward, one backward, against ``addcmul`` and a Python backward of 3-4 launches). In the same
  step with RED on every layer (40 rounds): +2.4% -> -0.2% over the frozen step, the naive
  ``h * s + t`` hook +1.3%.
- ``torch.ops.reft_kernels_cpu.const_rows``: the edit of every row with a latent that is one row
  (LoBiReFT's ``h + b R``): one op forward, and backward one op for the parameters while ``dh``
  is the incoming gradient itself, as eager's add (against 2-3 small launches and an add
  forward and a Python backward).
- ``torch.ops.reft_kernels_cpu.lowrank_all``: the edit of every row otherwise (LoReFT, NoReFT,
  DiReFT, NodiReFT, ConsReFT without an index), one pass over the rows forward and one backward,
  bfloat16 rows read into float in registers (against the PyTorch path's products, on float32
  copies for bfloat16 rows); the per-row kernels are ``lowrank_rows_``'s (``row_kernels.h``).

When they run: ``lowrank_edit_`` with an index of at most ``MAX_ROWS`` entries
(``lowrank_rows_applies``; ``lowrank_edit`` with an index edits a copy through it), ``red``
(``red_applies``), ``lowrank_edit`` without an index, no ``A`` and no ``C``
(``const_rows_applies``), and ``lowrank_edit`` without an index otherwise, up to
``LOWRANK_ALL_MAX_RANK`` (``lowrank_all_applies``; float32 and bfloat16 ``h`` only), on the
PyTorch backend, outside ``torch.compile``, ``torch.func`` transforms and forward-mode AD, on a
contiguous float32, float64 or bfloat16 CPU ``h`` with every parameter contiguous in ``h``'s
dtype (or float32 beside bfloat16 ``h``), plain tensors (no subclass such as DTensor). ``red``
and ``lowrank_edit`` with a one-row latent reach their op before their own Python checks
(``quick_op``; the op checks its arguments in C++, and a call it refuses takes the checked
path). The autograd nodes of ``red``, ``const_rows`` and ``lowrank_all`` are plain ``Node``s
(docs/backends.md). Numerics: float32 and float64 rows in their own dtype throughout, as the
PyTorch path; bfloat16 rows read into float, float arithmetic and sums, one rounding per
element written; sums over rows by fixed blocks added in order, so the same bits whatever the
number of threads (see each source's header).

Build: ``torch.utils.cpp_extension.load`` (ninja and the C++ compiler torch extensions need),
once per torch version, Python version, CPU capability, source text and compiler flags
(``build_dir``; ``_flags``: 512-bit vectors where torch reports AVX512), into
``$REFT_KERNELS_CACHE/cpu_ext`` (default ``~/.cache/reft_kernels/cpu_ext``); about 15-30 s on 2
cores, then a load of the cached library. ``REFT_KERNELS_CPU_EXT=0`` turns it off (the PyTorch path runs); a build that fails
warns once, naming the compiler's first error, and the PyTorch path runs. ``reft-kernels info``
builds it and reports the outcome.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path

import torch

from .._environ import EnvSwitch

ENV_VAR = "REFT_KERNELS_CPU_EXT"
_ENABLED = EnvSwitch(ENV_VAR, lambda v: v.strip().lower() not in ("0", "false", "no", "off"))
SOURCES = [Path(__file__).resolve().parent / name
           for name in ("lowrank_rows.cpp", "lowrank_all.cpp", "red.cpp", "const_rows.cpp")]
HEADERS = [Path(__file__).resolve().parent / name for name in ("common.h", "row_kernels.h")]
# Index entries above which the PyTorch path takes the call (measured up to here). Measured on
# the 2-core CPU, both on two threads (fwd + bwd of the in-place edit of n of max(n, 1024) rows,
# r = 8, median of 60), PyTorch path time over the extension's: d = 256: 2.01 (n = 128), 1.59
# (512), 1.05 (1024), 0.77 (2048), 1.31 (4096); d = 576: 1.58, 1.11, 1.10, 1.04, 1.18. Inside the
# d = 256 step at every position (1024 rows a layer; A/B, 30 rounds): the hook's forward 1053 ->
# 769 us per layer, the step +5.7% -> +4.6% over the frozen one.
MAX_ROWS = 4096
# The ranks up to which lowrank_edit over every row takes ``lowrank_all`` (h's dtype: r), measured
# on the 2-core CPU (AMD EPYC, AVX-512, two threads; LoReFT, DiReFT and ConsReFT, parameters in
# float32; ms forward / forward + backward, the PyTorch path against lowrank_all, in alternating
# rounds in one process). bfloat16 h, N = 1024, d = 768: r = 8, 0.33-0.43 / 1.4-1.7 against
# 0.13-0.16 / 0.49-0.54; r = 32, 0.62-0.79 / 2.8-3.0 against 0.55-0.57 / 2.1-2.2; r = 64,
# 1.23-1.48 / 5.3-6.0 against 1.09-1.20 / 3.7-4.5; r = 128, 2.39-2.53 / 8.9-10.0 against
# 2.28-2.35 / 7.6-9.6. N = 4096, d = 2048, r = 8: 7.7 / 25-27 against 2.2-2.5 / 8.1-8.5. float32
# h, N = 1024, d = 768: r = 1, 0.17-0.23 / 0.76-1.0 against 0.07 / 0.28-0.31; r = 8, 0.29-0.32 /
# 1.42-1.45 against 0.14-0.15 / 0.50-0.67; r = 32, 0.55-0.56 / 2.1-2.2 against 0.57-0.58 /
# 1.7-1.9; r = 64, 1.12-1.18 / 4.0-4.3 against 1.14-1.16 / 3.5-4.3. Higher ranks are unmeasured
# and stay on the PyTorch path; so do float64 h (the op takes it) and float16 (it does not).
LOWRANK_ALL_MAX_RANK = {torch.float32: 64, torch.bfloat16: 128}
# every op takes bfloat16 rows too (float inside, one rounding per element), their parameters
# in h's dtype or float32 (common.h, "Storage and accumulation types")
_ROW_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_PLAIN = (torch.Tensor, torch.nn.Parameter)

_lock = threading.Lock()
_state: dict = {}  # "ops": {name: OpOverload} once loaded; "error": why it is not available


def enabled() -> bool:
    """False when ``REFT_KERNELS_CPU_EXT`` turns the extension off (0, false, no, off); read at
    every call (``_environ.py``)."""
    return _ENABLED()


def build_dir() -> Path:
    """One folder per torch version, Python version, CPU capability, source text and compiler
    flags: two installs that differ in any of them (another release, another checkout) never
    rebuild over each other's library or load a stale one."""
    root = os.environ.get("REFT_KERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "reft_kernels")
    cap = torch.backends.cpu.get_cpu_capability()
    src = hashlib.sha1(b"".join(p.read_bytes() for p in (*SOURCES, *HEADERS)) + " ".join(_flags()).encode()).hexdigest()[:12]
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}-{cap.lower()}-{src}"
    return Path(root) / "cpu_ext" / tag


def _openmp() -> list[str]:
    """-fopenmp on Linux, where torch's intra-op threads are GCC's OpenMP: at::parallel_for (the
    ops' row blocks) is OpenMP in torch's headers and runs serially without it. Elsewhere (Apple
    clang takes no plain -fopenmp) the ops are built without it: the same results, one thread."""
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def _flags() -> list[str]:
    """Compiler flags: -O3, OpenMP, and the vector width of the CPU capability torch reports
    (``torch.backends.cpu.get_cpu_capability()``, the one ATen's own kernels run with): 256-bit
    AVX2 with FMA, plus 512-bit vectors where it reports AVX512. Measured on the 2-core CPU (AMD
    EPYC with AVX-512, fp32, d = 256, r = 8, 1024 listed rows, one thread): the listed-row
    forward and backward ops 179-181 and 314-321 us with -mavx2 -mfma, 130-132 and 220-224 us with
    the 512-bit flags, the same source (``lowrank_rows.cpp``, ``add_rows``). The 512-bit flags
    include AVX512BW and AVX512DQ (which torch's AVX512 capability requires too): without BW the
    16-bit lanes of a bfloat16 row do not vectorize (LoBiReFT's forward over (4096, 2048)
    bfloat16 rows: 2.31 ms without, 0.42 ms with; eager 0.65 ms)."""
    flags = ["-O3", *_openmp()]
    cap = torch.backends.cpu.get_cpu_capability()
    if cap in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    if cap == "AVX512":
        flags += ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mprefer-vector-width=512"]
    return flags


def _load():
    from torch.utils.cpp_extension import load

    path = build_dir()
    path.mkdir(parents=True, exist_ok=True)
    load(name="reft_kernels_cpu", sources=[str(p) for p in SOURCES], extra_cflags=_flags(), extra_ldflags=_openmp(),
         is_python_module=False, build_directory=str(path), verbose=False)
    ops = torch.ops.reft_kernels_cpu
    return {"lowrank_rows_": ops.lowrank_rows_.default, "lowrank_all": ops.lowrank_all.default,
            "red": ops.red.default, "const_rows": ops.const_rows.default}


def _call(name):
    """The C++ callable behind the op ``name`` (its OpOverload's own ``_op``: the Python
    ``__call__`` around it costs about 1 us a call), or None (see ``_ops``)."""
    ops = _state.get("ops") or _ops()
    return None if ops is None else ops[name]._op


def _ops():
    """The extension's ops by name (built or loaded on the first call), or None when the
    extension is turned off or could not be built (warned once, with the reason)."""
    ops = _state.get("ops")
    if ops is not None or "error" in _state:
        return ops
    if not enabled():
        return None
    with _lock:
        if "ops" not in _state and "error" not in _state:
            try:
                _state["ops"] = _load()
            except Exception as exc:  # no compiler, no ninja, a failed compile: the PyTorch path runs
                _state["error"] = _reason(exc)
                warnings.warn(
                    f"reft_kernels: the CPU extension could not be built ({_state['error']}); the PyTorch "
                    f"path runs instead (set {ENV_VAR}=0 to skip the attempt)", RuntimeWarning, stacklevel=3)
    return _state.get("ops")


def _reason(exc) -> str:
    """One line from a failed build: the compiler's first error where there is one (a failed
    compile ends with ninja's "build stopped"), else the message's last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    first_error = next((line for line in lines if ": error:" in line or "fatal error" in line), None)
    return f"{type(exc).__name__}: {first_error or (lines[-1] if lines else '')}"


def lowrank_rows_op():
    """The op ``reft_kernels_cpu::lowrank_rows_``, or None (see ``_ops``)."""
    ops = _ops()
    return None if ops is None else ops["lowrank_rows_"]


def red_op():
    """The op ``reft_kernels_cpu::red``, or None (see ``_ops``)."""
    ops = _ops()
    return None if ops is None else ops["red"]


def status() -> str:
    """One line for ``reft-kernels info``: built (and where), turned off, or why it failed."""
    if not enabled():
        return f"off ({ENV_VAR}=0)"
    return f"built ({build_dir()})" if _ops() is not None else f"not built: {_state['error']}"


def _rows_apply(h, params) -> bool:
    """Whether red, const_rows and lowrank_all take ``h`` with ``params`` (each None or a
    tensor): a plain contiguous float32, float64 or bfloat16 CPU ``h`` with at least one element,
    every parameter plain and contiguous in ``h``'s dtype (or float32 beside bfloat16 ``h``), the
    extension on and not failed. The test of ``red_applies``, ``const_rows_applies``,
    ``lowrank_all_applies`` and ``quick_op``."""
    if not (type(h) in _PLAIN and h.dtype in _ROW_DTYPES and h.is_cpu and h.is_contiguous() and h.numel() > 0):
        return False
    dtype = h.dtype
    also = torch.float32 if dtype == torch.bfloat16 else dtype
    # no device test: the checked path has checked the devices before it asks, and the op
    # refuses a wrong one
    for t in params:
        if t is not None and (type(t) not in _PLAIN or (t.dtype != dtype and t.dtype != also) or not t.is_contiguous()):
            return False
    return enabled() and "error" not in _state


def lowrank_rows_applies(h, index, A, a, B, C, c, any_layout=False) -> bool:
    """Whether the checked call ``lowrank_edit_(h, ...)`` on the PyTorch backend, ``index`` the
    checked (contiguous int64) index and ``C`` None when tied, is this extension's (see the
    module docstring); ``any_layout``: all but ``h``'s contiguity (``lowrank_edit`` with an
    index, which edits a copy of ``h``). Does not build anything; ``lowrank_rows_`` may still
    find it missing."""
    if not (h.dtype in _ROW_DTYPES and h.is_cpu and type(h) in _PLAIN and (any_layout or h.is_contiguous())
            and 0 < index.numel() <= MAX_ROWS and type(index) is torch.Tensor):
        return False
    also = torch.float32 if h.dtype == torch.bfloat16 else h.dtype
    return (all(t is None or (type(t) in _PLAIN and t.dtype in (h.dtype, also) and t.is_cpu and t.is_contiguous())
                for t in (B, A, a, C, c))
            and enabled() and "error" not in _state)


def lowrank_rows_(h, index, A, a, B, C, c, spec):
    """The edit through the extension, or None when it is not available (the caller then takes
    the PyTorch path)."""
    op = _call("lowrank_rows_")
    return None if op is None else op(h, index, A, a, B, C, c, spec.act, spec.tied)


def lowrank_all_applies(h, A, a, B, C, c) -> bool:
    """Whether the checked call ``lowrank_edit(h, B, A, a, C, c)`` over every row (no index) on
    the PyTorch backend, ``C`` None when tied, is this extension's ``lowrank_all``: a plain
    contiguous float32 or bfloat16 CPU ``h`` with at least one row, a rank up to
    ``LOWRANK_ALL_MAX_RANK[h.dtype]``, every parameter plain and contiguous in ``h``'s dtype (or
    float32 beside bfloat16 ``h``). Does not build anything."""
    max_rank = LOWRANK_ALL_MAX_RANK.get(h.dtype)
    return max_rank is not None and B.shape[0] <= max_rank and _rows_apply(h, (A, a, B, C, c))


def lowrank_all(h, A, a, B, C, c, spec):
    """``lowrank_edit`` over every row through the extension (``C`` None when tied), or None
    when it is not available."""
    op = _call("lowrank_all")
    return None if op is None else op(h, A, a, B, C, c, spec.act, spec.tied)


def red_applies(h, scale, bias) -> bool:
    """Whether the checked call ``red(h, scale, bias)`` on the PyTorch backend is this
    extension's: a contiguous float32/float64 CPU ``h`` with at least one row and the parameters
    contiguous in its dtype, plain tensors. Does not build anything."""
    return _rows_apply(h, (scale, bias))


def const_rows_applies(h, a, B, c) -> bool:
    """Whether the checked call ``lowrank_edit(h, B, None, a, None, c)`` (every row, a latent
    that is one row: LoBiReFT and the other a/c-only term patterns, not tied) on the PyTorch
    backend is this extension's: as ``red_applies``. Does not build anything."""
    return _rows_apply(h, (a, B, c))


def quick_op(name, h, params):
    """The op ``name`` (``"red"``, ``"const_rows"``) for a call of the public op that this
    extension takes (``_rows_apply``), found before any of the op's Python checks, or None. The
    caller has established the PyTorch backend outside torch.compile, ``torch.func`` transforms
    and forward-mode AD (``functional._quick``). The op checks the rest itself (shapes,
    ``r >= 1``) and raises before it computes anything; the caller then takes its checked path,
    which names the problem."""
    return _call(name) if _rows_apply(h, params) else None


def const_rows(h, a, B, c, spec):
    """``h + (act(a) - c) B`` through the extension, or None when it is not available."""
    op = _call("const_rows")
    return None if op is None else op(h, a, B, c, spec.act)


def red(h, scale, bias):
    """``y = h * scale + bias`` through the extension, or None when it is not available."""
    op = _call("red")
    return None if op is None else op(h, scale, bias)

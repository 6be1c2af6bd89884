"""The CUDA backend's Python side, testable without a GPU.

- The torch.library ops (``reft_kernels::red_fwd`` ...) pass ``torch.library.opcheck``: schema,
  mutation annotations, fake implementations against the real outputs.
- ``red``/``lowrank_edit`` routed to the "cuda" backend (the dispatch patched, so this runs on
  the CPU too, where the ops run their PyTorch implementation) match the float64 reference,
  every gradient included: the autograd Functions, the saved tensors and the op contracts.
- ``torch.compile(fullgraph=True)`` traces through the ops, index path included.
- Build flags, the missing-extension error, and the nvcc compile check of ``csrc/``.

On a GPU with the extension built, the same tests run the CUDA kernels (and the ``backend``
fixture adds "cuda" to every op test of the suite).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reft_kernels
from reft_kernels import _cuda, lowrank_edit, lowrank_edit_, red
from reft_kernels.ops.lowrank_edit.cuda_impl import (
    lowrank_edit_bwd_op, lowrank_edit_fwd_inplace_op, lowrank_edit_fwd_op,
)
from reft_kernels.ops.red.cuda_impl import red_bwd_op, red_fwd_op

from .._helpers import (
    MIXED_DTYPE_CASES, check_against_reference, lowrank_ref_fn, make_base, make_lowrank_params, make_red_params,
    padded_index, red_ref_fn, run_with_grads,
)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "csrc"))
import build_config  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_ops = pytest.mark.skipif(DEVICE.type == "cuda" and not _cuda.extension_available(),
                               reason="a GPU without the extension: the ops' CUDA kernels cannot run")


@pytest.fixture
def cuda_route(monkeypatch):
    """red/lowrank_edit pick the "cuda" backend on this machine's device (on the CPU, through the
    ops' PyTorch implementations: ``_cuda.on_host()`` without an extension)."""
    monkeypatch.setenv("REFT_KERNELS_BACKEND", "cuda")
    with _cuda.on_host():
        yield


# ----------------------------------------------------------------------------- opcheck

@needs_ops
@pytest.mark.parametrize("terms", ["st", "s", "t", ""])
def test_red_ops_opcheck(terms):
    h = torch.randn(5, 12, device=DEVICE)
    p = make_red_params(12, terms=terms, device=DEVICE, requires_grad=False)
    torch.library.opcheck(red_fwd_op, (h, p["scale"], p["bias"]))
    for need in [(True, True, True), (True, False, False), (False, True, True)]:
        torch.library.opcheck(red_bwd_op, (h, h, p["scale"], *need))


@needs_ops
@pytest.mark.parametrize("act,tied,terms", [(0, True, "BAac"), (2, False, "BAaCc"), (1, False, "BA"),
                                            (0, False, "Bac"), (4, True, "BC")],
                         ids=["loreft", "gelu_untied", "relu_direft", "consts", "silu_tied_noA"])
def test_lowrank_ops_opcheck(act, tied, terms):
    n, d, r = 6, 16, 3
    h = torch.randn(n, d, device=DEVICE)
    p = make_lowrank_params(d, r, terms=terms, tied=tied, device=DEVICE, requires_grad=False)
    A, a, B, c = p["A"], p["a"], p["B"], p["c"]
    C = None if tied else p["C"]
    save_u = act != 0
    torch.library.opcheck(lowrank_edit_fwd_op, (h, A, a, B, C, c, act, tied, save_u))
    idx = torch.tensor([4, -1, 0, 2], device=DEVICE)
    torch.library.opcheck(lowrank_edit_fwd_inplace_op, (h.clone(), idx, A, a, B, C, c, act, tied, save_u))
    _, z, u = lowrank_edit_fwd_op(h, A, a, B, C, c, act, tied, save_u)
    z2, u2, hsave = lowrank_edit_fwd_inplace_op(h.clone(), idx, A, a, B, C, c, act, tied, save_u)
    g = torch.randn(n, d, device=DEVICE)
    for need in [(True,) * 6, (False, A is not None, False, True, False, False), (True, False, False, False, False, False)]:
        torch.library.opcheck(lowrank_edit_bwd_op,
                              (g, h, None, A, B, C, z, u if save_u else None, act, tied, list(need)))
        torch.library.opcheck(lowrank_edit_bwd_op,
                              (g, hsave, idx, A, B, C, z2, u2 if save_u else None, act, tied, list(need)))


# ----------------------------------------------------------------------------- through the Functions

@needs_ops
@pytest.mark.parametrize("layout,lead", [("contiguous", (3, 5)), ("strided_cols", (4, 3)), ("col_major", (9,))])
@pytest.mark.parametrize("terms", ["st", "s", "t"])
def test_red_cuda_route_fp32(cuda_route, layout, lead, terms):
    base, view = make_base(layout, lead, 13, device=DEVICE)
    base.requires_grad_()
    p = make_red_params(13, terms=terms, device=DEVICE)
    check_against_reference(red, red_ref_fn, base, view, p)


@needs_ops
@pytest.mark.parametrize("name,h_dtype,p_dtype", MIXED_DTYPE_CASES, ids=[c[0] for c in MIXED_DTYPE_CASES])
def test_red_cuda_route_dtypes(cuda_route, name, h_dtype, p_dtype):
    base, view = make_base("contiguous", (6, 4), 24, dtype=h_dtype, device=DEVICE)
    base.requires_grad_()
    check_against_reference(red, red_ref_fn, base, view, make_red_params(24, p_dtype, device=DEVICE))


@needs_ops
@pytest.mark.parametrize("mode", ["out", "inplace_all", "out_index", "inplace_index"])
@pytest.mark.parametrize("act,tied,terms", [(None, True, "BAac"), ("gelu", False, "BAaCc"), ("relu", False, "BA"),
                                            ("silu", True, "BC"), (None, False, "Bac")],
                         ids=["loreft", "gelu_untied", "relu_direft", "silu_tied_noA", "consts"])
@pytest.mark.parametrize("layout,lead", [("contiguous", (3, 5)), ("transposed", (3, 4)), ("strided_cols", (11,))])
def test_lowrank_cuda_route_fp32(cuda_route, mode, act, tied, terms, layout, lead):
    d, r = 19, 3
    base, view = make_base(layout, lead, d, device=DEVICE)
    base.requires_grad_()
    p = make_lowrank_params(d, r, terms=terms, tied=tied, device=DEVICE)
    n_rows = view(base).numel() // d
    index = padded_index(n_rows, max(1, n_rows - 4), 2, device=DEVICE) if mode.endswith("index") else None
    inplace = mode.startswith("inplace")
    fn = lowrank_edit_ if inplace else lowrank_edit
    vw = (lambda t: view(t) * 1.0) if inplace else view  # in place needs a non-leaf
    check_against_reference(fn, lowrank_ref_fn, base, vw, p, inplace=inplace,
                            kernel_kwargs=dict(act=act, index=index), ref_kwargs=dict(act=act, index=index))


@needs_ops
@pytest.mark.parametrize("name,h_dtype,p_dtype", MIXED_DTYPE_CASES, ids=[c[0] for c in MIXED_DTYPE_CASES])
@pytest.mark.parametrize("with_index", [False, True], ids=["all", "index"])
def test_lowrank_cuda_route_dtypes(cuda_route, name, h_dtype, p_dtype, with_index):
    d, r = 32, 4
    base, view = make_base("contiguous", (4, 6), d, dtype=h_dtype, device=DEVICE)
    base.requires_grad_()
    p = make_lowrank_params(d, r, p_dtype, tied=True, device=DEVICE)
    index = padded_index(24, 10, 2, device=DEVICE) if with_index else None
    check_against_reference(lowrank_edit, lowrank_ref_fn, base, view, p,
                            kernel_kwargs=dict(act="gelu", index=index), ref_kwargs=dict(act="gelu", index=index))


# ----------------------------------------------------------------------------- torch.compile

@needs_ops
def test_compile_fullgraph_traces_the_ops(cuda_route):
    """One compiled graph (no graph break) over red, an out-of-place edit and an indexed edit;
    outputs and every gradient equal the eager run's."""
    torch._dynamo.reset()
    d, r = 16, 4
    h0 = torch.randn(2, 5, d, device=DEVICE)
    s, t = (torch.randn(d, device=DEVICE, requires_grad=True) for _ in range(2))
    p = make_lowrank_params(d, r, tied=True, device=DEVICE)
    index = torch.tensor([7, -1, 0, 3], device=DEVICE)

    def f(h):
        y = red(h, s, t)
        y = lowrank_edit(y, p["B"], p["A"], p["a"], C=p["B"], act="silu")
        return lowrank_edit(y, p["B"], p["A"], p["a"], C=p["B"], index=index)

    leaves = [s, t, p["B"], p["A"], p["a"]]

    def run(fn):
        h = h0.clone().requires_grad_()
        y = fn(h)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, d, device=DEVICE)).sum(), [h, *leaves])
        return y.detach(), grads

    y_ref, g_ref = run(f)
    y, g = run(torch.compile(f, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- build and errors

def test_parse_archs():
    assert build_config.parse_archs("8.0;9.0") == [("80", False), ("90", False)]
    assert build_config.parse_archs("8.0, 9.0+PTX") == [("80", False), ("90", True)]
    assert build_config.parse_archs("90 100") == [("90", False), ("100", False)]
    assert build_config.parse_archs(None) == build_config.parse_archs(build_config.DEFAULT_ARCHS)
    assert build_config.gencode_flags([("90", True)]) == [
        "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]
    for bad in ["7.5", "abc", ";", "9.x"]:
        with pytest.raises(ValueError, match="REFT_KERNELS_CUDA_ARCHS"):
            build_config.parse_archs(bad)


def test_sources_listed():
    on_disk = sorted(p.name for p in (ROOT / "csrc").glob("*.cu"))
    assert on_disk and build_config.SOURCES == on_disk + ["bindings.cpp"]


@pytest.mark.skipif(_cuda.extension_available(), reason="the extension is built here")
def test_missing_extension_error_says_how_to_build():
    with pytest.raises(RuntimeError, match="no-build-isolation"):
        _cuda.extension()
    assert "cuda" not in reft_kernels.available_backends(DEVICE)


@pytest.mark.skipif(_cuda.host_mode(), reason="the whole-suite CUDA emulation lets backend='cuda' take CPU tensors")
def test_cuda_backend_needs_cuda_tensors():
    h = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        red(h, torch.randn(8), backend="cuda")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        lowrank_edit(h, torch.randn(2, 8), backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available() or not _cuda.extension_available(),
                    reason="needs a GPU and the built extension")
def test_cuda_rank_limit():
    h = torch.randn(3, 8, device="cuda")
    with pytest.raises(ValueError, match="65"):
        lowrank_edit(h, torch.randn(65, 8, device="cuda"), backend="cuda")
    y = lowrank_edit(h, torch.randn(64, 8, device="cuda") * 0.1, backend="cuda")
    assert y.shape == h.shape


# ----------------------------------------------------------------------------- cluster backward (sm_90)

@pytest.mark.skipif(not torch.cuda.is_available() or not _cuda.extension_available(),
                    reason="needs a GPU and the built extension (emulated: test_cuda_cluster_emulated.py)")
@pytest.mark.parametrize("d,r,h_dtype,p_dtype,terms,tied,act,with_index", [
    (4096, 8, torch.bfloat16, torch.bfloat16, "BAac", True, None, False),
    (4096, 8, torch.bfloat16, torch.float32, "BAaCc", False, "gelu", True),
    (1000, 16, torch.float16, torch.float16, "BAaCc", False, "silu", False),
    (257, 3, torch.float32, torch.float32, "BAac", True, None, True),
], ids=["loreft_4096_bf16", "noreft_gelu_4096_bf16_fp32p_index", "r16_1000_fp16", "loreft_257_fp32_index"])
def test_lowrank_cluster_bwd_on_gpu(d, r, h_dtype, p_dtype, terms, tied, act, with_index):
    """kernels(cuda_lowrank_bwd="cluster") on CUDA tensors against the float64 reference, every
    gradient; 600 rows = 38 row blocks, several per cluster; bitwise equal over two runs. That the
    cluster kernel ran is asked of ``cuda_impl.bwd_plan``, the backward's own decision."""
    from reft_kernels.ops.lowrank_edit import cuda_impl

    ext = _cuda.extension()
    if ext.lowrank_edit_bwd_cluster_plan(torch.empty(0, device="cuda"), d, r, 0)[0] == 0:
        pytest.skip("a GPU below sm_90, or a build without sm_90 code: the split kernels run")
    n = 600
    base, view = make_base("contiguous", (n,), d, dtype=h_dtype, device="cuda")
    base.requires_grad_()
    p = make_lowrank_params(d, r, p_dtype, terms=terms, tied=tied, device="cuda")
    index = padded_index(n, n - 40, 8, device="cuda") if with_index else None
    fn = lowrank_edit_ if with_index else lowrank_edit
    vw = (lambda t: view(t) * 1.0) if with_index else view
    kw = dict(act=act, index=index, backend="cuda")
    with reft_kernels.kernels(cuda_lowrank_bwd="cluster"):
        assert cuda_impl.bwd_plan(torch.empty(0, device="cuda"), d, r) == "cluster"
        check_against_reference(fn, lowrank_ref_fn, base, vw, p, inplace=with_index, kernel_kwargs=kw,
                                ref_kwargs=dict(act=act, index=index))
        g = torch.randn(n, d, device="cuda").to(h_dtype)
        (y1, g1), (y2, g2) = (run_with_grads(fn, base, vw, p, g, inplace=with_index, **kw) for _ in range(2))
    assert torch.equal(y1, y2) and all(torch.equal(g1[k], g2[k]) for k in g1)


def test_cuda_compile_check_script():
    """Every csrc/*.cu compiles with nvcc for sm_90 with no spills and no stack frame, and
    bindings.cpp compiles with the host compiler (skipped by the script where nvcc is absent)."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "cuda_compile_check.py"), "--arch", "90"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.endswith(": ok") or "nvcc not found" in last, last


def test_cuda_compile_check_skips_without_nvcc(tmp_path):
    """Where nvcc is absent the check says so and succeeds (CI machines have it; users may not)."""
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}  # no nvcc on PATH, no CUDA_HOME
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "cuda_compile_check.py")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nvcc not found" in proc.stdout and "skipped" in proc.stdout


def test_extension_constants_must_match_the_package():
    """A build whose constants differ from reft_kernels/_constants.py (a stale build) is refused;
    the emulated build of csrc/ passes the same check in test_cuda_emulated.py."""
    from types import SimpleNamespace

    from reft_kernels._constants import CUDA_MAX_RANK, NUM_ACTIVATIONS

    for bad in (SimpleNamespace(MAX_RANK=CUDA_MAX_RANK + 1, NUM_ACTIVATIONS=NUM_ACTIVATIONS),
                SimpleNamespace(MAX_RANK=CUDA_MAX_RANK, NUM_ACTIVATIONS=NUM_ACTIVATIONS - 1),
                SimpleNamespace()):
        with pytest.raises(ImportError, match="built from other sources"):
            with _cuda.on_host(bad):
                pass
    before = _cuda.host_kernels()
    with _cuda.on_host(SimpleNamespace(MAX_RANK=CUDA_MAX_RANK, NUM_ACTIVATIONS=NUM_ACTIVATIONS)):
        assert _cuda.host_kernels()
    assert _cuda.host_kernels() == before  # the previous state is restored

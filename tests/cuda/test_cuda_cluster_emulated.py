"""The one-pass low-rank backward with thread-block clusters (``csrc/lowrank_edit_bwd_cluster.cu``,
``reft_kernels.kernels(cuda_lowrank_bwd="cluster")``), run on the CPU through the host-thread
emulation of ``tests/cuda/emulation`` with clusters and distributed shared memory (the CTAs of a
cluster run together; ``cluster.sync()`` is a barrier over all their threads; ``map_shared_rank``
reads another CTA's dynamic shared memory, which starts as NaN bytes), against the float64
reference, every gradient included.

The cluster size and the number of clusters are forced (``_cuda.on_host(ext, cluster_shape=(C,
Q))``) so that small inputs still reach several CTAs per cluster (some with no columns at all),
several clusters, and several row blocks per cluster (16 rows per block). Which backward runs is
asked of ``cuda_impl.bwd_plan``, the function the op's CUDA kernel decides with, and a counting
wrapper around the emulated extension checks that the entry point it names was called, so a
silent fallback to the split kernels fails the tests. Shapes are small: the emulation runs ~1e5x
slower than a GPU.
"""
from __future__ import annotations

import collections
import contextlib

import pytest
import torch

import reft_kernels
from reft_kernels import _cuda, lowrank_edit, lowrank_edit_
from reft_kernels.ops.lowrank_edit import cuda_impl

from .._helpers import (
    bits, check_against_reference, lowrank_ref_fn, make_base, make_lowrank_params, padded_index, run_with_grads,
)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the real kernels are tested")

CPU = torch.empty(0)  # a tensor on the emulated kernels' device, for bwd_plan and the cluster plan


class CountingExtension:
    """The emulated extension, counting calls to each entry point."""

    def __init__(self, ext):
        self._ext = ext
        self.calls = collections.Counter()

    def __getattr__(self, name):
        attr = getattr(self._ext, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return counted


@pytest.fixture(scope="module")
def emulated():
    from .emulation.build import build

    ext = CountingExtension(build())
    with _cuda.on_host(ext):
        yield ext


@pytest.fixture
def cluster(emulated):
    """backend="cuda" on CPU tensors with the cluster backward selected
    (``kernels(cuda_lowrank_bwd="cluster")``); ``cluster(C, Q)`` forces the cluster size C and the
    number of clusters Q (``on_host(..., cluster_shape=(C, Q))``). Returns the call counter."""
    emulated.calls.clear()
    with contextlib.ExitStack() as stack:
        stack.enter_context(reft_kernels.kernels(cuda_lowrank_bwd="cluster"))

        def shape(c=0, q=0):
            stack.enter_context(_cuda.on_host(emulated, cluster_shape=(c, q)))
            return emulated.calls

        yield shape


def _check(base, view, p, *, act=None, index=None, inplace=False):
    fn = lowrank_edit_ if inplace else lowrank_edit
    vw = (lambda t: view(t) * 1.0) if inplace else view
    return check_against_reference(fn, lowrank_ref_fn, base, vw, p, inplace=inplace,
                                   kernel_kwargs=dict(act=act, index=index, backend="cuda"),
                                   ref_kwargs=dict(act=act, index=index))


def _ran_cluster(calls, d, r, times=1):
    """The backward's own decision for (d, r) under the active selection and cluster shape is the
    cluster kernel, and only its entry point was called (``times`` backward calls)."""
    assert cuda_impl.bwd_plan(CPU, d, r) == "cluster", (d, r, _cuda.cluster_shape())
    assert calls["lowrank_edit_bwd_cluster"] == times and calls["lowrank_edit_bwd"] == 0, dict(calls)


FAMILY = {  # name: (terms, tied, act)
    "loreft": ("BAac", True, None),
    "noreft_gelu": ("BAaCc", False, "gelu"),
    "direft_relu": ("BAa", False, "relu"),
    "consreft_silu": ("Ba", True, "silu"),
    "consts_tanh": ("BCc", False, "tanh"),
}


# ----------------------------------------------------------------------------- widths, clusters, rows

@pytest.mark.parametrize("d,csize,q", [(1, 1, 2), (1, 4, 2), (7, 2, 3), (100, 1, 2), (100, 4, 2), (257, 2, 2),
                                       (257, 4, 3), (40, 8, 2)], ids=lambda v: str(v))
@pytest.mark.parametrize("name", ["loreft", "noreft_gelu"])
def test_cluster_widths_and_shapes(cluster, d, csize, q, name):
    """n = 39 rows: 3 row blocks (the last one ragged) over 2 or 3 clusters; d split over C CTAs
    of 16-column multiples (d = 1 with C = 4, d = 40 with C = 8: CTAs without columns)."""
    calls = cluster(csize, q)
    terms, tied, act = FAMILY[name]
    base, view = make_base("contiguous", (3, 13), d)
    base.requires_grad_()
    _check(base, view, make_lowrank_params(d, 5, terms=terms, tied=tied), act=act)
    _ran_cluster(calls, d, 5)


@pytest.mark.parametrize("r", [1, 4, 8, 9, 16])
@pytest.mark.parametrize("name", list(FAMILY))
def test_cluster_ranks_and_family(cluster, r, name):
    """Rank chunks 4, 8, 16 with ragged ends (r = 1, 9), every member of the family."""
    calls = cluster(2, 2)
    terms, tied, act = FAMILY[name]
    d = 72
    base, view = make_base("contiguous", (37,), d)
    base.requires_grad_()
    _check(base, view, make_lowrank_params(d, r, terms=terms, tied=tied), act=act)
    _ran_cluster(calls, d, r)


def test_cluster_wide_slice_two_column_parts(cluster):
    """d = 600 takes C = 2 by itself: 304 columns per CTA, 256 threads, the latent phase over two
    column parts of 8 warps."""
    calls = cluster(0, 2)
    d = 600
    assert list(_cuda.extension().lowrank_edit_bwd_cluster_plan(CPU, d, 8, 0)) == [2, 256, 304, 8]
    base, view = make_base("contiguous", (20,), d)
    base.requires_grad_()
    _check(base, view, make_lowrank_params(d, 8, terms="BAaCc"), act="gelu")
    _ran_cluster(calls, d, 8)


# ----------------------------------------------------------------------------- dtypes, index, layouts

@pytest.mark.parametrize("h_dtype,p_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float32)],
                         ids=["fp32", "bf16", "fp16", "bf16_h_fp32_p", "fp16_h_fp32_p"])
@pytest.mark.parametrize("d", [64, 100])
def test_cluster_dtypes(cluster, h_dtype, p_dtype, d):
    """d = 64: 16-byte async copies for every dtype; d = 100 (not a multiple of 8): fp16/bf16 rows
    and weights take the element paths for the tail."""
    calls = cluster(2, 2)
    base, view = make_base("contiguous", (5, 8), d, dtype=h_dtype)
    base.requires_grad_()
    _check(base, view, make_lowrank_params(d, 6, p_dtype, tied=True), act="gelu")
    _ran_cluster(calls, d, 6)


@pytest.mark.parametrize("inplace", [False, True], ids=["out_index", "inplace_index"])
@pytest.mark.parametrize("name", ["loreft", "noreft_gelu", "consts_tanh"])
def test_cluster_index_with_padding(cluster, inplace, name):
    """Rows through an index with -1 padding entries (the saved rows there are unspecified: the
    kernel must not read them into any sum)."""
    calls = cluster(2, 2)
    terms, tied, act = FAMILY[name]
    d = 48
    base, view = make_base("contiguous", (6, 9), d)
    base.requires_grad_()
    index = padded_index(54, 36, 5)
    _check(base, view, make_lowrank_params(d, 7, terms=terms, tied=tied), act=act, index=index, inplace=inplace)
    _ran_cluster(calls, d, 7)


@pytest.mark.parametrize("layout,lead", [("transposed", (5, 6)), ("strided_cols", (4, 5)), ("sliced_cols", (9,))])
def test_cluster_layouts(cluster, layout, lead):
    """Strided rows and columns: element paths for g and x (no 16-byte copies)."""
    calls = cluster(2, 2)
    d = 40
    base, view = make_base(layout, lead, d)
    base.requires_grad_()
    _check(base, view, make_lowrank_params(d, 5, terms="BAaCc"), act="silu")
    _ran_cluster(calls, d, 5)


@pytest.mark.parametrize("wanted", ["h", "B", "A", "a", "C", "c", "AB"])
def test_cluster_need_flags(cluster, wanted):
    """Subsets of the gradients: no x staged when only dB (untied) or dh is needed."""
    calls = cluster(2, 2)
    d, r = 48, 4
    base, view = make_base("contiguous", (35,), d)
    base.requires_grad_(wanted == "h")
    p = make_lowrank_params(d, r, requires_grad=False)
    for k in wanted if wanted != "h" else ():
        p[k].requires_grad_()
    _check(base, view, p, act="gelu")
    _ran_cluster(calls, d, r)


# ----------------------------------------------------------------------------- determinism, selection

@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace_index"])
def test_cluster_bitwise_deterministic(cluster, inplace):
    calls = cluster(4, 3)
    d, r, n = 100, 12, 90
    h0 = torch.randn(n, d)
    p = make_lowrank_params(d, r, tied=True)
    g = torch.randn(n, d)
    index = padded_index(n, 70, 6) if inplace else None
    fn = lowrank_edit_ if inplace else lowrank_edit
    (y1, g1), (y2, g2) = (run_with_grads(fn, h0.clone().requires_grad_(), lambda t: t, p, g, inplace=inplace,
                                         act="silu", index=index, backend="cuda") for _ in range(2))
    assert torch.equal(bits(y1), bits(y2)) and all(torch.equal(bits(g1[k]), bits(g2[k])) for k in g1)
    _ran_cluster(calls, d, r, times=2)


def test_selection_default_is_split(emulated):
    """Outside every kernels(...) block, and with cuda_lowrank_bwd=None inside one, the rule
    (split) runs."""
    assert cuda_impl.bwd_kernel() == "split" and cuda_impl.bwd_plan(CPU, 24, 3) == "split"
    emulated.calls.clear()
    base = torch.randn(20, 24, requires_grad=True)
    _check(base, lambda t: t, make_lowrank_params(24, 3, tied=True))
    assert emulated.calls["lowrank_edit_bwd"] == 1 and emulated.calls["lowrank_edit_bwd_cluster"] == 0
    with reft_kernels.kernels(cuda_lowrank_bwd="cluster"):
        assert cuda_impl.bwd_kernel() == "cluster" and cuda_impl.bwd_plan(CPU, 24, 3) == "cluster"
        with reft_kernels.kernels(cuda_lowrank_bwd=None):
            assert cuda_impl.bwd_kernel() == "split" and cuda_impl.bwd_plan(CPU, 24, 3) == "split"
    with reft_kernels.kernels(cuda_lowrank_bwd="split"):
        assert cuda_impl.bwd_kernel() == "split"


def test_selection_bad_value_raises(emulated):
    """An unknown backward is refused where it is chosen, naming the accepted ones; the selection
    in force is unchanged."""
    with pytest.raises(ValueError, match=r"cuda_lowrank_bwd must be one of \('split', 'cluster'\)"):
        with reft_kernels.kernels(cuda_lowrank_bwd="clusters"):
            pass
    assert cuda_impl.bwd_kernel() == "split"


def test_cluster_selected_but_rank_too_large_raises(cluster):
    """r = 17 is past the cluster kernel's register budget: the requested variant is refused,
    naming the one that takes the call, before any kernel runs (no quiet fallback)."""
    calls = cluster()
    d = 24
    with pytest.raises(ValueError, match=r"cannot take d=24, r=17 here.*use cuda_lowrank_bwd='split'"):
        cuda_impl.bwd_plan(CPU, d, 17)
    base = torch.randn(18, d, requires_grad=True)
    p = make_lowrank_params(d, 17, tied=True)
    y = lowrank_edit(base, p["B"], p["A"], p["a"], p["C"], p["c"], backend="cuda")
    with pytest.raises(ValueError, match="cuda_lowrank_bwd='split'"):
        y.sum().backward()
    assert calls["lowrank_edit_bwd"] == 0 and calls["lowrank_edit_bwd_cluster"] == 0


def test_cluster_size_that_does_not_fit_raises(cluster):
    """A forced cluster size whose CTAs would take more than 512 columns (d = 1100 over 2) is not
    taken either: refused, naming the split kernels."""
    cluster(2, 2)
    with pytest.raises(ValueError, match="cannot take d=1100, r=4"):
        cuda_impl.bwd_plan(CPU, 1100, 4)


def test_cluster_plan(emulated):
    plan = lambda d, r, c=0: list(emulated.lowrank_edit_bwd_cluster_plan(torch.empty(0), d, r, c))  # noqa: E731
    assert plan(4096, 8) == [8, 256, 512, 8]
    assert plan(2048, 16) == [4, 256, 512, 16]
    assert plan(512, 4) == [1, 256, 512, 4]
    assert plan(200, 3) == [1, 128, 208, 4]
    assert plan(4097, 8)[0] == 0 and plan(64, 17)[0] == 0
    assert plan(100, 8, 4) == [4, 128, 32, 8]
    assert plan(2048, 8, 2)[0] == 0 and plan(100, 8, 3)[0] == 0 and plan(100, 8, 16)[0] == 0


def test_cluster_refuses_shapes_outside_its_plan(emulated):
    """Called directly with a shape it does not take, the entry point raises (never a bad launch)."""
    n, d, r = 4, 16, 17
    g, x = torch.randn(n, d), torch.randn(n, d)
    B, z = torch.randn(r, d), torch.randn(n, r)
    with pytest.raises(ValueError, match="r <= 16"):
        emulated.lowrank_edit_bwd_cluster(g, None, None, x, weights=[None, B, None], z=z, u=None,
                                          rows=[n, d, d, 1, d, 1], flags=[0, 0, 0, 0, 1, 0, 0, 0, 0],
                                          cluster=[0, 0])

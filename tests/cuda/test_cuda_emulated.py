"""The CUDA C++ kernels of ``csrc/``, run on the CPU through the host-thread emulation of
``tests/cuda/emulation`` (each CUDA thread a host thread; warp shuffles and barriers emulated),
against the float64 reference, every gradient included.

The kernels and ``bindings.cpp`` are compiled from the same source nvcc builds (only the launch
macro and the CUDA headers differ), and the "cuda" backend's Python side is used unchanged
except that ``reft_kernels._cuda.on_host(ext)`` has it call the emulated extension's entry points
directly instead of its torch.library ops, which would send CPU tensors to their PyTorch
implementation (their registration is tested in test_cuda_backend.py). What this cannot see:
anything about real GPU execution (speed, occupancy, memory-model races); the device script
covers those with compute-sanitizer. Shapes are small: the emulation runs ~1e5x slower.
"""
from __future__ import annotations

import pytest
import torch

import reft_kernels
from reft_kernels import _cuda, lowrank_edit, lowrank_edit_, red

from .._helpers import (
    bits, check_against_reference, lowrank_ref_fn, make_base, make_lowrank_params, make_red_params,
    padded_index, red_ref_fn, run_with_grads,
)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the real kernels are tested")


@pytest.fixture(scope="module", autouse=True)
def emulated_cuda_backend():
    """backend="cuda" on CPU tensors, running the emulated kernels."""
    from .emulation.build import build

    with _cuda.on_host(build()):
        yield


# ----------------------------------------------------------------------------- RED

@pytest.mark.parametrize("d", [1, 7, 64, 100, 257, 1024])
@pytest.mark.parametrize("terms", ["st", "s", "t"])
def test_red_fp32(d, terms):
    base, view = make_base("contiguous", (5, 7), d)
    base.requires_grad_()
    check_against_reference(red, red_ref_fn, base, view, make_red_params(d, terms=terms), kernel_kwargs={"backend": "cuda"})


@pytest.mark.parametrize("h_dtype,p_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                             (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=["bf16", "fp16", "bf16_h_fp32_p", "fp32_h_bf16_p"])
@pytest.mark.parametrize("d", [24, 256, 100])
def test_red_dtypes(h_dtype, p_dtype, d):
    base, view = make_base("contiguous", (9, 7), d, dtype=h_dtype)
    base.requires_grad_()
    check_against_reference(red, red_ref_fn, base, view, make_red_params(d, p_dtype), kernel_kwargs={"backend": "cuda"})


@pytest.mark.parametrize("layout,lead", [("strided_rows", (3, 4)), ("sliced_cols", (6,)), ("strided_cols", (5,)),
                                         ("col_major", (9,))])
def test_red_layouts(layout, lead):
    base, view = make_base(layout, lead, 40)
    base.requires_grad_()
    check_against_reference(red, red_ref_fn, base, view, make_red_params(40), kernel_kwargs={"backend": "cuda"})


def test_red_unaligned_params_take_the_scalar_path():
    """Parameters that are views at an odd offset cannot be read as 16-byte vectors."""
    d = 64
    p = {"scale": torch.randn(d + 1)[1:].requires_grad_(), "bias": torch.randn(d + 1)[1:].requires_grad_()}
    assert p["scale"].data_ptr() % 16 != 0
    base = torch.randn(33, d, requires_grad=True)
    check_against_reference(red, red_ref_fn, base, lambda t: t, p, kernel_kwargs={"backend": "cuda"})


def test_red_deterministic_over_many_row_blocks():
    h0 = torch.randn(300, 48)
    p = make_red_params(48)
    g = torch.randn(300, 48)
    (y1, g1), (y2, g2) = (run_with_grads(red, h0.clone().requires_grad_(), lambda t: t, p, g, backend="cuda")
                          for _ in range(2))
    assert torch.equal(bits(y1), bits(y2)) and all(torch.equal(bits(g1[k]), bits(g2[k])) for k in g1)
    check_against_reference(red, red_ref_fn, h0.clone().requires_grad_(), lambda t: t, p, g=g,
                            kernel_kwargs={"backend": "cuda"})


# ----------------------------------------------------------------------------- low-rank edit

FAMILY = {  # name: (terms, tied, act)
    "loreft": ("BAac", True, None),
    "noreft_gelu": ("BAaCc", False, "gelu"),
    "direft_relu": ("BAa", False, "relu"),
    "consreft": ("Ba", True, None),
    "lobireft_silu": ("BCc", True, "silu"),
    "consts_tanh": ("Bac", False, "tanh"),
}


def _check_lowrank(base, view, p, *, mode, act, index=None, rtol=None):
    inplace = mode.startswith("inplace")
    fn = lowrank_edit_ if inplace else lowrank_edit
    vw = (lambda t: view(t) * 1.0) if inplace else view
    return check_against_reference(fn, lowrank_ref_fn, base, vw, p, inplace=inplace, rtol=rtol,
                                   kernel_kwargs=dict(act=act, index=index, backend="cuda"),
                                   ref_kwargs=dict(act=act, index=index))


@pytest.mark.parametrize("d,r", [(1, 1), (7, 3), (100, 8), (64, 9), (257, 17), (128, 33), (96, 64)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("name", list(FAMILY))
def test_lowrank_ranks_and_widths(d, r, name):
    """Rank chunks of 8 (forward) and 4/8/16 (parameter gradients) with their ragged ends, d tails."""
    terms, tied, act = FAMILY[name]
    base, view = make_base("contiguous", (3, 7), d)
    base.requires_grad_()
    _check_lowrank(base, view, make_lowrank_params(d, r, terms=terms, tied=tied), mode="out", act=act)


@pytest.mark.parametrize("mode", ["out_index", "inplace_index", "inplace_all"])
@pytest.mark.parametrize("name", ["loreft", "noreft_gelu", "direft_relu", "consreft"])
@pytest.mark.parametrize("layout,lead", [("contiguous", (4, 9)), ("transposed", (5, 6)), ("strided_cols", (4, 5)),
                                         ("col_major", (23,))])
def test_lowrank_index_and_layouts(mode, name, layout, lead):
    terms, tied, act = FAMILY[name]
    d, r = 40, 5
    base, view = make_base(layout, lead, d)
    base.requires_grad_()
    n_rows = view(base).numel() // d
    index = padded_index(n_rows, n_rows - 5, 3) if mode.endswith("index") else None
    _check_lowrank(base, view, make_lowrank_params(d, r, terms=terms, tied=tied), mode=mode, act=act, index=index)


@pytest.mark.parametrize("h_dtype,p_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                             (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.float32, torch.bfloat16)],
                         ids=["bf16", "fp16", "bf16_h_fp32_p", "fp16_h_fp32_p", "fp32_h_bf16_p"])
@pytest.mark.parametrize("mode", ["out", "inplace_index"])
@pytest.mark.parametrize("d", [64, 68, 100])
def test_lowrank_dtypes(h_dtype, p_dtype, mode, d):
    """d = 64: 16-byte vectors for every dtype; d = 68 and 100 (not multiples of 8): the fp16/bf16
    rows and weights take the scalar path, fp32 rows still move in vectors of 4."""
    base, view = make_base("contiguous", (6, 8), d, dtype=h_dtype)
    base.requires_grad_()
    index = padded_index(48, 30, 4) if mode.endswith("index") else None
    _check_lowrank(base, view, make_lowrank_params(d, 6, p_dtype, tied=True), mode=mode, act="gelu", index=index)


@pytest.mark.parametrize("wanted", ["h", "B", "A", "a", "C", "c"])
def test_lowrank_partial_requires_grad(wanted):
    d, r = 48, 4
    base, view = make_base("contiguous", (30,), d)
    base.requires_grad_(wanted == "h")
    p = make_lowrank_params(d, r, requires_grad=False)
    if wanted != "h":
        p[wanted].requires_grad_()
    _check_lowrank(base, view, p, mode="out", act="silu")


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace_index"])
def test_lowrank_deterministic_over_many_row_blocks(inplace):
    d, r, n = 56, 12, 260
    h0 = torch.randn(n, d)
    p = make_lowrank_params(d, r, tied=True)
    g = torch.randn(n, d)
    index = padded_index(n, 200, 6) if inplace else None
    fn = lowrank_edit_ if inplace else lowrank_edit
    res = [run_with_grads(fn, h0.clone().requires_grad_(), lambda t: t, p, g, inplace=inplace, act="silu",
                          index=index, backend="cuda") for _ in range(2)]
    (y1, g1), (y2, g2) = res
    assert torch.equal(bits(y1), bits(y2)) and all(torch.equal(bits(g1[k]), bits(g2[k])) for k in g1)
    _check_lowrank(h0.clone().requires_grad_(), lambda t: t, p, mode="inplace_index" if inplace else "out",
                   act="silu", index=index)


def test_lowrank_rank_limit():
    """r = 64 fills the kernels' latent buffers exactly; r = 65 is refused before any launch."""
    d = 24
    base = torch.randn(10, d, requires_grad=True)
    _check_lowrank(base, lambda t: t, make_lowrank_params(d, 64, tied=True), mode="out", act=None)
    with pytest.raises(ValueError, match="up to 64"):
        lowrank_edit(torch.randn(3, d), torch.randn(65, d), backend="cuda")


def test_lowrank_untied_C_sharing_B_memory():
    """C = B.detach() is a different tensor over B's memory: untied (only ``C is B`` ties), so
    B's gradient must not take the -gz^T x term, whatever the kernels see as pointers."""
    d, r = 40, 5
    p = make_lowrank_params(d, r, terms="BAac")
    p["C"] = p["B"].detach()
    assert p["C"].data_ptr() == p["B"].data_ptr()
    base = torch.randn(12, d, requires_grad=True)
    for mode in ("out", "inplace_index"):
        index = padded_index(12, 8, 2) if mode == "inplace_index" else None
        _check_lowrank(base, lambda t: t, p, mode=mode, act="gelu", index=index)


def test_binding_records_checked():
    """The low-rank entry points take their arguments as records (weights, rows, flags, cluster;
    csrc/bindings.cpp): a well-formed call runs, a record of the wrong length, a missing B or an
    unknown activation raises ValueError naming the record before any launch."""
    ext = _cuda.extension()
    n, d, r = 5, 8, 2
    g, B = torch.randn(n, d), torch.randn(r, d)
    y = torch.empty(n, d)
    fwd = dict(weights=[None, None, B, None, None], rows=[n, d, d, 1, d, 1], flags=[0, 0, 0])
    z, _, _ = ext.lowrank_edit_fwd(g, y, None, **fwd)
    torch.testing.assert_close(y, g)  # no A, C, a, c: the latent is 0 and y = h
    for bad, match in [({"rows": [n, d, d, 1, d]}, "rows must be"), ({"flags": [0, 0]}, "flags must be"),
                       ({"weights": [None, None, B, None]}, "weights must be"),
                       ({"weights": [None] * 5}, "must include B"), ({"flags": [99, 0, 0]}, "unknown activation")]:
        with pytest.raises(ValueError, match=match):
            ext.lowrank_edit_fwd(g, y, None, **{**fwd, **bad})
    # identity activation, need_da, need_dB, need_dc: da = sum gz and dc = -sum gz in one order
    bwd = dict(weights=[None, B, None], z=z, u=None, rows=[n, d, d, 1, d, 1], flags=[0, 0, 0, 1, 1, 0, 1, 0, 0])
    dA, da, dB, dC, dc = ext.lowrank_edit_bwd(g, None, None, g, **bwd)
    assert dA.numel() == 0 and dC.numel() == 0 and dB.shape == (r, d) and da.shape == dc.shape == (r,)
    torch.testing.assert_close(da, (g.double() @ B.double().T).sum(0).float())
    assert torch.equal(dc, -da)
    for bad, match in [({"flags": [0] * 8}, "flags must be"), ({"weights": [None, B]}, "weights must be"),
                       ({"rows": [n, d]}, "rows must be")]:
        with pytest.raises(ValueError, match=match):
            ext.lowrank_edit_bwd(g, None, None, g, **{**bwd, **bad})
    with pytest.raises(ValueError, match="cluster must be"):
        ext.lowrank_edit_bwd_cluster(g, None, None, g, **bwd, cluster=[2])


# ----------------------------------------------------------------------------- the core's policies

from ..ops import test_autocast, test_double_backward, test_index_sync_free, test_inplace_safety  # noqa: E402

CPU = torch.device("cpu")


@pytest.mark.parametrize("entry", test_inplace_safety.ENTRY_NAMES)
def test_inplace_refusals_before_writing(entry):
    test_inplace_safety.test_leaf_requiring_grad_refused_before_writing("cuda", CPU, entry)
    test_inplace_safety.test_view_of_leaf_requiring_grad_refused_before_writing("cuda", CPU, entry)
    for kind in ("expanded_rows", "expanded_last_dim", "as_strided_overlapping_rows"):
        test_inplace_safety.test_overlapping_h_refused_before_writing("cuda", CPU, entry, kind)


@pytest.mark.parametrize("where", ["B_rows_of_h", "h_contains_A", "index_in_h_storage"])
def test_inplace_sharing_memory_refused(where):
    test_inplace_safety.test_h_sharing_memory_with_an_input_refused("cuda", CPU, where)


@pytest.mark.parametrize("mode", ["out", "inplace_index"])
def test_double_backward_refused_and_first_order_right(mode):
    test_double_backward.test_lowrank_edit_double_backward_refused("cuda", CPU, mode)
    test_double_backward.test_create_graph_first_order_gradients_still_right("cuda", CPU, mode)
    test_double_backward.test_red_double_backward_refused("cuda", CPU, "scale")


@pytest.mark.parametrize("name", ["LoReFT", "RED"])
def test_autocast_policy(name):
    test_autocast.test_modules_under_autocast_compute_as_without("cuda", CPU, name, torch.float32, torch.bfloat16)
    test_autocast.test_functional_ops_under_autocast("cuda", CPU, True)


@pytest.mark.parametrize("inplace", [False, True], ids=["lowrank_edit", "lowrank_edit_"])
def test_no_host_sync_after_first_use(inplace):
    test_index_sync_free.test_no_host_sync_after_first_use("cuda", CPU, inplace)


@pytest.mark.parametrize("layout,lead,d", [("col_major", (2,), 1), ("col_major", (2,), 3), ("strided_cols", (0,), 2)])
def test_red_single_column_or_no_rows_any_column_stride(layout, lead, d):
    """Found by the property tests under the whole-suite emulation: a (2, 1) column-major view
    keeps column stride 2, and an empty (0, 2) view column stride 2 (contiguous() leaves both as
    they are), which the binding refused as 'not unit column stride'."""
    base, view = make_base(layout, lead, d)
    base.requires_grad_()
    check_against_reference(red, red_ref_fn, base, view, make_red_params(d), kernel_kwargs={"backend": "cuda"})


# ----------------------------------------------------------------------------- selected kernels
# The 16-byte parameter-gradient kernel (kernels(cuda_params="vector")) and the split finish of
# the partial sums (kernels(cuda_finish="split")); the cases are shared with the GPU tests of
# test_cuda_kernel_modes.py. The emulated device reports 2 SMs of 16 resident 128-thread blocks
# (8 of 256), so the reductions below take up to 32 (16) row blocks.

from . import kernel_mode_cases as km  # noqa: E402


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("r", km.RANKS)
def test_params_vector_ranks_fp32(r, tied):
    """Every rank chunk of the fp32 vector kernel (4, 8, 16 tied; 2, 4, 8 untied) with its ragged
    last chunk; d = 257 in rows 264 apart: 64 whole 4-column packs per row in the vector loop and
    a 1-column tail in the scalar loop."""
    with km.modes("vector_split"):
        km.check_lowrank(CPU, 257, r, km.LOREFT if tied else km.NOREFT_GELU, layout="padded", g_layout="padded")


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("r", [1, 3, 4, 5, 8, 9, 17])
def test_params_vector_ranks_bf16(r, tied):
    """fp16/bf16 chunks (2, 4, 8 tied; 1, 2, 4 untied); d = 100 in rows 104 apart: 12 packs of 8
    and a 4-column tail."""
    with km.modes("vector_split"):
        km.check_lowrank(CPU, 100, r, km.LOREFT if tied else km.NOREFT_GELU, dtype=torch.bfloat16, lead=(2, 5),
                         layout="padded", g_layout="padded")


@pytest.mark.parametrize("dtype,p_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                           (torch.float32, torch.bfloat16)],
                         ids=["fp16", "bf16_h_fp32_p", "fp32_h_bf16_p"])
@pytest.mark.parametrize("d", [64, 7])
def test_params_vector_dtypes(dtype, p_dtype, d):
    """d = 64: whole packs only; d = 7: no whole fp16/bf16 pack, every lane in the scalar loop."""
    with km.modes("vector"):
        km.check_lowrank(CPU, d, 6, km.NOREFT_GELU, dtype=dtype, p_dtype=p_dtype, lead=(4, 5))


@pytest.mark.parametrize("layout,lead,g_layout", [
    ("contiguous", (3, 5), "unaligned"),     # g one element off 16 bytes: g by elements, x by packs
    ("contiguous", (3, 5), "strided"),       # g with column stride 2
    ("sliced_cols", (15,), None),            # x rows d + 3 apart: unaligned starts
    ("strided_cols", (4, 4), None),          # x with column stride 2
    ("col_major", (13,), None),              # x with column stride n
    ("transposed", (3, 5), None),            # rows copied by as_rows: x packs again
], ids=["g_unaligned", "g_strided", "x_sliced", "x_strided", "x_col_major", "transposed"])
@pytest.mark.parametrize("family", ["loreft", "noreft_gelu"])
def test_params_vector_scalar_paths(layout, lead, g_layout, family):
    """Rows that cannot be read as 16-byte packs take the vector kernel's scalar loop."""
    with km.modes("vector_split"):
        km.check_lowrank(CPU, 40, 5, km.LOREFT if family == "loreft" else km.NOREFT_GELU, layout=layout, lead=lead,
                         g_layout=g_layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["loreft", "noreft_gelu"])
def test_params_vector_index_with_padding(dtype, family):
    """In place through an index with -1 entries: padding rows are masked in the stage."""
    with km.modes("vector_split"):
        km.check_lowrank(CPU, 72, 9, km.LOREFT if family == "loreft" else km.NOREFT_GELU, dtype=dtype, lead=(5, 9),
                         mode="inplace_index")


@pytest.mark.parametrize("wanted", ["B", "A", "C", "h"])
def test_params_vector_partial_requires_grad(wanted):
    """One matrix gradient at a time (B alone reads g only, A and C read x only), or none."""
    with km.modes("vector"):
        km.check_lowrank(CPU, 48, 5, km.NOREFT_GELU, lead=(20,), wanted=wanted)


@pytest.mark.parametrize("mode,inplace", [("vector_split", False), ("vector_split", True), ("split", False)],
                         ids=["vector_split-out", "vector_split-inplace_index", "split-out"])
def test_params_many_row_blocks_deterministic(mode, inplace):
    """Vector kernel, out of place: 17 row blocks of 16 rows, finished over r d = 288 columns in 8
    ranges of 3 row blocks (the sixth ragged, the last two empty); in place: 13 row blocks in 4
    ranges. Scalar kernel: 5 row blocks in 2 ranges. Bitwise equal across two runs, and right."""
    with km.modes(mode):
        km.check_lowrank_deterministic(CPU, inplace=inplace)


@pytest.mark.parametrize("n,d", [(600, 48), (97, 1024), (1000, 7)])
def test_red_split_finish_deterministic(n, d):
    """RED's ds, dt split-finished: 13 row blocks in 4 ranges of 4 (600 x 48); 4 row blocks of
    tiles 256 columns wide with 4 thread rows (97 x 1024); 8 row blocks of 128 thread rows over a
    row of 2 vectors, one of them ragged (1000 x 7)."""
    with km.modes("split"):
        km.check_red_deterministic(CPU, n=n, d=d)


@pytest.mark.parametrize("axis", ["cuda_params", "cuda_finish", "cuda_lowrank_bwd"])
def test_unknown_kernel_variant_refused(axis):
    """An unknown variant is refused when it is chosen, naming the axis and what it accepts."""
    with pytest.raises(ValueError, match=f"{axis} must be one of"):
        with reft_kernels.kernels(**{axis: "fastest"}):
            pass


class RecordingExtension:
    """The emulated extension, keeping each call: (entry point, args, keyword args, result)."""

    def __init__(self, ext):
        self._ext = ext
        self.records = []

    def __getattr__(self, name):
        attr = getattr(self._ext, name)
        if not callable(attr):
            return attr

        def recorded(*args, **kwargs):
            out = attr(*args, **kwargs)
            self.records.append((name, args, kwargs, out))
            return out

        return recorded


@pytest.mark.parametrize("mode", list(km.MODES))
def test_selected_kernels_reach_the_extension(mode):
    """What kernels(...) selects is what the extension is told at the call: the low-rank
    backward's flags end with [params_vector, finish_split] and RED's backward gets finish_split.
    The bias gradients are the extension's own outputs (finished by its fixed-order sum), handed
    to autograd unchanged."""
    params, finish = km.MODES[mode]
    rec = RecordingExtension(_cuda.extension())
    base = torch.randn(40, 16, requires_grad=True)
    p = make_lowrank_params(16, 3, tied=True)
    s, t = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    with _cuda.on_host(rec), km.modes(mode):
        lowrank_edit(base, p["B"], p["A"], p["a"], p["C"], p["c"], backend="cuda").sum().backward()
        red(base, s, t, backend="cuda").sum().backward()
    calls = {name: (args, kwargs, out) for name, args, kwargs, out in rec.records}
    _, kwargs, (dA, da, dB, dC, dc) = calls["lowrank_edit_bwd"]
    flags = kwargs["flags"]
    assert flags[-2:] == [int(params == "vector"), int(finish == "split")], flags
    assert flags[3] == 1 and flags[6] == 1, flags  # need_da, need_dc
    assert torch.equal(p["a"].grad, da) and torch.equal(p["c"].grad, dc)
    args, _, (_, ds, dt) = calls["red_bwd"]
    assert args[-1] is (finish == "split")
    assert torch.equal(s.grad, ds) and torch.equal(t.grad, dt)

"""The CPU extension's in-place edit of listed rows (``reft_kernels/cpu_ext``): taken by
``lowrank_edit_`` on float32, float64 and bfloat16 CPU rows (bfloat16: parameters bfloat16 or
float32), checked against the float64 reference (output and
every gradient) for every term pattern, activation and padding, with each input alone requiring
grad; a dispatch mode confirms which path ran (the extension's forward and backward ops, or the
PyTorch path for the calls it leaves there). Also: gradcheck, no-grad and inference calls, the
version counter, determinism, the off switch, a failed build, and direct calls of the op.

Fails (does not skip) where the extension cannot be built, unless ``REFT_KERNELS_CPU_EXT=0``
turns it off: a broken build in CI must not pass as a skip."""
from __future__ import annotations

import contextlib

import pytest
import torch

import reft_kernels as rk
from reft_kernels import cpu_ext
from tests._helpers import (
    UNSHARED, UPSTREAMS, check_against_reference, lowrank_ref_fn, make_base, make_lowrank_params, one_gradient_inputs,
    seeded_index, upstream_backward,
)
from tests._helpers import ops_called as ext_ops

pytestmark = pytest.mark.skipif(not cpu_ext.enabled(), reason=f"{cpu_ext.ENV_VAR}=0 turns the CPU extension off")

ACTS = [None, "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid"]
# (terms, tied): LoReFT/NoReFT, DiReFT, ConsReFT, every term, C without A, a constant latent
PATTERNS = [("BAa", True), ("BAa", False), ("Ba", True), ("BAaCc", False), ("BCc", False), ("Ba", False)]


def test_it_builds():
    assert cpu_ext.lowrank_rows_op() is not None, cpu_ext.status()


# (h's dtype, the parameters'): bfloat16 rows are read into float, edited in float and rounded
# once; the latents and parameter gradients are float, returned in each parameter's dtype
DTYPES = {"fp32": (torch.float32,) * 2, "fp64": (torch.float64,) * 2, "bf16": (torch.bfloat16,) * 2,
          "bf16_fp32_params": (torch.bfloat16, torch.float32)}


@pytest.mark.parametrize("terms,tied", PATTERNS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtypes", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("n_pad", [0, 3])
def test_against_reference(terms, tied, act, dtypes, n_pad):
    torch.manual_seed(hash((terms, tied, act, str(dtypes), n_pad)) % 2**31)
    base, view = make_base("contiguous", (3, 9), 21, dtypes[0])  # d = 21: the dot products' lane tail
    base.requires_grad_(True)
    params = make_lowrank_params(21, 4, dtypes[1], terms=terms, tied=tied)
    index = seeded_index(27, 11, 1, n_pad)
    with ext_ops() as names:
        check_against_reference(rk.lowrank_edit_, lowrank_ref_fn, base, view, params, inplace=True,
                                kernel_kwargs={"act": act, "index": index}, ref_kwargs={"act": act, "index": index})
    assert names == ["lowrank_rows_fwd", "lowrank_rows_bwd"]


@pytest.mark.parametrize("act,terms,tied", [(None, "BAaCc", False), (None, "BAa", True), ("gelu", "BAaCc", False)])
def test_several_blocks_against_reference(act, terms, tied):
    """More entries than one block of the backward's sums (3 blocks, the last short, padding in
    each): the blocks' partials added in order (with the identity, the difference form's sums P
    and Q, combined into dA, dB, dC after the blocks)."""
    torch.manual_seed(12)
    base, view = make_base("contiguous", (4, 50), 24, torch.float32)
    base.requires_grad_(True)
    params = make_lowrank_params(24, 5, torch.float32, terms=terms, tied=tied)
    index = seeded_index(200, 144, 7, n_pad=6)
    with ext_ops() as names:
        check_against_reference(rk.lowrank_edit_, lowrank_ref_fn, base, view, params, inplace=True,
                                kernel_kwargs={"act": act, "index": index}, ref_kwargs={"act": act, "index": index})
    assert names == ["lowrank_rows_fwd", "lowrank_rows_bwd"]


@pytest.mark.parametrize("rank", [1, 7, 13, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("terms,tied", [("BAa", True), ("BAaCc", False)])
@pytest.mark.parametrize("act", [None, "tanh"])
def test_ranks_against_reference(rank, dtype, terms, tied, act):
    """Ranks that take each group size of the dot products (8 or 4 products at once by dtype,
    then 4, 2, 1) and of the backward's groups of entries (4 listed entries at a time, padding
    between them); the identity takes the difference form (one product per rank, with A - C)."""
    torch.manual_seed(rank * 7 + len(terms))
    base, view = make_base("contiguous", (3, 11), 37, dtype)
    base.requires_grad_(True)
    params = make_lowrank_params(37, rank, dtype, terms=terms, tied=tied)
    index = seeded_index(33, 14, rank, n_pad=5)
    with ext_ops() as names:
        check_against_reference(rk.lowrank_edit_, lowrank_ref_fn, base, view, params, inplace=True,
                                kernel_kwargs={"act": act, "index": index}, ref_kwargs={"act": act, "index": index})
    assert names == ["lowrank_rows_fwd", "lowrank_rows_bwd"]


def _edit_and_grads(seed, lead, n_rows, n, threads):
    """[(output, dh, dB, dA, da)] of one tied BAa edit of fixed inputs, once per thread count in
    ``threads``: what the bit-equality tests compare."""
    torch.manual_seed(seed)
    h0 = torch.randn(*lead, 40, requires_grad=True)
    params = make_lowrank_params(40, 8, torch.float32, terms="BAa", tied=True)
    index = seeded_index(n_rows, n, 5, n_pad=4)
    g = torch.randn(*lead, 40)
    runs, before = [], torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            y = rk.lowrank_edit_(h0.clone(), params["B"], params["A"], params["a"], params["C"], index=index)
            runs.append([y.detach().clone(), *torch.autograd.grad(y, [h0, params["B"], params["A"], params["a"]], g)])
    finally:
        torch.set_num_threads(before)
    return runs


def test_same_bits_whatever_the_thread_count():
    for x, y in zip(*_edit_and_grads(13, (4, 64), 256, 200, threads=(1, 2))):
        assert torch.equal(x, y)


@pytest.mark.parametrize("grad_of", ["h", "B", "A", "a", "C", "c", "params"])
@pytest.mark.parametrize("act", [None, "tanh"])
def test_each_gradient_alone(grad_of, act):
    """Each input alone requiring grad, and every parameter but not h (no dh: the first edited
    layer of a model). With the identity (the difference form), ``C`` alone needs the sum P
    without dA."""
    base, view, params, index = one_gradient_inputs(grad_of)
    with ext_ops() as names:
        check_against_reference(rk.lowrank_edit_, lowrank_ref_fn, base, view, params, inplace=True,
                                kernel_kwargs={"index": index, "act": act}, ref_kwargs={"index": index, "act": act})
    assert names == ["lowrank_rows_fwd", "lowrank_rows_bwd"]


@pytest.mark.parametrize("grad_of", ["h", "B", "A", "a", "params"])
def test_each_gradient_alone_tied(grad_of):
    """LoReFT's tied C = B with the identity (the difference form): ``B`` alone needs the sum P
    without dA (dB = Q - P)."""
    base, view, params, index = one_gradient_inputs(grad_of, tied=True)
    with ext_ops() as names:
        check_against_reference(rk.lowrank_edit_, lowrank_ref_fn, base, view, params, inplace=True,
                                kernel_kwargs={"index": index}, ref_kwargs={"index": index})
    assert names == ["lowrank_rows_fwd", "lowrank_rows_bwd"]


def test_gradcheck():
    torch.manual_seed(6)
    h = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    params = make_lowrank_params(7, 2, torch.float64, terms="BAaCc")
    index = torch.tensor([4, -1, 0, 9])

    def f(h, B, A, a, C, c):
        return rk.lowrank_edit_(h.clone(), B, A, a, C, c, act="silu", index=index)

    assert torch.autograd.gradcheck(f, (h, params["B"], params["A"], params["a"], params["C"], params["c"]))


def test_noncontiguous_upstream_gradient():
    """``sum().backward()`` hands the backward an expanded gradient: read through a copy."""
    torch.manual_seed(4)
    h0 = torch.randn(2, 6, 10, dtype=torch.float64, requires_grad=True)
    params = make_lowrank_params(10, 2, torch.float64, terms="BAa", tied=True)
    index = seeded_index(12, 5, 3)
    rk.lowrank_edit_(h0.clone(), params["B"], params["A"], params["a"], params["C"], index=index).sum().backward()
    h1 = h0.detach().requires_grad_(True)
    p1 = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in params.items()}
    p1["C"] = p1["B"]
    lowrank_ref_fn(h1, **p1, index=index).sum().backward()
    torch.testing.assert_close(h0.grad, h1.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(params["B"].grad, p1["B"].grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("config", ["loreft", "every_term_gelu_several_blocks"])
def test_backward_takes_over_the_incoming_gradient_only_when_nothing_else_sees_it(upstream, config):
    """The backward writes dh into the incoming gradient itself (no (N, d) copy among the bytes
    the backward op allocates, under the profiler) when the engine handed it to the node alone;
    where anything else still holds it (a Python hook that keeps it, the caller's
    ``grad_outputs``) it works on a copy, and that gradient is left as it was. dh and every
    parameter gradient equal the float64 reference either way, in one block of entries and in
    several (in parallel). Either way dh is not a view: a view keeps its base, and the engine
    could then not add a later gradient into it in place (the residual stream's sum)."""
    torch.manual_seed(9)
    if config == "loreft":
        lead, d, act, index = (3, 8), 16, None, seeded_index(24, 9, 2, n_pad=2)
        params = make_lowrank_params(d, 3, torch.float64, terms="BAa", tied=True)
    else:
        lead, d, act, index = (4, 50), 12, "gelu", seeded_index(200, 150, 3, n_pad=5)
        params = make_lowrank_params(d, 3, torch.float64, terms="BAaCc")
    h0 = torch.randn(*lead, d, dtype=torch.float64, requires_grad=True)
    w, w2 = torch.randn(*lead, d, dtype=torch.float64), torch.randn(*lead, d, dtype=torch.float64)
    terms = [params[k] for k in "BAaCc"]
    y = rk.lowrank_edit_(h0.clone(), *terms, act=act, index=index)
    dh_seen = []  # dh as the next node (h0.clone()'s) receives it (a hook on the op's own node
    # would hold its incoming gradient, which stops the take-over)
    y.grad_fn.next_functions[0][0].register_prehook(lambda grad_outputs: dh_seen.append(grad_outputs[0]))
    got = upstream_backward(y, upstream, w, w2, "lowrank_rows_bwd")
    assert len(dh_seen) == 1 and dh_seen[0].shape == y.shape and not dh_seen[0]._is_view()
    h1 = h0.detach().requires_grad_(True)
    p1 = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in params.items()}
    if params["C"] is params["B"]:
        p1["C"] = p1["B"]
    lowrank_ref_fn(h1, **p1, act=act, index=index).backward(got["want_g"])
    torch.testing.assert_close(h0.grad, h1.grad, rtol=1e-12, atol=1e-12)
    for k, v in params.items():
        if v is not None and v.requires_grad and not (k == "C" and v is params["B"]):
            torch.testing.assert_close(v.grad, p1[k].grad, rtol=1e-12, atol=1e-12)
    assert (got["bwd_bytes"] >= h0.numel() * 8) == (upstream not in UNSHARED)  # an (N, d) copy or not


@pytest.mark.parametrize("upstream", ["alone", "hooked"])
def test_bfloat16_backward_takes_over_the_incoming_gradient_only_when_nothing_else_sees_it(upstream):
    """As above with bfloat16 rows and float32 parameters: dh in the incoming bfloat16 gradient
    when the node alone holds it, in a copy otherwise; every gradient within bfloat16 rounding of
    the float64 reference, the parameters' in float32."""
    torch.manual_seed(13)
    lead, d = (3, 40), 24
    params = make_lowrank_params(d, 4, torch.float32, terms="BAa", tied=True)
    h0 = torch.randn(*lead, d).to(torch.bfloat16).requires_grad_()
    w, w2 = torch.randn(*lead, d).to(torch.bfloat16), torch.randn(*lead, d).to(torch.bfloat16)
    index = seeded_index(120, 70, 4, n_pad=3)
    terms = [params[k] for k in "BAaCc"]
    y = rk.lowrank_edit_(h0 * 1, *terms, index=index)
    got = upstream_backward(y, upstream, w, w2, "lowrank_rows_bwd")
    h1 = h0.detach().double().requires_grad_(True)
    p1 = {k: (v.detach().double().requires_grad_(True) if v is not None else None) for k, v in params.items()}
    p1["C"] = p1["B"]
    lowrank_ref_fn(h1, **p1, index=index).backward(got["want_g"].double())
    assert h0.grad.dtype == torch.bfloat16 and params["B"].grad.dtype == torch.float32
    torch.testing.assert_close(h0.grad.double(), h1.grad, rtol=2 ** -8, atol=2 ** -8)
    for k in "BAa":
        torch.testing.assert_close(params[k].grad.double(), p1[k].grad, rtol=1e-5, atol=1e-4)
    assert (got["bwd_bytes"] >= h0.numel() * 2) == (upstream not in UNSHARED)  # an (N, d) copy or not


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "nothing_requires_grad"])
def test_without_gradient(mode):
    """No node, the right values, and (outside inference mode) h's version bumped."""
    torch.manual_seed(7)
    h = torch.randn(3, 4, 8)
    params = make_lowrank_params(8, 2, torch.float32, terms="BAa", tied=True, requires_grad=mode != "nothing_requires_grad")
    index = torch.tensor([1, -1, 10])
    want = lowrank_ref_fn(h.double(), *(params[k].double() if params[k] is not None else None for k in "BAaCc"),
                          index=index)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, contextlib.nullcontext)
    with ctx():
        x = h.clone()
        v0 = None if mode == "inference_mode" else x._version
        with ext_ops() as names:
            y = rk.lowrank_edit_(x, params["B"], params["A"], params["a"], params["C"], index=index)
    # (inference mode leaves out the autograd kernel: the op's own CPU kernel runs)
    assert y is x and y.grad_fn is None
    assert names == (["lowrank_rows_"] if mode == "inference_mode" else ["lowrank_rows_fwd"])
    if v0 is not None:
        assert x._version > v0
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6)


def test_a_saved_tensor_edited_in_place_is_caught():
    """Autograd sees the write: a tensor saved by an earlier op and then edited raises at backward."""
    h0 = torch.randn(2, 3, 6, requires_grad=True)
    params = make_lowrank_params(6, 2, torch.float32, terms="BAa", tied=True)
    x = h0 * 2
    s = x.sin()  # saves x
    rk.lowrank_edit_(x, params["B"], params["A"], params["a"], params["C"], index=torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        s.sum().backward()


def test_deterministic():
    before = torch.get_num_threads()
    for x, y in zip(*_edit_and_grads(8, (4, 16), 64, 30, threads=(before, before))):
        assert torch.equal(x, y)


@pytest.mark.parametrize("case", ["fp16", "fp32_h_fp64_params", "transposed", "too_many_rows", "off", "no_index"])
def test_calls_left_to_the_pytorch_path(case, monkeypatch):
    """float16 rows, mixed dtypes other than float32 parameters beside bfloat16 rows,
    non-contiguous rows (in place), more than MAX_ROWS entries and the switch off take the PyTorch
    path, each still right; the out-of-place op over every row takes the extension's other op
    (test_cpu_ext_all.py), not this one."""
    torch.manual_seed(9)
    dtype = torch.float16 if case == "fp16" else torch.float32
    layout = "transposed" if case == "transposed" else "contiguous"
    lead = (2, cpu_ext.MAX_ROWS) if case == "too_many_rows" else (3, 5)
    base, view = make_base(layout, lead, 16, dtype)
    base.requires_grad_(True)
    params = make_lowrank_params(16, 2, torch.float64 if case == "fp32_h_fp64_params" else dtype, terms="BAa", tied=True)
    n_rows = lead[0] * lead[1]
    index = None if case == "no_index" else (torch.arange(n_rows) if case == "too_many_rows" else seeded_index(n_rows, 6, 4, 1))
    if case == "off":
        monkeypatch.setenv(cpu_ext.ENV_VAR, "0")
    fn = rk.lowrank_edit if case == "no_index" else rk.lowrank_edit_
    with ext_ops() as names:
        check_against_reference(fn, lowrank_ref_fn, base, view, params, inplace=fn is rk.lowrank_edit_,
                                kernel_kwargs={"index": index}, ref_kwargs={"index": index})
    assert names == (["lowrank_all_fwd", "lowrank_all_bwd"] if case == "no_index" else [])


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_out_of_place_with_an_index_edits_a_copy(layout):
    """``lowrank_edit`` with an index on a contiguous h: the extension's edit of a copy (on a
    transposed h the PyTorch path's, as ``lowrank_edit_`` there), against the reference, and bit
    for bit ``h.clone()`` then ``lowrank_edit_``."""
    torch.manual_seed(11)
    base, view = make_base(layout, (3, 5), 16, torch.float32)
    base.requires_grad_(True)
    params = make_lowrank_params(16, 2, torch.float32, terms="BAa", tied=True)
    index = seeded_index(15, 6, 4, 1)
    with ext_ops() as names:
        check_against_reference(rk.lowrank_edit, lowrank_ref_fn, base, view, params,
                                kernel_kwargs={"index": index}, ref_kwargs={"index": index})
    assert names == (["lowrank_rows_fwd", "lowrank_rows_bwd"] if layout == "contiguous" else [])
    h = view(base).detach()
    args = (params["B"], params["A"], params["a"], params["C"])
    assert torch.equal(rk.lowrank_edit(h, *args, index=index), rk.lowrank_edit_(h.clone(), *args, index=index))


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    def broken():
        raise RuntimeError("Error building extension 'reft_kernels_cpu'\nno compiler here")

    monkeypatch.setattr(cpu_ext, "_state", {})
    monkeypatch.setattr(cpu_ext, "_load", broken)
    torch.manual_seed(10)
    h = torch.randn(2, 4, 8)
    params = make_lowrank_params(8, 2, torch.float32, terms="BAa", tied=True)
    index = torch.tensor([0, 5])
    want = lowrank_ref_fn(h.double(), *(params[k].double() if params[k] is not None else None for k in "BAaCc"),
                          index=index)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        y = rk.lowrank_edit_(h.clone(), params["B"], params["A"], params["a"], params["C"], index=index)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6)
    assert "no compiler here" in cpu_ext.status()
    assert not cpu_ext.lowrank_rows_applies(h, index, params["A"], params["a"], params["B"], None, None)


@pytest.mark.parametrize("case", ["fp16_h", "short_B", "bad_index_entry", "2d_index", "A_dtype", "bad_act"])
def test_direct_calls_of_the_op_are_checked(case):
    """The op called directly (not through ``lowrank_edit_``) refuses what would read or write
    out of bounds, before writing anything."""
    op = cpu_ext.lowrank_rows_op()
    h = torch.randn(6, 8, dtype=torch.float16 if case == "fp16_h" else torch.float32)
    B = torch.randn(2, 7 if case == "short_B" else 8)
    A = torch.randn(2, 8, dtype=torch.float64 if case == "A_dtype" else torch.float32)
    index = {"bad_index_entry": torch.tensor([0, 6]), "2d_index": torch.tensor([[0, 1]])}.get(case, torch.tensor([0, 1]))
    before = h.clone()
    with pytest.raises(RuntimeError, match="lowrank_rows"):
        op(h, index, A, None, B, None, None, 99 if case == "bad_act" else 0, True)
    assert torch.equal(h, before)


@pytest.mark.parametrize("case", ["bad_index_entry", "short_hsave", "B_dtype"])
def test_direct_calls_of_the_backward_op_are_checked(case):
    """The backward op called directly refuses what would read or write out of bounds."""
    assert cpu_ext.lowrank_rows_op() is not None, cpu_ext.status()
    bwd = torch.ops.reft_kernels_cpu.lowrank_rows_bwd.default
    g, B = torch.randn(6, 8), torch.randn(2, 8, dtype=torch.float64 if case == "B_dtype" else torch.float32)
    index = torch.tensor([0, 6]) if case == "bad_index_entry" else torch.tensor([0, 1])
    hsave = torch.randn(1 if case == "short_hsave" else 2, 8)
    z = torch.randn(2, 2)
    with pytest.raises(RuntimeError, match="lowrank_rows"):
        bwd(g, hsave, index, z, torch.empty(0), None, B, None, 0, True, [True, False, False, True, False, False])

"""The CPU extension's edit of every row (``lowrank_all.cpp``), taken by ``lowrank_edit`` without
an index on float32 and bfloat16 CPU tensors (bfloat16: parameters bfloat16 or float32) up to the
ranks of ``cpu_ext.LOWRANK_ALL_MAX_RANK``: against the float64 reference (output and every
gradient) for each method's term pattern and activations, ranks and widths around the kernels'
groups, lanes and chunks, each input alone requiring grad, the same bits whatever the thread
count, the incoming gradient taken over only when nothing else sees it, no-grad calls, the calls
left to the PyTorch path, and direct calls of the op (float64 included); a dispatch mode confirms
which path ran.

Fails (does not skip) where the extension cannot be built, unless ``REFT_KERNELS_CPU_EXT=0``
turns it off."""
from __future__ import annotations

import pytest
import torch

import reft_kernels as rk
from reft_kernels import cpu_ext, reference
from tests._helpers import (
    UNSHARED, UPSTREAMS, check_against_reference, lowrank_ref_fn, make_base, make_lowrank_params, upstream_backward,
)
from tests._helpers import ops_called as ext_ops

pytestmark = pytest.mark.skipif(not cpu_ext.enabled(), reason=f"{cpu_ext.ENV_VAR}=0 turns the CPU extension off")

OPS = ["lowrank_all_fwd", "lowrank_all_bwd"]

# each method's terms (make_lowrank_params) and whether C is B: LoReFT and ConsReFT tied; NoReFT
# both weights and biases; DiReFT and NodiReFT A and a only (the two-term form)
PATTERNS = {"loreft": ("BAa", True), "noreft": ("BAaCc", False), "direft": ("BAa", False),
            "consreft": ("Ba", True), "every_term": ("BAaCc", False), "c_only": ("BCc", False)}
DTYPES = {"fp32": (torch.float32,) * 2, "bf16": (torch.bfloat16,) * 2, "bf16_fp32_params": (torch.bfloat16, torch.float32)}


def _params(d, r, dtype, pattern, requires_grad=True):
    terms, tied = PATTERNS[pattern]
    return make_lowrank_params(d, r, dtype, terms=terms, tied=tied, requires_grad=requires_grad)


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("act", [None, "gelu"])
@pytest.mark.parametrize("dtypes", list(DTYPES.values()), ids=list(DTYPES))
def test_against_reference(pattern, act, dtypes):
    """(3, 70) rows of width 37: groups of four rows and an odd one out, lanes of 8 and a tail,
    no full chunk of 64; 210 rows: four blocks of the parameter sums."""
    torch.manual_seed(hash((pattern, act, str(dtypes))) % 2**31)
    base, view = make_base("contiguous", (3, 70), 37, dtypes[0])
    base.requires_grad_(True)
    params = _params(37, 5, dtypes[1], pattern)
    with ext_ops() as names:
        check_against_reference(rk.lowrank_edit, lowrank_ref_fn, base, view, params,
                                kernel_kwargs={"act": act}, ref_kwargs={"act": act})
    assert names == OPS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("r", [1, 2, 3, 4, 7, 8, 9, 16])
@pytest.mark.parametrize("d", [8, 64, 131])
def test_every_rank_and_width(r, d, dtype):
    """Ranks around the groups of products (8, 4, 2, 1), widths of one lane group, one chunk,
    and chunks plus a tail (row_kernels.h); 18 rows: groups of four, two at a time."""
    torch.manual_seed(r * 1000 + d)
    base, view = make_base("contiguous", (2, 9), d, dtype)
    base.requires_grad_(True)
    params = _params(d, r, torch.float32, "noreft")
    with ext_ops() as names:
        check_against_reference(rk.lowrank_edit, lowrank_ref_fn, base, view, params,
                                kernel_kwargs={"act": "silu"}, ref_kwargs={"act": "silu"})
    assert names == OPS


@pytest.mark.parametrize("method", ["loreft", "noreft", "direft", "nodireft", "consreft"])
def test_methods_take_the_extension(method):
    """The public methods over every row reach the op (bfloat16 rows, float32 parameters, as in
    the benchmark's cases) and agree with the float64 reference formula of pyreft's code."""
    torch.manual_seed(11)
    d, r = 24, 4
    h = torch.randn(2, 5, d).to(torch.bfloat16).requires_grad_()
    R = torch.linalg.qr(torch.randn(d, r))[0].t().contiguous().requires_grad_()
    W = (torch.randn(r, d) / d ** 0.5).requires_grad_()
    b = torch.randn(r).requires_grad_()
    W2 = (torch.randn(r, d) / d ** 0.5).requires_grad_()
    b2 = torch.randn(r).requires_grad_()
    args = {"loreft": (R, W, b), "noreft": (W2, W, b, b2), "direft": (R, W, b), "nodireft": (W2, W, b),
            "consreft": (R, b)}[method]
    ref = getattr(reference, f"{method}_reference")
    with ext_ops() as names:
        y = getattr(rk, method)(h, *args)
        grads = torch.autograd.grad(y, [h, *args], torch.ones_like(y))
    assert names == OPS
    leaves = [t.detach().double().requires_grad_() for t in (h, *args)]
    y64 = ref(*leaves)
    want = torch.autograd.grad(y64, leaves, torch.ones_like(y64))
    torch.testing.assert_close(y.double(), y64, rtol=2 ** -8, atol=2 ** -8)
    for got, w, leaf in zip(grads, want, (h, *args)):
        assert got.dtype == leaf.dtype
        torch.testing.assert_close(got.double(), w, rtol=2 ** -7, atol=2 ** -7 * w.abs().max().item())


@pytest.mark.parametrize("grad_of", ["h", "A", "a", "B", "C", "c"])
def test_each_gradient_alone(grad_of):
    torch.manual_seed(2)
    base, view = make_base("contiguous", (2, 9), 12, torch.float32)
    params = _params(12, 3, torch.float32, "every_term", requires_grad=False)
    (base if grad_of == "h" else params[grad_of]).requires_grad_(True)
    with ext_ops() as names:
        check_against_reference(rk.lowrank_edit, lowrank_ref_fn, base, view, params,
                                kernel_kwargs={"act": "tanh"}, ref_kwargs={"act": "tanh"})
    assert names == OPS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_same_bits_whatever_the_thread_count(dtype):
    """Rows split across threads in the forward, parameter sums over fixed blocks in the
    backward (1100 rows: 9 blocks of 128 rows, the last one short)."""
    torch.manual_seed(3)
    h = torch.randn(1100, 40).to(dtype).requires_grad_()
    params = _params(40, 6, torch.float32, "noreft")
    terms = [params[k] for k in "BAaCc"]
    g = torch.randn(1100, 40).to(dtype)
    runs, before = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = rk.lowrank_edit(h, *terms)
            runs.append([y.detach(), *torch.autograd.grad(y, [h, *terms], g)])
    finally:
        torch.set_num_threads(before)
    for x, y in zip(*runs):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pattern", ["loreft", "direft", "every_term"])
def test_rows_at_once_give_the_bits_of_one_row_at_a_time(dtype, pattern):
    """A call over 7 rows edits them two at a time (and one alone: row_kernels.h, dots_group and
    add_group); each row of y and dh equals, bit for bit, the call of that row alone."""
    torch.manual_seed(8)
    d = 64 + 13  # a chunk and a tail
    params = _params(d, 6, torch.float32, pattern)
    terms = [params[k] for k in "BAaCc"]
    act = None if pattern == "loreft" else "gelu"
    h = torch.randn(7, d).to(dtype).requires_grad_()
    g = torch.randn(7, d).to(dtype)
    y = rk.lowrank_edit(h, *terms, act=act)
    (dh,) = torch.autograd.grad(y, [h], g)
    for i in range(7):
        hi = h[i:i + 1].detach().clone().requires_grad_()
        yi = rk.lowrank_edit(hi, *terms, act=act)
        (dhi,) = torch.autograd.grad(yi, [hi], g[i:i + 1])
        assert torch.equal(yi, y[i:i + 1]) and torch.equal(dhi, dh[i:i + 1])


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_backward_takes_over_the_incoming_gradient_only_when_nothing_else_sees_it(upstream):
    """dh is written over the incoming gradient (no (N, d) allocation in the backward op) when
    the engine handed it to the node alone; otherwise into a new tensor, the held gradient left as
    it was. dh and every parameter gradient equal the float64 reference either way, in fp32."""
    torch.manual_seed(9)
    lead, d = (4, 50), 12
    params = _params(d, 3, torch.float32, "loreft")
    h0 = torch.randn(*lead, d, requires_grad=True)
    w, w2 = torch.randn(*lead, d), torch.randn(*lead, d)
    terms = [params[k] for k in "BAaCc"]
    y = rk.lowrank_edit(h0 * 1, *terms)
    assert y.grad_fn.name() == "reft_kernels::LowrankAllBackward"
    got = upstream_backward(y, upstream, w, w2, "lowrank_all_bwd")
    h1 = h0.detach().double().requires_grad_(True)
    p1 = {k: (v.detach().double().requires_grad_(True) if v is not None else None) for k, v in params.items()}
    p1["C"] = p1["B"]  # tied
    lowrank_ref_fn(h1, **p1).backward(got["want_g"].double())
    torch.testing.assert_close(h0.grad.double(), h1.grad, rtol=1e-5, atol=1e-5)
    for k in "BAa":
        torch.testing.assert_close(params[k].grad.double(), p1[k].grad, rtol=1e-5, atol=1e-5)
    assert (got["bwd_bytes"] >= h0.numel() * 4) == (upstream not in UNSHARED)  # an (N, d) tensor or not


def test_saved_rows_edited_in_place_are_caught_and_double_backward_refused():
    torch.manual_seed(5)
    params = _params(8, 2, torch.float32, "loreft")
    terms = [params[k] for k in "BAaCc"]
    h = torch.randn(3, 8, requires_grad=True)
    x = h * 2
    y = rk.lowrank_edit(x, *terms)
    x.add_(1)  # the rows the node saved
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    y = rk.lowrank_edit(h * 2, *terms)
    (gh,) = torch.autograd.grad((y * y).sum(), [h], create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        gh.sum().backward()


def test_an_expanded_incoming_gradient():
    """``y.sum().backward()`` hands the node an expanded (stride 0) gradient: read through a
    contiguous copy, never taken over."""
    torch.manual_seed(10)
    params = _params(20, 3, torch.float32, "noreft")
    terms = [params[k] for k in "BAaCc"]
    h = torch.randn(2, 33, 20, requires_grad=True)
    rk.lowrank_edit(h, *terms).sum().backward()
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (h, *terms)]
    lowrank_ref_fn(*leaves).sum().backward()
    for t, leaf in zip((h, *terms), leaves):
        if t is not None:
            torch.testing.assert_close(t.grad.double(), leaf.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "nothing_requires_grad"])
def test_without_gradient(mode):
    torch.manual_seed(4)
    h = torch.randn(3, 5, 8)
    params = _params(8, 2, torch.float32, "direft", requires_grad=mode != "nothing_requires_grad")
    terms = [params[k] for k in "BAaCc"]
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode)
    with (ctx() if ctx else torch.enable_grad()), ext_ops() as names:
        y = rk.lowrank_edit(h, *terms)
    assert y.grad_fn is None
    assert names == (["lowrank_all"] if mode == "inference_mode" else ["lowrank_all_fwd"])
    want = lowrank_ref_fn(h.double(), *(t.detach().double() if t is not None else None for t in terms))
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["fp16", "fp64", "fp32_h_bf16_params", "transposed", "rank_above_fp32",
                                  "rank_above_bf16", "with_index", "off"])
def test_calls_left_to_the_pytorch_path(case, monkeypatch):
    torch.manual_seed(6)
    dtype = {"fp16": torch.float16, "fp64": torch.float64, "rank_above_bf16": torch.bfloat16}.get(case, torch.float32)
    r = {"rank_above_fp32": cpu_ext.LOWRANK_ALL_MAX_RANK[torch.float32] + 1,
         "rank_above_bf16": cpu_ext.LOWRANK_ALL_MAX_RANK[torch.bfloat16] + 1}.get(case, 3)
    base, view = make_base("transposed" if case == "transposed" else "contiguous", (3, 5), 16, dtype)
    base.requires_grad_(True)
    pdtype = torch.bfloat16 if case == "fp32_h_bf16_params" else dtype
    params = _params(16, r, pdtype, "loreft")
    index = torch.tensor([0, 4, -1]) if case == "with_index" else None
    if case == "off":
        monkeypatch.setenv(cpu_ext.ENV_VAR, "0")
    with ext_ops() as names:
        check_against_reference(rk.lowrank_edit, lowrank_ref_fn, base, view, params,
                                kernel_kwargs={"index": index}, ref_kwargs={"index": index})
    assert not any(n.startswith("lowrank_all") for n in names)


def test_float64_through_the_op_directly():
    """The op takes float64 rows too (the public op leaves them to the PyTorch path: unmeasured)."""
    torch.manual_seed(7)
    op = torch.ops.reft_kernels_cpu.lowrank_all.default
    h = torch.randn(2, 70, 19, dtype=torch.float64, requires_grad=True)
    params = _params(19, 5, torch.float64, "every_term")
    terms = [params[k] for k in "ABaCc"]
    y = op(h, params["A"], params["a"], params["B"], params["C"], params["c"], 1, False)  # relu
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [h, *terms], g)
    leaves = [t.detach().clone().requires_grad_() for t in (h, *terms)]
    y64 = lowrank_ref_fn(leaves[0], leaves[2], leaves[1], leaves[3], leaves[4], leaves[5], act="relu")
    want = torch.autograd.grad(y64, leaves, g)
    torch.testing.assert_close(y, y64, rtol=1e-12, atol=1e-12)
    for x, w in zip(got, want):
        torch.testing.assert_close(x, w, rtol=1e-12, atol=1e-12)


def test_direct_calls_of_the_op_are_checked():
    op = torch.ops.reft_kernels_cpu.lowrank_all.default
    assert cpu_ext.red_op() is not None, cpu_ext.status()
    h, B = torch.randn(4, 8), torch.randn(2, 8)
    bad = [
        ((torch.randn(4, 8, dtype=torch.float16), None, None, B.half(), None, None, 0, False), "float32, float64 or bfloat16"),
        ((h, None, None, torch.randn(2, 7), None, None, 0, False), "B must be"),
        ((h, torch.randn(3, 8), None, B, None, None, 0, False), "A must be"),
        ((h, None, torch.randn(3), B, None, None, 0, False), "a must be"),
        ((h, None, None, B.double(), None, None, 0, False), "B must be"),
        ((h, None, None, B, torch.randn(2, 8), None, 0, True), "C must be absent"),
        ((h, None, None, B, None, None, 99, False), "activation"),
        ((h.t(), None, None, torch.randn(2, 4), None, None, 0, False), "contiguous"),
    ]
    for args, match in bad:
        with pytest.raises(RuntimeError, match=match):
            op(*args)
    bwd = torch.ops.reft_kernels_cpu.lowrank_all_bwd.default
    z = torch.zeros(4, 2)
    with pytest.raises(RuntimeError, match="g must be"):
        bwd(torch.randn(5, 8), h, z, torch.empty(0, 2), None, B, None, 0, False, [True] * 6)
    with pytest.raises(RuntimeError, match="latents"):
        bwd(torch.randn(4, 8), h, torch.zeros(3, 2), torch.empty(0, 2), None, B, None, 0, False, [True] * 6)

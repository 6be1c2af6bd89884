"""Many adapters in one batch (``red_multi``, ``lowrank_edit_multi``, ``lowrank_edit_multi_``):
forward and every gradient against the float64 references of ``reft_kernels.reference`` on the
PyTorch path and the Triton kernels (interpreter on CPU), -1 ids, index with padding, tying,
activations, dtypes; equivalence with the one-adapter ops; determinism; validation; compile; the
benchmark's plumbing."""
from __future__ import annotations

import pytest
import torch

import reft_kernels as rk
from reft_kernels import lowrank_edit, lowrank_edit_multi, lowrank_edit_multi_, red, red_multi
from reft_kernels._backend import available_backends
from reft_kernels.ops.multi import torch_impl as multi_torch
from reft_kernels.reference import lowrank_edit_multi_reference, red_multi_reference

from .._helpers import bits, check_against_reference, make_base, padded_index
from ..conftest import DEVICE

BACKENDS = [b for b in available_backends(DEVICE) if b in ("torch", "triton")]
# The PyTorch path's two forms (ops/multi/torch_impl.py: masked matmuls, sparse CSR products),
# each forced; the Triton forward runs with the rule's form for its backward.
IMPLS = [("torch", "masked"), ("torch", "sparse")] + [("triton", None)] * ("triton" in BACKENDS)


@pytest.fixture(params=IMPLS, ids=[f"{b}-{f}" if f else b for b, f in IMPLS])
def backend(request, monkeypatch):
    be, form = request.param
    monkeypatch.setattr(multi_torch, "FORM", form)
    return be


def _stacks(k, d, r, dtype=torch.float32, *, terms="BAaCc", tied=False, device=DEVICE, requires_grad=True):
    """Stacked low-rank parameters B, A, C (K, r, d) and a, c (K, r); absent terms None."""
    def mk(shape, scale):
        return (torch.randn(shape, device=device) * scale).to(dtype).requires_grad_(requires_grad)
    s = d ** -0.5
    p = {"B": mk((k, r, d), s), "A": mk((k, r, d), s) if "A" in terms else None,
         "a": mk((k, r), 1.0) if "a" in terms else None, "C": mk((k, r, d), s) if "C" in terms else None,
         "c": mk((k, r), 1.0) if "c" in terms else None}
    if tied:
        p["C"] = p["B"]
    return p


def _ids(n, k, device=DEVICE):
    """n ids in [-1, k), with at least one -1 and (for n >= k + 1) every adapter present."""
    ids = torch.randint(-1, k, (n,), device=device)
    if n >= k + 1:
        ids[: k + 1] = torch.arange(-1, k, device=device)
        ids = ids[torch.randperm(n, device=device)]
    return ids


def _lowrank_ref(h, B, A=None, a=None, C=None, c=None, *, adapter_ids, act=None, index=None):
    return lowrank_edit_multi_reference(h, B, A, a, C, c, adapter_ids=adapter_ids, act=act, index=index)


def _check_lowrank(backend, base, view, params, ids, *, inplace=False, act=None, index=None):
    fn = lowrank_edit_multi_ if inplace else lowrank_edit_multi
    return check_against_reference(
        fn, _lowrank_ref, base, view, params, inplace=inplace,
        kernel_kwargs=dict(adapter_ids=ids, act=act, index=index, backend=backend),
        ref_kwargs=dict(adapter_ids=ids, act=act, index=index))


# (id, terms, tied, act): the shapes of the ReFT methods
METHODS = [
    ("loreft_tied", "BAa", True, None),
    ("noreft_silu", "BAaCc", False, "silu"),
    ("direft_gelu", "BAa", False, "gelu"),
    ("consreft", "Ba", True, None),
    ("lobireft", "Ba", False, None),
    # identity act with A and C: the sparse form's one-product latent x (A - C)^T + (a - c)
    ("untied_identity", "BAaCc", False, None),
    ("untied_identity_c", "BACc", False, None),
]
MODES = ["out", "out_index", "inplace", "inplace_index"]


def _mode(mode, n_rows, k):
    """(inplace, index, number of ids)."""
    inplace = mode.startswith("inplace")
    index = padded_index(n_rows, n_rows // 2, 2, device=DEVICE) if mode.endswith("index") else None
    return inplace, index, (index.numel() if index is not None else n_rows)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,terms,tied,act", METHODS, ids=[m[0] for m in METHODS])
@pytest.mark.parametrize("k", [1, 3], ids=lambda k: f"K{k}")
def test_lowrank_multi_fp32(backend, k, name, terms, tied, act, mode):
    d, r, lead = 40, 3, (3, 7)
    base, view = make_base("contiguous", lead, d)
    base.requires_grad_()
    params = _stacks(k, d, r, terms=terms, tied=tied)
    inplace, index, n_ids = _mode(mode, 21, k)
    _check_lowrank(backend, base, view, params, _ids(n_ids, k), inplace=inplace, act=act, index=index)


@pytest.mark.parametrize("mode", ["out", "inplace_index"])
@pytest.mark.parametrize("layout", ["transposed", "strided_cols"])
def test_lowrank_multi_layouts(backend, layout, mode):
    d, r, k, lead = 33, 5, 3, (4, 5)
    base, view = make_base(layout, lead, d)
    base.requires_grad_()
    params = _stacks(k, d, r, tied=True)
    inplace, index, n_ids = _mode(mode, 20, k)
    _check_lowrank(backend, base, view, params, _ids(n_ids, k), inplace=inplace, act="tanh", index=index)


DTYPE_CASES = [("bf16", torch.bfloat16, torch.bfloat16), ("bf16_h_fp32_params", torch.bfloat16, torch.float32),
               ("fp16", torch.float16, torch.float16)]


@pytest.mark.parametrize("mode", ["out", "out_index"])
@pytest.mark.parametrize("name,h_dtype,p_dtype", DTYPE_CASES, ids=[c[0] for c in DTYPE_CASES])
def test_lowrank_multi_dtypes(backend, name, h_dtype, p_dtype, mode):
    d, r, k, lead = 48, 4, 3, (2, 9)
    base, view = make_base("contiguous", lead, d, h_dtype)
    base.requires_grad_()
    params = _stacks(k, d, r, p_dtype, tied=True)
    inplace, index, n_ids = _mode(mode, 18, k)
    _check_lowrank(backend, base, view, params, _ids(n_ids, k), act="gelu", index=index)


def test_lowrank_multi_float64_torch():
    base, view = make_base("contiguous", (11,), 20, torch.float64)
    base.requires_grad_()
    params = _stacks(3, 20, 2, torch.float64)
    _check_lowrank("torch", base, view, params, _ids(11, 3), act="sigmoid")


def test_lowrank_multi_rank_one_one_row(backend):
    """r = 1, one row, d = 1: every integer argument of the kernel at 1."""
    base, view = make_base("contiguous", (1,), 1)
    base.requires_grad_()
    _check_lowrank(backend, base, view, _stacks(2, 1, 1), torch.tensor([1], device=DEVICE))


def test_lowrank_multi_all_ids_minus_one(backend):
    """Every row -1: y = h, dh = g, every parameter gradient zero."""
    h = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    p = _stacks(2, 16, 3)
    y = lowrank_edit_multi(h, **p, adapter_ids=torch.full((6,), -1, device=DEVICE), act="relu", backend=backend)
    assert torch.equal(y, h)
    g = torch.randn_like(h)
    grads = torch.autograd.grad(y, [h, p["B"], p["A"], p["a"], p["C"], p["c"]], g)
    assert torch.equal(grads[0], g)
    assert all(torch.count_nonzero(t) == 0 for t in grads[1:])


def test_lowrank_multi_index_all_padding_and_empty_h(backend):
    h = torch.randn(0, 8, device=DEVICE)
    p = _stacks(2, 8, 2, requires_grad=False)
    y = lowrank_edit_multi(h, **p, adapter_ids=torch.tensor([0, 1], device=DEVICE),
                           index=torch.tensor([-1, -1], device=DEVICE), backend=backend)
    assert y.shape == (0, 8)


@pytest.mark.parametrize("mode", ["out", "out_index", "inplace_index"])
@pytest.mark.parametrize("name,terms,tied,act", METHODS[:4], ids=[m[0] for m in METHODS[:4]])
def test_lowrank_multi_ids_in_runs(backend, name, terms, tied, act, mode):
    """Ids in runs of 20 (a sequence's rows share its adapter, as in a model), with -1 rows and
    index padding inside the runs: row blocks of one adapter and blocks that straddle two (the
    Triton kernel's 16-row blocks; the sparse form's bags), against float64."""
    d, r, k, lead = 40, 3, 3, (4, 20)
    base, view = make_base("contiguous", lead, d)
    base.requires_grad_()
    params = _stacks(k, d, r, terms=terms, tied=tied)
    inplace, index, n_ids = _mode(mode, 80, k)
    ids = (torch.arange(n_ids, device=DEVICE) // 20 + 1) % k
    ids[torch.tensor([3, 25, 37], device=DEVICE)] = -1
    _check_lowrank(backend, base, view, params, ids, inplace=inplace, act=act, index=index)


@pytest.mark.parametrize("k", [1, 3], ids=lambda k: f"K{k}")
def test_lowrank_multi_equals_single_adapter(backend, k):
    """Every row on adapter 0 equals ``lowrank_edit`` with adapter 0's parameters; the other
    adapters' gradients are zero."""
    d, r, n = 40, 4, 15
    p = _stacks(k, d, r, tied=True)
    h = torch.randn(n, d, device=DEVICE, requires_grad=True)
    g = torch.randn(n, d, device=DEVICE)
    y = lowrank_edit_multi(h, **p, adapter_ids=torch.zeros(n, dtype=torch.long, device=DEVICE), act="silu",
                           backend=backend)
    gm = torch.autograd.grad(y, [h, p["B"], p["A"], p["a"]], g)
    single = {name: (t.detach()[0].clone().requires_grad_() if t is not None else None) for name, t in p.items()}
    single["C"] = single["B"]
    y1 = lowrank_edit(h, **single, act="silu", backend=backend)
    g1 = torch.autograd.grad(y1, [h, single["B"], single["A"], single["a"]], g)
    torch.testing.assert_close(y, y1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gm[0], g1[0], rtol=1e-5, atol=1e-6)
    for multi, one in zip(gm[1:], g1[1:]):
        torch.testing.assert_close(multi[0], one, rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(multi[1:]) == 0


def test_lowrank_multi_deterministic(backend):
    d, r, k, n = 32, 4, 3, 40
    p = _stacks(k, d, r, tied=True)
    h = torch.randn(n, d, device=DEVICE, requires_grad=True)
    ids = _ids(n, k)
    g = torch.randn(n, d, device=DEVICE)
    runs = []
    for _ in range(2):
        y = lowrank_edit_multi(h, **p, adapter_ids=ids, act="gelu", backend=backend)
        runs.append([y, *torch.autograd.grad(y, [h, p["B"], p["A"], p["a"]], g)])
    for a, b in zip(*runs):
        assert torch.equal(bits(a.detach()), bits(b.detach()))


def test_lowrank_multi_no_grad_inplace(backend):
    h = torch.randn(10, 16, device=DEVICE)
    p = _stacks(2, 16, 2, requires_grad=False)
    index = torch.tensor([4, -1, 0, 9], device=DEVICE)
    ids = torch.tensor([1, 0, -1, 0], device=DEVICE)
    p64 = {k: (v.double() if v is not None else None) for k, v in p.items()}
    want = lowrank_edit_multi_reference(h.double(), **p64, adapter_ids=ids, index=index)
    version = h._version
    out = lowrank_edit_multi_(h, **p, adapter_ids=ids, index=index, backend=backend)
    assert out is h and h._version > version
    torch.testing.assert_close(h.double(), want, rtol=1e-5, atol=1e-6)


def test_lowrank_multi_inplace_refusals():
    leaf = torch.randn(4, 8, requires_grad=True)
    p = _stacks(2, 8, 2, requires_grad=False)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        lowrank_edit_multi_(leaf, **p, adapter_ids=torch.zeros(4, dtype=torch.long))
    h = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="h shares memory with B"):
        lowrank_edit_multi_(h, h.view(2, 2, 8), adapter_ids=torch.zeros(4, dtype=torch.long))


# ----------------------------------------------------------------------------- RED

RED_TERMS = {"scale_bias": "st", "scale_only": "s", "bias_only": "t"}


def _red_stacks(k, d, dtype=torch.float32, terms="st"):
    mk = lambda: torch.randn(k, d, device=DEVICE).to(dtype).requires_grad_()  # noqa: E731
    return {"scale": mk() if "s" in terms else None, "bias": mk() if "t" in terms else None}


def _check_red(backend, base, view, params, ids):
    return check_against_reference(
        lambda h, scale, bias, **kw: red_multi(h, scale, bias, ids, **kw),
        lambda h, scale, bias: red_multi_reference(h, scale, bias, ids),
        base, view, params, kernel_kwargs=dict(backend=backend))


@pytest.mark.parametrize("terms", list(RED_TERMS), ids=list(RED_TERMS))
@pytest.mark.parametrize("k", [1, 3], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("layout,lead", [("contiguous", (29,)), ("transposed", (3, 7))], ids=["rows", "transposed"])
def test_red_multi_fp32(backend, layout, lead, k, terms):
    d = 40
    base, view = make_base(layout, lead, d)
    base.requires_grad_()
    n = 1
    for s in lead:
        n *= s
    _check_red(backend, base, view, _red_stacks(k, d, terms=RED_TERMS[terms]), _ids(n, k))


@pytest.mark.parametrize("terms", list(RED_TERMS), ids=list(RED_TERMS))
@pytest.mark.parametrize("layout,lead", [("contiguous", (4, 6)), ("transposed", (3, 7)), ("contiguous", (3, 2, 5))],
                         ids=["seq", "seq_transposed", "seq_4d"])
def test_red_multi_per_sequence_ids(backend, layout, lead, terms):
    """(B,) ids for a (B, ..., d) h: adapter ids[b] on every row of h[b] (the sequence's scale and
    bias gathered once), against the reference and against the same ids given per row."""
    d, k = 24, 3
    base, view = make_base(layout, lead, d)
    base.requires_grad_()
    params = _red_stacks(k, d, terms=RED_TERMS[terms])
    ids = torch.arange(-1, lead[0] - 1, device=DEVICE) % (k + 1) - 1  # -1 and every adapter
    _check_red(backend, base, view, params, ids)
    h = view(base)
    rows = ids.repeat_interleave(h[..., 0].numel() // lead[0])
    assert torch.equal(red_multi(h, params["scale"], params["bias"], ids, backend=backend),
                       red_multi(h, params["scale"], params["bias"], rows, backend=backend))


def test_red_multi_per_sequence_ids_validation():
    h, s = torch.randn(3, 4, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"adapter_ids must have shape \(12,\), one per row .* or \(3,\), one per sequence"):
        red_multi(h, s, None, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"adapter_ids must lie in \[-1, 2\)"):
        red_multi(h, s, None, torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("name,h_dtype,p_dtype", DTYPE_CASES, ids=[c[0] for c in DTYPE_CASES])
def test_red_multi_dtypes(backend, name, h_dtype, p_dtype):
    base, view = make_base("contiguous", (4, 9), 48, h_dtype)
    base.requires_grad_()
    _check_red(backend, base, view, _red_stacks(3, 48, p_dtype), _ids(36, 3))


def test_red_multi_float64_torch():
    base, view = make_base("contiguous", (9,), 12, torch.float64)
    base.requires_grad_()
    _check_red("torch", base, view, _red_stacks(2, 12, torch.float64), _ids(9, 2))


def test_red_multi_equals_red(backend):
    d, n = 24, 10
    s, t = _red_stacks(3, d).values()
    h = torch.randn(n, d, device=DEVICE, requires_grad=True)
    g = torch.randn(n, d, device=DEVICE)
    y = red_multi(h, s, t, torch.full((n,), 2, device=DEVICE), backend=backend)
    gm = torch.autograd.grad(y, [h, s, t], g)
    s2, t2 = s.detach()[2].clone().requires_grad_(), t.detach()[2].clone().requires_grad_()
    y1 = red(h, s2, t2, backend=backend)
    g1 = torch.autograd.grad(y1, [h, s2, t2], g)
    torch.testing.assert_close(y, y1)
    torch.testing.assert_close(gm[0], g1[0])
    for multi, one in zip(gm[1:], g1[1:]):
        torch.testing.assert_close(multi[2], one, rtol=1e-6, atol=1e-6)
        assert torch.count_nonzero(multi[:2]) == 0


def test_red_multi_deterministic(backend):
    s, t = _red_stacks(4, 32).values()
    h = torch.randn(50, 32, device=DEVICE, requires_grad=True)
    ids, g = _ids(50, 4), torch.randn(50, 32, device=DEVICE)
    runs = [torch.autograd.grad(red_multi(h, s, t, ids, backend=backend), [h, s, t], g) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(bits(a), bits(b))


# ----------------------------------------------------------------------------- validation

def _lr_call(h=None, **over):
    kw = dict(B=torch.randn(2, 3, 8), adapter_ids=torch.tensor([0, 1, -1, 0]))
    kw.update(over)
    return lowrank_edit_multi(torch.randn(4, 8) if h is None else h, **kw)


BAD_LOWRANK = [
    ("B_2d", dict(B=torch.randn(3, 8)), ValueError, r"B must have shape \(K, r, d\).*got \(3, 8\)"),
    ("B_width", dict(B=torch.randn(2, 3, 7)), ValueError, r"B must have shape \(K, r, d\).*d = 8"),
    ("B_missing", dict(B=None), TypeError, "B must be a torch.Tensor of shape"),
    ("A_other_K", dict(A=torch.randn(3, 3, 8)), ValueError, r"A must have shape \(2, 3, 8\)"),
    ("C_other_r", dict(C=torch.randn(2, 2, 8)), ValueError, r"C must have shape \(2, 3, 8\)"),
    ("a_shape", dict(a=torch.randn(2, 4)), ValueError, r"a must have shape \(2, 3\)"),
    ("c_shape", dict(c=torch.randn(3)), ValueError, r"c must have shape \(2, 3\)"),
    ("ids_list", dict(adapter_ids=[0, 1, 0, 0]), TypeError, "adapter_ids must be an int64 torch.Tensor"),
    ("ids_int32", dict(adapter_ids=torch.tensor([0, 1, 0, 0], dtype=torch.int32)), TypeError,
     "adapter_ids must be an int64 tensor, got torch.int32"),
    ("ids_length", dict(adapter_ids=torch.tensor([0, 1, 0])), ValueError,
     r"adapter_ids must have shape \(4,\), one per row of h.reshape\(-1, d\), got \(3,\)"),
    ("ids_length_index", dict(adapter_ids=torch.tensor([0, 1, 0, 0]), index=torch.tensor([0, 2])), ValueError,
     r"adapter_ids must have shape \(2,\), one per entry of index"),
    ("ids_device", dict(adapter_ids=torch.tensor([0, 1, 0, 0], device="meta")), ValueError,
     "adapter_ids is on meta but h is on cpu"),
    ("ids_too_big", dict(adapter_ids=torch.tensor([0, 2, 0, 0])), ValueError,
     r"adapter_ids must lie in \[-1, 2\) for 2 stacked adapter\(s\).*got values in \[0, 2\]"),
    ("ids_below", dict(adapter_ids=torch.tensor([0, -2, 0, 0])), ValueError, r"got values in \[-2, 0\]"),
    ("cuda_backend", dict(backend="cuda"), ValueError, "no CUDA C\\+\\+ kernel"),
    ("triton_fp64", dict(h=torch.randn(4, 8).double(), B=torch.randn(2, 3, 8).double(), backend="triton"),
     TypeError, "backend='triton' supports h in float16, bfloat16 or float32"),
    ("bad_index", dict(index=torch.tensor([0, 0]), adapter_ids=torch.tensor([0, 1])), ValueError,
     "index lists row 0 more than once"),
]


@pytest.mark.parametrize("name,over,exc,match", BAD_LOWRANK, ids=[b[0] for b in BAD_LOWRANK])
def test_lowrank_multi_validation(name, over, exc, match):
    if name == "triton_fp64" and "triton" not in BACKENDS:
        pytest.skip("Triton cannot run here")
    with pytest.raises(exc, match=match):
        _lr_call(**over)


def test_ids_checked_once_per_tensor_and_rechecked_after_write():
    h, B = torch.randn(4, 8), torch.randn(2, 3, 8)
    ids = torch.tensor([0, 1, -1, 0])
    lowrank_edit_multi(h, B, adapter_ids=ids)
    ids[1] = 5  # an in-place write moves the version counter: checked again
    with pytest.raises(ValueError, match="adapter_ids must lie in"):
        lowrank_edit_multi(h, B, adapter_ids=ids)


@pytest.mark.parametrize("form", ["masked", "sparse"])
def test_row_facts_rederived_after_ids_write(form, monkeypatch):
    """The PyTorch path keeps each ids tensor's block mask / CSR pattern (``_block_of``,
    ``_pattern_of``); a call with other ids, and one after the same ids were written in place,
    edit with the new ids (forward and gradients against the float64 reference)."""
    monkeypatch.setattr(multi_torch, "FORM", form)
    k, d, r = 3, 16, 2
    base, view = make_base("contiguous", (2, 6), d)
    base.requires_grad_()
    params = _stacks(k, d, r, tied=True)
    for index in (None, padded_index(12, 7)):
        ids = _ids(12 if index is None else 9, k)
        _check_lowrank("torch", base, view, params, ids, index=index)
        ids.copy_(ids.flip(0).roll(1))
        _check_lowrank("torch", base, view, params, ids, index=index)
        _check_lowrank("torch", base, view, params, ids.clone().fill_(1), index=index)


BAD_RED = [
    ("neither", dict(scale=None, bias=None), TypeError, "red_multi needs scale or bias"),
    ("scale_1d", dict(scale=torch.randn(8)), ValueError, r"scale must have shape \(K, d\)"),
    ("bias_other_K", dict(bias=torch.randn(3, 8)), ValueError, r"bias must have shape \(2, 8\)"),
    ("ids_length", dict(ids=torch.tensor([0, 1])), ValueError, r"adapter_ids must have shape \(4,\)"),
    ("ids_range", dict(ids=torch.tensor([0, 1, 2, 0])), ValueError, r"adapter_ids must lie in \[-1, 2\)"),
    ("cuda_backend", dict(backend="cuda"), ValueError, "no CUDA C\\+\\+ kernel"),
]


@pytest.mark.parametrize("name,over,exc,match", BAD_RED, ids=[b[0] for b in BAD_RED])
def test_red_multi_validation(name, over, exc, match):
    kw = dict(scale=torch.randn(2, 8), bias=None, ids=torch.tensor([0, 1, -1, 0]), backend=None)
    kw.update(over)
    with pytest.raises(exc, match=match):
        red_multi(torch.randn(4, 8), kw["scale"], kw["bias"], kw["ids"], backend=kw["backend"])


def test_cuda_backend_from_environment(monkeypatch):
    monkeypatch.setenv("REFT_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="REFT_KERNELS_BACKEND"):
        red_multi(torch.randn(4, 8), torch.randn(2, 8), None, torch.tensor([0, 1, -1, 0]))


def test_public_names():
    for name in ("red_multi", "lowrank_edit_multi", "lowrank_edit_multi_"):
        assert name in rk.__all__ and callable(getattr(rk, name))


# ----------------------------------------------------------------------------- torch.compile

@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_fullgraph_torch_path(_fresh_dynamo):
    """The PyTorch path traces with ``fullgraph=True`` (the ids' value check becomes a device-side
    assertion), forward and backward, equal to eager."""
    d, r, k = 16, 2, 3
    p = _stacks(k, d, r, tied=True)
    s, t = _red_stacks(k, d).values()
    index = torch.tensor([7, -1, 0, 3, 9])
    ids_idx = torch.tensor([2, 0, -1, 1, 0])
    ids_rows = _ids(10, k)

    def f(h):
        y = red_multi(h, s, t, ids_rows, backend="torch")
        y = lowrank_edit_multi(y, **p, adapter_ids=ids_idx, index=index, act="gelu", backend="torch")
        return lowrank_edit_multi_(y * 1.0, **p, adapter_ids=ids_rows, backend="torch")

    h0 = torch.randn(2, 5, d)
    leaves = [p["B"], p["A"], p["a"], s, t]

    def grads(fn):
        h = h0.clone().requires_grad_()
        y = fn(h)
        return y.detach(), torch.autograd.grad((y * torch.linspace(-1, 1, d)).sum(), [h, *leaves])

    y_ref, g_ref = grads(f)
    y, g = grads(torch.compile(f, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- benchmark

def test_multi_benchmark_runs_tiny(capsys):
    from reft_kernels.benchmark import multi as M

    rows = M.run(M.tiny_cases(), rounds=2, min_run_time=0.001, log=print)
    out = capsys.readouterr().out
    assert rows and all(r["status"] == "ok" for r in rows), rows
    assert {r["op"] for r in rows} == {"red_multi", "lowrank_edit_multi"}
    assert "vs one adapter" in out
    for r in rows:
        assert r["multi_ms"] > 0 and r["single_ms"] > 0 and r["split_ms"] > 0
    # PEFT's mixed LoRA batch on the rows of the low-rank edit over every row, when installed
    lora = [r for r in rows if r.get("lora_mixed_ms") is not None]
    want = {(r["k"], r["mode"]) for r in rows if r["op"] == "lowrank_edit_multi" and r["regime"] == "all"}
    try:
        import peft  # noqa: F401
    except ImportError:
        assert not lora
    else:
        assert {(r["k"], r["mode"]) for r in lora} == want
        assert all(r["lora_mixed_ms"] > 0 and r["lora_single_ms"] > 0 and r["lora_mixed_vs_single"] > 0 for r in lora)
        assert "PEFT mixed vs one" in out


def test_torch_form_rule(monkeypatch):
    """The PyTorch path's rule (ops/multi/torch_impl.py): the masked form up to K r = 16 columns
    (for a forward, below K = 4 adapters) and inside torch.compile, the sparse form otherwise on
    CPU tensors; both give the reference."""
    monkeypatch.setattr(multi_torch, "FORM", None)
    x = torch.randn(3, 8)
    assert not multi_torch.sparse_form(x, 16) and multi_torch.sparse_form(x, 17)
    assert not multi_torch.sparse_form(x, 12, 3) and multi_torch.sparse_form(x, 12, 4)
    assert not multi_torch.sparse_form(x[:0], 64)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not multi_torch.sparse_form(x, 64)
    monkeypatch.undo()
    monkeypatch.setattr(multi_torch, "FORM", None)
    base, view = make_base("contiguous", (2, 9), 24)
    base.requires_grad_()
    for k, r in ((2, 3), (4, 3), (6, 3)):  # K r = 6 (masked), 12 (sparse forward, masked backward), 18 (sparse)
        _check_lowrank("torch", base, view, _stacks(k, 24, r, tied=True), _ids(18, k), act="silu")
        _check_red("torch", base, view, _red_stacks(k * 3, 24), _ids(18, k * 3))


def test_transforms_refused():
    s = torch.randn(2, 8)
    ids = torch.tensor([0, 1, -1, 0])
    with pytest.raises(RuntimeError, match="does not support torch.vmap"):
        torch.vmap(lambda x: red_multi(x, s, None, ids))(torch.randn(3, 4, 8))

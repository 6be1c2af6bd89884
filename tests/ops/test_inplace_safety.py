"""In-place edits that cannot be done are refused before anything is written, on every backend
and every in-place entry point: ``lowrank_edit_``, the six ``*_`` interventions and the modules'
``inplace=True``. (Before these checks, a leaf requiring grad was edited and only then refused,
overlapping views were edited once or several times depending on the backend, and an ``h``
sharing memory with a parameter gave wrong results without an error.)"""
from __future__ import annotations

import pytest
import torch

import reft_kernels as rk

from .._helpers import bits, lowrank_ref_fn

D, R = 16, 3


def _params(device, dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(1)
    R_ = rk.orthonormal_rows(torch.randn(R, D, generator=g)).to(device, dtype)
    W = (torch.randn(R, D, generator=g) / D ** 0.5).to(device, dtype)
    b = torch.randn(R, generator=g).to(device, dtype)
    return R_, W, b


def _entry_points(device):
    """(name, fn(h) -> editing h in place) for every in-place entry point."""
    R_, W, b = _params(device)
    idx = torch.tensor([0, 2, -1], device=device)
    mods = {name: cls(D, R).to(device) for name, cls in [("LoReFT", rk.LoReFT), ("NoReFT", rk.NoReFT)]}
    return [
        ("lowrank_edit_", lambda h, be: rk.lowrank_edit_(h, R_, W, b, R_, backend=be)),
        ("lowrank_edit_ index", lambda h, be: rk.lowrank_edit_(h, R_, W, b, R_, index=idx, backend=be)),
        ("loreft_", lambda h, be: rk.loreft_(h, R_, W, b, backend=be)),
        ("noreft_", lambda h, be: rk.noreft_(h, R_, W, b, b, backend=be)),
        ("direft_", lambda h, be: rk.direft_(h, R_, W, b, backend=be)),
        ("nodireft_", lambda h, be: rk.nodireft_(h, R_, W, b, backend=be)),
        ("consreft_", lambda h, be: rk.consreft_(h, R_, b, backend=be)),
        ("lobireft_", lambda h, be: rk.lobireft_(h, R_, b, backend=be)),
        *[(f"{n}(inplace=True)", (lambda m: lambda h, be: (setattr(m, "backend", be), m(h, inplace=True)))(m))
          for n, m in mods.items()],
    ]


ENTRY_NAMES = [name for name, _ in _entry_points("cpu")]


def _assert_refused_untouched(fn, h, backend, match):
    storage = h.detach()
    before = bits(storage.clone())
    with pytest.raises(RuntimeError, match=match):
        fn(h, backend)
    assert torch.equal(bits(storage.clone()), before), "h was written before the error"


@pytest.mark.parametrize("entry", ENTRY_NAMES)
def test_leaf_requiring_grad_refused_before_writing(backend, device, entry):
    fn = dict(_entry_points(device))[entry]
    h = torch.randn(4, D, device=device, requires_grad=True)
    _assert_refused_untouched(fn, h, backend, "leaf Variable that requires grad")


@pytest.mark.parametrize("entry", ENTRY_NAMES)
def test_view_of_leaf_requiring_grad_refused_before_writing(backend, device, entry):
    fn = dict(_entry_points(device))[entry]
    leaf = torch.randn(6, D, device=device, requires_grad=True)
    h = leaf[1:5]
    before = bits(leaf.detach().clone())
    with pytest.raises(RuntimeError, match="view of a leaf Variable that requires grad"):
        fn(h, backend)
    assert torch.equal(bits(leaf.detach().clone()), before)


def test_leaf_under_no_grad_is_edited(backend, device):
    """As for PyTorch's in-place ops: with grad mode off, a leaf that requires grad may be edited."""
    R_, W, b = _params(device)
    h = torch.randn(4, D, device=device, requires_grad=True)
    ref = lowrank_ref_fn(h.detach().double(), R_.double(), W.double(), b.double(), R_.double())
    with torch.no_grad():
        rk.loreft_(h, R_, W, b, backend=backend)
    torch.testing.assert_close(h.detach().double(), ref, rtol=1e-5, atol=1e-5)


def _overlapping_views(device):
    base = torch.randn(8 * D, device=device)
    return {
        "expanded_rows": torch.randn(1, D, device=device).expand(5, D),
        "expanded_last_dim": torch.randn(5, 1, device=device).expand(5, D),
        "expanded_batch": torch.randn(1, 3, D, device=device).expand(2, 3, D),
        "as_strided_overlapping_rows": base.as_strided((6, D), (D // 2, 1)),
    }


@pytest.mark.parametrize("entry", ENTRY_NAMES)
@pytest.mark.parametrize("kind", ["expanded_rows", "expanded_last_dim", "expanded_batch", "as_strided_overlapping_rows"])
def test_overlapping_h_refused_before_writing(backend, device, entry, kind):
    fn = dict(_entry_points(device))[entry]
    h = _overlapping_views(device)[kind]
    _assert_refused_untouched(fn, h, backend, "single memory location")


@pytest.mark.parametrize("where", ["B_rows_of_h", "h_contains_A", "a_inside_h", "index_in_h_storage", "h_is_B"])
def test_h_sharing_memory_with_an_input_refused(backend, device, where):
    store = torch.randn(10, D, device=device)
    R_, W, b = _params(device)
    idx = None
    if where == "B_rows_of_h":  # B is rows 2..4 of h itself
        h, B, A, a = store, store[2:2 + R], W, b
    elif where == "h_contains_A":
        h, B, A, a = store[3:], R_, store[5:5 + R], b
    elif where == "a_inside_h":
        h, B, A, a = store, R_, W, store[4, :R]
    elif where == "index_in_h_storage":  # the index is an int64 view of h's first bytes
        h, B, A, a = store, R_, W, b
        idx = store.view(-1)[:4].view(torch.int64)
        idx.copy_(torch.tensor([0, -1], device=device))
    else:  # h is B
        h = store[:R]
        B, A, a = h, W, b
    before = bits(store.clone())
    with pytest.raises(RuntimeError, match="shares memory with"):
        rk.lowrank_edit_(h, B, A, a, B, index=idx, backend=backend)
    assert torch.equal(bits(store.clone()), before)


def test_disjoint_views_of_one_storage_are_fine(backend, device):
    """Sharing a storage without sharing bytes is no hazard: h below B in one buffer."""
    store = torch.randn(12, D, device=device)
    B, h = store[:R], store[R:]
    ref = lowrank_ref_fn(h.double(), B.double(), C=B.double())
    rk.lowrank_edit_(h, B, C=B, backend=backend)
    torch.testing.assert_close(h.double(), ref, rtol=1e-5, atol=1e-5)


def test_inference_tensor_outside_inference_mode_refused(backend, device):
    R_, W, b = _params(device)
    with torch.inference_mode():
        h = torch.randn(4, D, device=device)
    before = bits(h.clone())
    with pytest.raises(RuntimeError, match="inference tensor"):
        rk.loreft_(h, R_, W, b, backend=backend)
    assert torch.equal(bits(h.clone()), before)
    with torch.inference_mode():  # inside inference mode it is an ordinary in-place edit
        rk.loreft_(h, R_, W, b, backend=backend)
    assert not torch.equal(bits(h.clone()), before)


def test_view_taken_under_no_grad_refused_before_writing(backend, device):
    R_, W, b = _params(device)
    x = torch.randn(5, D, device=device, requires_grad=True) * 1.0
    with torch.no_grad():
        h = x[1:4]
    before = bits(x.detach().clone())
    with pytest.raises(RuntimeError, match="view created in no_grad mode"):
        rk.loreft_(h, R_, W, b, backend=backend)
    assert torch.equal(bits(x.detach().clone()), before)


def test_view_from_unbind_refused_before_writing(backend, device):
    """PyTorch refuses in-place edits of the outputs of multi-view functions (unbind, split)."""
    R_, W, b = _params(device)
    x = torch.randn(4, D, device=device, requires_grad=True) * 1.0
    h = x.unbind(0)[1]
    before = bits(x.detach().clone())
    with pytest.raises(RuntimeError, match="view"):
        rk.loreft_(h, R_, W, b, backend=backend)
    assert torch.equal(bits(x.detach().clone()), before)


def test_view_from_unbind_without_grad_is_edited(backend, device):
    """Nothing requires grad: autograd is not involved and the view is edited like any other."""
    R_, W, b = _params(device)
    x = torch.randn(4, D, device=device)
    h = x.unbind(0)[2]
    ref = lowrank_ref_fn(h.double(), R_.double(), W.double(), b.double(), R_.double())
    rk.loreft_(h, R_, W, b, backend=backend)
    torch.testing.assert_close(x[2].double(), ref, rtol=1e-5, atol=1e-5)


def test_empty_h_with_a_zero_stride_is_accepted(backend, device):
    """Found by the property tests: for a result with no elements PyTorch may pick a stride of 0
    (``torch.randn(3, 0, 1, requires_grad=True) * 1.0`` has strides (0, 1, 0)); an empty tensor
    has no two elements to overlap, and PyTorch's own in-place ops accept it."""
    h = torch.empty_strided((3, 0, 1), (0, 1, 0), device=device)
    h.add_(1.0)
    B = torch.randn(2, 1, device=device, requires_grad=True)
    base = torch.randn(3, 0, 1, device=device, requires_grad=True)
    for x in (h, base * 1.0):
        out = rk.lowrank_edit_(x, B, backend=backend)
        assert out is x
    out.sum().backward()
    assert torch.equal(B.grad, torch.zeros_like(B))

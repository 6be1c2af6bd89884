"""One index tensor reused across calls (as a model hands one to every layer, forward and
backward): what the ops derive from it is computed once per index and reused, and must follow
the index whenever it changes: written in place, or a new tensor in the same memory. Checked
against the float64 reference, gradients included, on every backend the machine runs."""
from __future__ import annotations

import torch

import reft_kernels as rk
from reft_kernels.reference import lowrank_edit_reference

D, R = 24, 4


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(R, D), mk(R, D), mk(R), mk(R, D), mk(R)


def _check(h, index, params, backend):
    """The op on ``backend`` (float64, or float32 for Triton) against the float64 reference."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    leaves = [t.to(dtype).requires_grad_() for t in (h, *params)]
    y = rk.lowrank_edit(leaves[0], *leaves[1:], index=index, backend=backend)
    w = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    grads = torch.autograd.grad((y * w.to(dtype)).sum(), leaves)
    ref_leaves = [t.detach().to(torch.float64).requires_grad_() for t in leaves]
    want = lowrank_edit_reference(ref_leaves[0], *ref_leaves[1:], index=index)
    want_grads = torch.autograd.grad((want * w).sum(), ref_leaves)
    torch.testing.assert_close(y.double(), want, **tol)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), exp, **tol)


def test_an_index_written_in_place_is_derived_again(backend):
    h = torch.randn(3, 5, D, dtype=torch.float64)
    params = _params()
    index = torch.tensor([0, 7, -1, 14])
    _check(h, index, params, backend)
    _check(h, index, params, backend)  # reused as is
    index[0] = 3  # row 0 no longer listed: the padding entry must now keep row 0 as it was
    index[2] = 9
    _check(h, index, params, backend)
    index.copy_(torch.tensor([-1, -1, -1, -1]))
    _check(h, index, params, backend)


def test_a_new_index_in_freed_memory_is_derived_again(backend):
    h = torch.randn(4, 6, D, dtype=torch.float64)
    params = _params(1)
    for entries in ([0, 5, -1, 11], [2, -1, 0, 23], [-1, 4, 8, 1]):
        index = torch.tensor(entries)  # often the address the previous one had
        _check(h, index, params, backend)
        del index


def test_a_full_cache_keeps_the_live_indexes(monkeypatch):
    """When the per-index cache fills up, the entries of tensors that are gone make room and the
    live ones stay: a full clear in the middle of a forward made the layers after it derive their
    index's facts again (a training step's launch count then depended on what ran before it in
    the process: tests/scale/test_launch_budget.py failed that way in one CI run)."""
    from reft_kernels import _rows

    monkeypatch.setattr(_rows, "_FACTS", {})
    derived = []

    def derive(index, lead):
        derived.append(index.tolist())  # (not the tensor: that would keep it alive)
        return object()

    live = [torch.arange(3) + i for i in range(4)]
    for t in live:
        _rows.cached_facts("probe", t, (3,), derive)
    gone = [torch.arange(3) - i for i in range(_rows._FACTS_SIZE)]  # distinct ids while alive
    for t in gone:  # fill the cache past its size, then let these tensors go
        _rows.cached_facts("probe", t, (3,), derive)
        if len(_rows._FACTS) == _rows._FACTS_SIZE:
            break
    del gone, t
    _rows.cached_facts("probe", torch.arange(5), (5,), derive)  # the insert that finds it full
    derived.clear()
    for t in live:  # the eviction kept them: no derivation again
        _rows.cached_facts("probe", t, (3,), derive)
    assert derived == []
    assert len(_rows._FACTS) < _rows._FACTS_SIZE

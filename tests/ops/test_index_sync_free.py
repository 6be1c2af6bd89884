"""The indexed path is sync-free after an index's first use, and its cost follows the rows
edited, not the size of ``h``. (Before: every call ran a ``.tolist()`` check, a host
synchronisation that also blocks CUDA-graph capture, plus about a dozen small launches.)

The aten ops each call dispatches are recorded with a ``TorchDispatchMode``: a host
synchronisation shows up as ``aten._local_scalar_dense`` (``.item()``, ``.tolist()``)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import reft_kernels as rk
from reft_kernels.benchmark.launches import counting

D, R = 32, 4
SYNC = "aten._local_scalar_dense"


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []  # (name, numel of the largest newly allocated output)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        # new memory only: in-place ops and views return (part of) an input
        size = max((t.numel() for t in outs if isinstance(t, torch.Tensor)
                    and t.untyped_storage().data_ptr() not in inputs), default=0)
        self.ops.append((str(func.overloadpacket), size))
        return out


def _record(fn):
    with _Record() as rec:
        fn()
    return rec.ops


def _params(device):
    Rm = rk.orthonormal_rows(torch.randn(R, D, device=device))
    return Rm, torch.randn(R, D, device=device) / D ** 0.5, torch.randn(R, device=device)


def test_index_checked_once_per_tensor(device):
    """The value check is the index path's one host synchronisation (``.item()``), counted here:
    once per index tensor and version, not once per call."""
    Rm, W, b = _params(device)
    h = torch.randn(3, 7, D, device=device)
    index = torch.tensor([0, 20, -1, 5], device=device)
    with counting() as counter:
        for _ in range(3):  # one index tensor, many layers
            rk.loreft(h, Rm, W, b, index=index)
    assert counter.syncs == 1
    index[1] = 6  # an in-place write moves the version counter: checked again
    with counting() as counter:
        rk.loreft(h, Rm, W, b, index=index)
        rk.loreft(h, Rm, W, b, index=index)
    assert counter.syncs == 1
    index[1] = 0  # now a duplicate of entry 0: refused, with the row named
    with pytest.raises(ValueError, match="row 0 more than once"):
        rk.loreft(h, Rm, W, b, index=index)
    with pytest.raises(ValueError, match=r"must lie in \[-1, 9\)"):  # another h: other bounds
        rk.loreft(h[:, :3], Rm, W, b, index=torch.tensor([0, 20], device=device))


@pytest.mark.parametrize("inplace", [False, True], ids=["lowrank_edit", "lowrank_edit_"])
def test_no_host_sync_after_first_use(backend, device, inplace):
    Rm, W, b = _params(device)
    index = torch.tensor([3, -1, 40, 7], device=device)
    base = torch.randn(4, 16, D, device=device)
    W.requires_grad_()

    def step():
        h = base.clone().requires_grad_() * 1.0
        fn = rk.loreft_ if inplace else rk.loreft
        y = fn(h, Rm, W, b, index=index, backend=backend)
        y.sum().backward()

    first = [op for op, _ in _record(step)]
    assert SYNC in first  # the first use checks the values eagerly
    later = [op for op, _ in _record(step)]
    assert SYNC not in later, later


def test_inplace_cost_follows_rows_edited(device):
    """The in-place indexed forward on the PyTorch path: the same ops for any number of rows N,
    and no op produces anything near N x d elements (f7+l7 at B = 32 edits 448 rows)."""
    Rm, W, b = _params(device)
    n_listed = 14

    def ops_for(n_rows):
        h = torch.randn(n_rows, D, device=device)
        index = torch.arange(0, n_rows, n_rows // n_listed, device=device)[:n_listed]
        rk.loreft_(h, Rm, W, b, index=index, backend="torch")  # first use: validated here
        return _record(lambda: rk.loreft_(h, Rm, W, b, index=index, backend="torch"))

    small, large = ops_for(64), ops_for(8192)
    assert [op for op, _ in small] == [op for op, _ in large]
    assert max(size for _, size in large) <= n_listed * D

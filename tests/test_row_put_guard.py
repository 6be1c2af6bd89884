"""No public path lets autograd differentiate a row put with padding entries.

A put whose padding entries point at row 0 (``reft_kernels._rows.put_rows_``, or any ``out[sel] =
rows`` / ``index_put``) counts row 0's gradient once more per padding entry when autograd
differentiates it. Inside the ops' autograd Functions such puts are not differentiated; everywhere
else the library uses ``put_rows``, whose backward is exact. These tests fail if that changes: the
raw helper refuses to be recorded, and the autograd graph of every public indexed path (the
functional ops, every module, the Hugging Face dropout branch) holds no index-put node.
"""
from __future__ import annotations

import pytest
import torch

import reft_kernels as rk
from reft_kernels._rows import put_rows, put_rows_

D = 8


def _graph_nodes(t):
    """Names of every autograd node reachable from ``t.grad_fn``."""
    seen, todo, names = set(), [t.grad_fn], []
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        todo.extend(nxt for nxt, _ in fn.next_functions)
    return names


def _assert_no_put(t, what):
    names = _graph_nodes(t)
    assert names, f"{what}: no autograd graph"
    puts = [n for n in names if "indexput" in n.lower().replace("_", "")]
    assert not puts, f"{what} differentiates a row put ({puts}): use reft_kernels._rows.put_rows"


def test_raw_put_refuses_autograd():
    h = torch.randn(3, D, requires_grad=True)
    index = torch.tensor([0, -1])
    dst = h * 1
    with pytest.raises(RuntimeError, match="put_rows_ is not differentiable"):
        put_rows_(dst, index, torch.randn(2, D))
    with pytest.raises(RuntimeError, match="put_rows_ is not differentiable"):
        put_rows_(torch.zeros(3, D), index, torch.randn(2, D, requires_grad=True))
    with torch.no_grad():  # outside autograd it writes the real entries (padding repeats them)
        out = put_rows_(torch.zeros(3, D), index, torch.tensor([[1.0], [2.0]]).expand(2, D))
    assert torch.equal(out, torch.tensor([1.0, 0.0, 0.0])[:, None].expand(3, D))


@pytest.mark.parametrize("index", [[2, -1, 0, -1], [-1, -1, 1], [0, -1], [-1, 0]])
def test_raw_put_padding_repeats_the_first_real_write(index):
    """Padding entries repeat the first real entry's write (same row, same value), whatever their
    rows hold, so the writes agree and row 0 keeps its value unless it is listed."""
    index = torch.tensor(index)
    dst = torch.arange(3.0)[:, None].expand(3, D).clone()
    rows = torch.randn(len(index), D)
    want = dst.clone()
    for i, row in enumerate(index.tolist()):
        if row >= 0:
            want[row] = rows[i]
    assert torch.equal(put_rows_(dst, index, rows), want)


def test_raw_put_all_padding_writes_row_zero_back():
    """No real entry: the write of entry 0 reaches row 0, which the precondition makes a no-op."""
    dst = torch.randn(3, D)
    rows = dst[0].expand(2, D).clone()  # what the callers' padding rows hold: row 0
    assert torch.equal(put_rows_(dst.clone(), torch.tensor([-1, -1]), rows), dst)


@pytest.mark.parametrize("index", [[0, -1, -1], [-1, 2, 0], [-1, -1, -1], [1, -1, -1]])
def test_put_rows_gradcheck(index):
    """``put_rows``'s backward (and its double backward) against finite differences, float64."""
    index = torch.tensor(index)
    h = torch.randn(2, 2, D, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(len(index), D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: put_rows(a, index, b), (h, rows))
    assert torch.autograd.gradgradcheck(lambda a, b: put_rows(a, index, b), (h, rows))


def test_put_rows_under_vmap_matches_a_loop():
    index = torch.tensor([0, -1, 3])
    h, rows = torch.randn(4, 5, D), torch.randn(4, 3, D)
    out = torch.vmap(lambda a, b: put_rows(a, index, b))(h, rows)
    assert torch.equal(out, torch.stack([put_rows(h[i], index, rows[i]) for i in range(4)]))


MODULES = [rk.RED, rk.LoReFT, rk.NoReFT, rk.DiReFT, rk.NodiReFT, rk.ConsReFT, rk.LoBiReFT]


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_modules_record_no_put(cls, backend):
    m = cls(D, backend=backend) if cls is rk.RED else cls(D, 2, backend=backend)
    h = torch.randn(2, 3, D, requires_grad=True)
    index = torch.tensor([0, -1, -1, 4])
    _assert_no_put(m(h, index), f"{cls.__name__}(h, index)")
    if cls is not rk.RED:
        _assert_no_put(m(h * 1, index, inplace=True), f"{cls.__name__}(h, index, inplace=True)")


def test_functional_ops_record_no_put(backend):
    h = torch.randn(2, 3, D, requires_grad=True)
    B = torch.randn(2, D, requires_grad=True)
    index = torch.tensor([-1, 0, -1])
    _assert_no_put(rk.lowrank_edit(h, B, index=index, backend=backend), "lowrank_edit")
    _assert_no_put(rk.lowrank_edit_(h * 1, B, index=index, backend=backend), "lowrank_edit_")


def test_hf_dropout_branch_records_no_put():
    pytest.importorskip("transformers")
    from reft_kernels.hf import ReftConfig, get_reft_model

    from .hf._models import padded_batch, tiny_model

    model = tiny_model("llama")
    get_reft_model(model, ReftConfig(layers=[0, 1], rank=2, positions="f3+l3", dropout=0.1), verbose=False)
    model.train()
    ids, mask = padded_batch((8, 2), 8, "right")
    _assert_no_put(model(input_ids=ids, attention_mask=mask).logits, "the ReFT hook's dropout branch")

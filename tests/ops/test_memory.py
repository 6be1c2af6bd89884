"""What the autograd Functions keep for the backward: the in-place indexed edit saves only the
listed rows and (n, r) latents, and the out-of-place edit saves h by reference, never a copy."""
import pytest
import torch

import reft_kernels as rk

N_LEAD, D, R = (4, 16), 32, 3


def _saved(fn):
    """Run ``fn`` and return the tensors autograd saved for its backward."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _params(device):
    A, B, C = (torch.randn(R, D, device=device, requires_grad=True) for _ in range(3))
    a, c = (torch.randn(R, device=device, requires_grad=True) for _ in range(2))
    return B, A, a, C, c


@pytest.mark.parametrize("act", [None, "gelu"])
def test_inplace_index_saves_only_listed_rows(backend, device, act):
    h = torch.randn(*N_LEAD, D, device=device, requires_grad=True)
    work = h * 1.0
    index = torch.tensor([3, -1, 40, 7], device=device)
    params = _params(device)
    out, saved = _saved(lambda: rk.lowrank_edit_(work, *params, act=act, index=index, backend=backend))
    kept = [t for t in saved if not any(t is p for p in params)]
    # listed rows (n, d), latents (n, r) x 2, the index (n,): nothing in proportion to h
    budget = index.numel() * (D + 2 * R + 1)
    assert sum(t.numel() for t in kept) <= budget < h.numel(), [tuple(t.shape) for t in kept]
    out.sum().backward()
    assert h.grad is not None


def test_out_of_place_saves_h_by_reference(backend, device):
    h = torch.randn(*N_LEAD, D, device=device, requires_grad=True)
    params = _params(device)
    _, saved = _saved(lambda: rk.lowrank_edit(h, *params, backend=backend))
    big = [t for t in saved if t.numel() >= h.numel()]
    assert len(big) == 1 and big[0].data_ptr() == h.data_ptr()
    latents = [t for t in saved if t.dim() == 2 and t.shape == (h.numel() // D, R)]
    assert latents, "the (N, r) latent is saved"


def test_red_saves_h_only_when_scale_needs_grad(backend, device):
    h = torch.randn(*N_LEAD, D, device=device, requires_grad=True)
    s = torch.randn(D, device=device)
    t = torch.randn(D, device=device, requires_grad=True)
    _, saved = _saved(lambda: rk.red(h, s, t, backend=backend))
    assert all(x.numel() < h.numel() for x in saved)
    s.requires_grad_()
    _, saved = _saved(lambda: rk.red(h, s, t, backend=backend))
    assert [x.data_ptr() for x in saved if x.numel() == h.numel()] == [h.data_ptr()]

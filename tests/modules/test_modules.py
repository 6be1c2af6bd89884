"""nn.Module wrappers: initialisation, agreement with the functional ops, orthonormality of R
through training, in-place forward, and argument checks."""
import pytest
import torch

import reft_kernels as rk
from reft_kernels import reference as ref

D, RANK = 48, 6

MODULES = [rk.LoReFT, rk.NoReFT, rk.DiReFT, rk.NodiReFT, rk.ConsReFT, rk.LoBiReFT]
ORTHONORMAL = [rk.LoReFT, rk.DiReFT, rk.ConsReFT, rk.LoBiReFT]


def test_red_identity_at_init(backend, device):
    m = rk.RED(D, backend=backend, device=device)
    h = torch.randn(3, 5, D, device=device)
    assert torch.equal(m(h), h)
    assert m.scale.shape == (D,) and m.bias.shape == (D,)


def test_red_module_matches_reference(backend, device):
    m = rk.RED(D, backend=backend, device=device)
    with torch.no_grad():
        m.scale.normal_()
        m.bias.normal_()
    h = torch.randn(4, D, device=device)
    torch.testing.assert_close(m(h), ref.red_reference(h, m.scale, m.bias), rtol=1e-6, atol=1e-6)


def test_red_module_index(backend, device):
    m = rk.RED(D, backend=backend, device=device)
    with torch.no_grad():
        m.scale.normal_()
        m.bias.normal_()
    h = torch.randn(2, 5, D, device=device, requires_grad=True)
    index = torch.tensor([1, -1, 7], device=device)
    y = m(h, index)
    flat = h.detach().reshape(-1, D)
    expected = flat.clone()
    expected[[1, 7]] = flat[[1, 7]] * m.scale.detach() + m.bias.detach()
    torch.testing.assert_close(y.reshape(-1, D), expected, rtol=1e-6, atol=1e-6)
    y.sum().backward()
    torch.testing.assert_close(m.bias.grad, torch.full((D,), 2.0, device=device))
    with pytest.raises(ValueError, match="more than once"):
        m(h, torch.tensor([1, 1], device=device))


def _module_reference(m, h):
    """Each module through its own pyreft formula, from its parameters."""
    if isinstance(m, rk.LoReFT):
        return ref.loreft_reference(h, m.R, m.weight, m.bias, act=m.act)
    if isinstance(m, rk.NoReFT):
        return ref.noreft_reference(h, m.proj_weight, m.weight, m.bias, m.proj_bias, act=m.act)
    if isinstance(m, rk.DiReFT):
        return ref.direft_reference(h, m.R, m.weight, m.bias, act=m.act)
    if isinstance(m, rk.NodiReFT):
        return ref.nodireft_reference(h, m.proj_weight, m.weight, m.bias, act=m.act)
    if isinstance(m, rk.ConsReFT):
        return ref.consreft_reference(h, m.R, m.bias)
    return ref.lobireft_reference(h, m.R, m.bias)


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_module_matches_pyreft_formula(cls, backend, device):
    m = cls(D, RANK, backend=backend, device=device)
    h = torch.randn(2, 7, D, device=device)
    y = m(h)
    y_ref = _module_reference(m, h)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    params = [p for p in m.parameters()]
    grads = torch.autograd.grad(y, params, g)
    grads_ref = torch.autograd.grad(_module_reference(m, h), params, g)
    for p, a, b in zip(m.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"gradient of {p[0]}")


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_module_index_and_inplace(cls, backend, device):
    m = cls(D, RANK, backend=backend, device=device)
    h = torch.randn(2, 7, D, device=device)
    index = torch.tensor([0, 3, -1, 13], device=device)
    with torch.no_grad():
        y = m(h, index)
        h2 = h.clone()
        out = m(h2, index, inplace=True)
    assert out is h2 and torch.equal(h2, y)
    untouched = torch.ones(14, dtype=torch.bool, device=device)
    untouched[[0, 3, 13]] = False
    assert torch.equal(y.reshape(-1, D)[untouched], h.reshape(-1, D)[untouched])


@pytest.mark.parametrize("cls", ORTHONORMAL, ids=lambda c: c.__name__)
def test_rows_stay_orthonormal_through_training(cls, backend, device):
    torch.manual_seed(1)
    m = cls(D, RANK, backend=backend, device=device)
    opt = torch.optim.Adam(m.parameters(), lr=5e-2)
    h, target = torch.randn(32, D, device=device), torch.randn(32, D, device=device)
    R0 = m.R.detach().clone()
    for _ in range(5):
        loss = (m(h) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    R = m.R.detach()
    assert (R - R0).abs().max() > 1e-3, "R did not train"
    torch.testing.assert_close(R @ R.T, torch.eye(RANK, device=device), rtol=0, atol=1e-5)
    assert m.rotation.numel() == RANK * D  # O(r d) state, no (d, d) buffer
    assert not list(m.buffers())


def test_orthonormal_rows_is_identity_on_orthonormal_input():
    X = torch.randn(RANK, D, dtype=torch.float64)
    Q = rk.orthonormal_rows(X)
    torch.testing.assert_close(Q @ Q.T, torch.eye(RANK, dtype=torch.float64))
    torch.testing.assert_close(rk.orthonormal_rows(Q), Q)
    # same row space: projecting X's rows onto span(Q) changes nothing
    torch.testing.assert_close(X @ Q.T @ Q, X)


def test_orthonormal_rows_gradcheck():
    X = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(rk.orthonormal_rows, (X,))


def test_orthonormal_rows_batched_equals_each_matrix():
    """A stack of L matrices: each result (and each gradient) is the matrix's own, in float64
    where the batched and single QRs agree to rounding."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(3, 4, 10, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(3, 4, 10, dtype=torch.float64, generator=g)
    batched = rk.orthonormal_rows(X)
    (batched * W).sum().backward()
    got_grad, X.grad = X.grad, None
    for i in range(3):
        single = rk.orthonormal_rows(X[i])
        torch.testing.assert_close(batched[i], single, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(batched[i] @ batched[i].T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-13)
        (single * W[i]).sum().backward()
    torch.testing.assert_close(got_grad, X.grad, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="r <= d"):
        rk.orthonormal_rows(torch.randn(2, 5, 4))


def test_orthonormal_rows_low_precision_input():
    R = rk.orthonormal_rows(torch.randn(RANK, D, dtype=torch.bfloat16))
    assert R.dtype == torch.float32
    torch.testing.assert_close(R @ R.T, torch.eye(RANK), rtol=0, atol=1e-5)


def test_load_R():
    m = rk.LoReFT(D, RANK)
    R = rk.orthonormal_rows(torch.randn(RANK, D))
    m.load_R_(R)
    torch.testing.assert_close(m.R, R, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="R must have shape"):
        m.load_R_(torch.randn(RANK + 1, D))


def test_bf16_module_params_with_fp32_R(backend, device):
    m = rk.LoReFT(D, RANK, dtype=torch.bfloat16, backend=backend, device=device)
    assert m.weight.dtype == torch.bfloat16 and m.R.dtype == torch.float32
    h = torch.randn(3, D, dtype=torch.bfloat16, device=device)
    y = m(h)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.weight.grad.dtype == torch.bfloat16 and m.rotation.grad.dtype == torch.float32


@pytest.mark.parametrize("args", [(0, 2), (8, 0), (4, 8), (8.0, 2)])
def test_bad_dims(args):
    with pytest.raises(ValueError):
        rk.LoReFT(*args)
    with pytest.raises(ValueError):
        rk.RED(0)


def test_noreft_without_proj_bias():
    m = rk.NoReFT(D, RANK, add_bias=False)
    assert m.proj_bias is None
    h = torch.randn(5, D)
    torch.testing.assert_close(m(h), _module_reference(m, h), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [rk.LoReFT, rk.DiReFT, rk.ConsReFT, rk.LoBiReFT])
@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float16])
def test_half_cast_keeps_rotation_fp32_and_exact(cls, cast):
    """``module.to(bf16/fp16)`` (a whole model cast) keeps R's parameter in fp32, values and
    gradient untouched, while the other parameters follow the cast; fp64 casts apply as usual."""
    m = cls(16, 4)
    m(torch.randn(3, 16)).sum().backward()
    rot, grad = m.rotation.detach().clone(), m.rotation.grad.clone()
    m.to(cast)
    assert m.rotation.dtype == torch.float32 and torch.equal(m.rotation, rot)
    assert m.rotation.grad.dtype == torch.float32 and torch.equal(m.rotation.grad, grad)
    assert all(p.dtype == cast for n, p in m.named_parameters() if n != "rotation")
    m.half() if cast == torch.bfloat16 else m.bfloat16()
    assert m.rotation.dtype == torch.float32 and torch.equal(m.rotation, rot)
    m.double()
    assert m.rotation.dtype == torch.float64 and all(p.dtype == torch.float64 for p in m.parameters())
    m.to(cast)  # from fp64 a half cast lands on fp32 (QR has no half kernels)
    assert m.rotation.dtype == torch.float32

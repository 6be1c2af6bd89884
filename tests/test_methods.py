"""The method table (``reft_kernels.methods``) against the independently written float64 formulas
(``reference.<method>_reference``) and against the names the ops and modules use, so that the
table cannot drift from what each method computes."""
import inspect
import subprocess
import sys

import pytest
import torch

import reft_kernels as rk
from reft_kernels import modules, reference
from reft_kernels._activations import act_code, act_torch
from reft_kernels.methods import METHODS, PYREFT_TYPES

D, R = 12, 3
NAMES = list(METHODS)


def _compose(method, h, values, act):
    """``h + (act(h A^T + a) - h C^T - c) B`` from the table's terms, the absent ones left out."""
    B, A, a, C, c = method.terms(*values)
    u = h @ A.t() if A is not None else h.new_zeros(h.shape[:-1] + (R,))
    if a is not None:
        u = u + a
    z = act_torch(u, act_code(act))
    if C is not None:
        z = z - h @ C.t()
    if c is not None:
        z = z - c
    return h + z @ B


@pytest.mark.parametrize("name", NAMES)
def test_terms_match_the_reference_formula(name):
    method = METHODS[name]
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(4, 5, D, generator=gen, dtype=torch.float64)
    values = [torch.randn(s, generator=gen, dtype=torch.float64) for s in method.shapes(R, D)]
    act = "gelu" if method.takes_act else None
    want = getattr(reference, f"{name}_reference")(h, *values, **({"act": act} if act else {}))
    torch.testing.assert_close(_compose(method, h, values, act), want, rtol=1e-12, atol=1e-12)
    if method.optional:  # the optional parameters left out
        short = values[:len(values) - len(method.optional)]
        want = getattr(reference, f"{name}_reference")(h, *short, **({"act": act} if act else {}))
        torch.testing.assert_close(_compose(method, h, short, act), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_names_match_the_ops_and_modules(name):
    method = METHODS[name]
    assert method.B is not None and method.a is not None
    assert {t for t in method.terms(*method.params) if t is not None} == set(method.params)
    assert len(method.attrs) == len(method.params) == len(method.pyreft_keys)
    assert method.tied == (name in ("loreft", "noreft", "consreft"))
    for op in (getattr(rk, name), getattr(rk, name + "_")):
        sig = inspect.signature(op).parameters
        assert list(sig)[1:1 + len(method.params)] == list(method.params)
        assert [p for p in method.params if sig[p].default is None] == list(method.optional)
        assert ("act" in sig) == method.takes_act
    ref_sig = inspect.signature(getattr(reference, f"{name}_reference")).parameters
    assert ("act" in ref_sig) == method.takes_act
    cls = getattr(modules, method.module)
    assert cls.method is method and issubclass(cls, modules._Orthonormal) == method.orthonormal
    assert ("add_bias" in inspect.signature(cls).parameters) == method.add_bias
    iv = cls(D, R, dtype=torch.float64)
    for p, attr in zip(method.params, method.attrs):
        assert tuple(getattr(iv, attr).shape) == ((R, D) if method.dims(p) == ("r", "d") else (R,))
    assert PYREFT_TYPES[method.pyreft] == name


def test_module_edit_is_the_reference_formula():
    """Each module's forward (its attributes through the table) against the formula."""
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(6, D, generator=gen, dtype=torch.float64)
    for name, method in METHODS.items():
        iv = getattr(modules, method.module)(D, R, dtype=torch.float64, backend="torch")
        values = [getattr(iv, attr) for attr in method.attrs]
        want = getattr(reference, f"{name}_reference")(h, *values)
        torch.testing.assert_close(iv(h), want, rtol=1e-10, atol=1e-10)


def test_the_table_imports_no_torch():
    code = "import sys, reft_kernels.methods; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_term_picker_agrees_with_terms(name):
    method = METHODS[name]
    values = tuple(object() for _ in method.params)
    assert method.term_picker()(values + (None,)) == method.terms(*values)
    if method.optional:  # a trailing optional parameter left out reads as None in both
        assert method.term_picker()(values[:-1] + (None, None)) == method.terms(*values[:-1])

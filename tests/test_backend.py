"""Backend selection: the default dispatch, the REFT_KERNELS_BACKEND override, explicit requests
that cannot run, and the Triton backend on CPU without the interpreter."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import reft_kernels
from reft_kernels import _cuda, lowrank_edit, red
from reft_kernels._backend import ENV_VAR, available_backends, resolve_backend
from reft_kernels.reference import lowrank_edit_reference, red_reference

CPU = torch.device("cpu")


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_env_var_name():
    assert ENV_VAR == "REFT_KERNELS_BACKEND"


def test_default_backend_on_cpu_is_torch(no_env):
    assert resolve_backend(None, CPU) == "torch"
    assert resolve_backend(None, CPU, triton_unsupported="r too large") == "torch"


def test_explicit_backends_on_cpu(no_env):
    assert resolve_backend("torch", CPU) == "torch"
    assert resolve_backend("TORCH", CPU) == "torch"
    if "triton" in available_backends(CPU):
        assert resolve_backend("triton", CPU) == "triton"


@pytest.mark.parametrize("value", ["torch", "triton", " Torch "])
def test_env_var_overrides_default(monkeypatch, value):
    if value.strip().lower() == "triton" and "triton" not in available_backends(CPU):
        pytest.skip("triton backend unavailable")
    monkeypatch.setenv(ENV_VAR, value)
    assert resolve_backend(None, CPU) == value.strip().lower()


def test_env_var_does_not_override_explicit_argument(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "nope")
    assert resolve_backend("torch", CPU) == "torch"


def test_env_var_triton_is_used_by_the_ops(monkeypatch):
    """With the variable set to "triton", backend=None runs the Triton path: the r > 128 limit,
    which the default dispatch otherwise routes around, now raises."""
    if "triton" not in available_backends(CPU):
        pytest.skip("triton backend unavailable")
    h = torch.randn(3, 8)
    B = torch.randn(129, 8)
    monkeypatch.delenv(ENV_VAR, raising=False)
    lowrank_edit(h, B)  # default dispatch: torch path, fine
    monkeypatch.setenv(ENV_VAR, "triton")
    with pytest.raises(ValueError, match=ENV_VAR):
        lowrank_edit(h, B)
    # float64 is not a Triton dtype: the override reaches red's dtype check too
    with pytest.raises(TypeError):
        red(torch.randn(3, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64))
    # and results of the overridden default are right
    B = torch.randn(4, 8)
    ref = lowrank_edit_reference(h.double(), B.double())
    torch.testing.assert_close(lowrank_edit(h, B).double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", ["nope", "gpu", "tritonx"])
def test_env_var_invalid_raises_naming_variable(monkeypatch, value):
    monkeypatch.setenv(ENV_VAR, value)
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_backend(None, CPU)
    h = torch.randn(3, 8)
    with pytest.raises(ValueError, match=ENV_VAR):
        red(h, torch.randn(8))
    with pytest.raises(ValueError, match=ENV_VAR):
        lowrank_edit(h, torch.randn(2, 8))


def test_empty_env_var_means_default(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "")
    assert resolve_backend(None, CPU) == "torch"


@pytest.mark.parametrize("bad", ["nope", "", "Cuda2", 3])
def test_invalid_backend_argument(no_env, bad):
    with pytest.raises(ValueError, match="backend"):
        resolve_backend(bad, CPU)


@pytest.mark.skipif(_cuda.host_mode(), reason="the whole-suite CUDA emulation lets backend='cuda' take CPU tensors")
def test_cuda_backend_on_cpu_raises(no_env):
    with pytest.raises(RuntimeError, match="cuda"):
        resolve_backend("cuda", CPU)
    h = torch.randn(3, 8)
    with pytest.raises(RuntimeError):
        red(h, torch.randn(8), backend="cuda")
    with pytest.raises(RuntimeError):
        lowrank_edit(h, torch.randn(2, 8), backend="cuda")


def test_triton_rank_limit_reason(no_env):
    if "triton" not in available_backends(CPU):
        pytest.skip("triton backend unavailable")
    with pytest.raises(ValueError, match="r = 129"):
        resolve_backend("triton", CPU, triton_unsupported="the Triton kernels take ranks up to 128, got r = 129")


def test_available_backends_cpu():
    got = available_backends(CPU)
    assert got[0] == "torch" and "cuda" not in got
    assert ("triton" in got) == (reft_kernels._triton.HAS_TRITON and reft_kernels._triton.INTERPRET)


def test_default_dispatch_results_on_cpu(no_env):
    h = torch.randn(4, 6, 16)
    s, t = torch.randn(16), torch.randn(16)
    ref = red_reference(h.double(), s.double(), t.double())
    torch.testing.assert_close(red(h, s, t).double(), ref, rtol=1e-6, atol=1e-6)


_NO_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from reft_kernels import red, lowrank_edit
    from reft_kernels._triton import HAS_TRITON, INTERPRET
    assert not INTERPRET
    h = torch.randn(3, 8)
    for call in (lambda: red(h, torch.randn(8), backend="triton"),
                 lambda: lowrank_edit(h, torch.randn(2, 8), backend="triton")):
        try:
            call()
        except RuntimeError as e:
            print("RuntimeError:", e)
        except Exception as e:
            print("OTHER:", type(e).__name__, e)
        else:
            print("NO ERROR")
    # the default dispatch still works there
    y = red(h, torch.ones(8), torch.zeros(8))
    assert torch.equal(y, h)
    print("DEFAULT OK")
    """
)


@pytest.mark.skipif(torch.cuda.is_available() or not reft_kernels._triton.HAS_TRITON,
                    reason="CPU-only behaviour, with triton installed")
def test_triton_on_cpu_without_interpreter_subprocess():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", ENV_VAR)}
    proc = subprocess.run([sys.executable, "-c", _NO_INTERPRETER_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3, proc.stdout
    for line in lines[:2]:
        assert line.startswith("RuntimeError:"), line
        assert "TRITON_INTERPRET" in line, line
    assert lines[2] == "DEFAULT OK"


@pytest.mark.skipif(sys.platform != "linux", reason="triton is a dependency on Linux only")
def test_triton_backend_is_exercised(device):
    """On Linux triton is installed with the package: if it cannot run here, every Triton test
    above would be skipped silently, so fail loudly instead."""
    from reft_kernels import _triton

    assert _triton.HAS_TRITON, f"triton failed to import: {_triton.TRITON_IMPORT_ERROR}"
    assert "triton" in reft_kernels.available_backends(device)

"""The tested range of torch, Triton, transformers and numpy: reft_kernels/_versions.py is the one
source, pyproject.toml declares the same range, the GPU machine's stack is its lower end, and the
verdicts `reft-kernels info` prints."""
import pathlib

import pytest

from reft_kernels import _versions
from reft_kernels.cli import main

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
Requirement = pytest.importorskip("packaging.requirements").Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _declared(requirements):
    return {Requirement(r).name: Requirement(r) for r in requirements}


@pytest.mark.parametrize("name,where", [("torch", "dependencies"), ("numpy", "dependencies"),
                                        ("triton", "dependencies"), ("transformers", "test"),
                                        ("transformers", "hf")])
def test_pyproject_declares_the_tested_range(name, where):
    reqs = PROJECT["dependencies"] if where == "dependencies" else PROJECT["optional-dependencies"][where]
    declared = _declared(reqs)
    assert name in declared, f"pyproject.toml's {where} lacks {name}"
    lo, cap = _versions.SUPPORTED[name]
    assert {str(s) for s in declared[name].specifier} == {f">={lo}", f"<{cap}"}, (
        f"pyproject.toml's {where} declares {declared[name]}; reft_kernels/_versions.py says {_versions.specifier(name)}")


def test_triton_keeps_its_linux_marker():
    marker = _declared(PROJECT["dependencies"])["triton"].marker
    assert marker is not None and "platform_system" in str(marker)


@pytest.mark.parametrize("name", sorted(_versions.SUPPORTED))
def test_gpu_stack_is_the_lower_end(name):
    pinned = _versions.GPU_STACK[name]
    assert _versions.where(name, pinned) == "inside"
    if name != "numpy":  # numpy's lower end is the newest release Triton 3.6's interpreter takes
        lo = _versions.parse(_versions.SUPPORTED[name][0])
        assert _versions.parse(pinned)[:len(lo)] == lo, f"{name}: pinned {pinned}, lower end {lo}"


def test_gpu_stack_numpy_runs_its_interpreter():
    stack = _versions.GPU_STACK
    assert _versions.interpreter_conflict(stack["triton"], stack["numpy"]) is None


@pytest.mark.parametrize("triton,numpy,clash", [("3.6.0", "2.4.0", True), ("3.6.0", "2.5.2", True),
                                                ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False),
                                                ("3.9.0", "2.4.6", False), (None, "2.4.6", False)])
def test_interpreter_rule(triton, numpy, clash):
    text = _versions.interpreter_conflict(triton, numpy)
    assert (text is not None) == clash
    if clash:
        assert triton in text and numpy in text and "numpy<2.4" in text


@pytest.mark.parametrize("version,verdict", [("2.11.0", "inside"), ("2.11.0+cu130", "inside"),
                                             ("2.13.0+cpu", "inside"), ("2.10.1", "below"),
                                             ("2.14.0", "above"), ("2.14.0rc1", "above"),
                                             ("3.0", "above"), (None, "missing")])
def test_where_torch(version, verdict):
    assert _versions.where("torch", version) == verdict


def test_parse_rejects_garbage():
    with pytest.raises(ValueError, match="'unknown'"):
        _versions.parse("unknown")


def test_report_flags_each_package():
    rows = _versions.report({"torch": "2.10.0", "triton": "3.6.0", "transformers": None, "numpy": "2.4.1"})
    by_name = {r.split()[0]: r for r in rows}
    assert "BELOW" in by_name["torch"] and "inside" in by_name["triton"]
    assert "not installed" in by_name["transformers"] and "inside" in by_name["numpy"]
    assert "numpy<2.4" in by_name["interpreter"]


def test_info_prints_the_range(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name, (lo, cap) in _versions.SUPPORTED.items():
        lines = [ln for ln in out.splitlines() if ln.startswith(f"range {name} ")]
        assert len(lines) == 1 and f">={lo},<{cap}" in lines[0], out


def test_triton_on_cpu_names_the_interpreter_clash(monkeypatch):
    import torch

    from reft_kernels import _backend, _triton

    if not _triton.HAS_TRITON:
        pytest.skip("triton is not importable here")
    clash = _versions.interpreter_conflict("3.6.0", "2.4.0")
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.setattr(_backend, "triton_usable_on", lambda device: True)
    monkeypatch.setattr(_backend, "interpreter_conflict", lambda: clash)
    with pytest.raises(RuntimeError, match=r"numpy 2\.4\.0 breaks the CPU interpreter of triton 3\.6\.0"):
        _backend.resolve_backend("triton", torch.device("cpu"))
    assert _backend.resolve_backend(None, torch.device("cpu")) == "torch"  # the default never asks

"""The reft-kernels command line."""
import os
import subprocess
import sys

import pytest

from reft_kernels import _cuda, _triton
from reft_kernels.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "triton" in out and "backends on cpu" in out


def test_check_torch_all_pass(capsys):
    assert main(["check", "--device", "cpu", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if " torch " in ln]
    assert len(rows) == 13 and all(ln.endswith("pass") for ln in rows)
    assert "all passed" in out


@pytest.mark.skipif(not _triton.HAS_TRITON, reason="triton is not importable here")
def test_check_triton_through_interpreter_subprocess():
    """Asked for Triton on a CPU machine, check reruns itself under the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "reft_kernels", "check", "--device", "cpu", "--backend", "triton"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if " triton " in ln]
    assert len(rows) == 13 and all(ln.endswith("pass") for ln in rows)


def test_bad_command():
    with pytest.raises(SystemExit):
        main(["nope"])


@pytest.mark.skipif(_cuda.host_mode(), reason="the whole-suite CUDA emulation lets backend='cuda' take CPU tensors")
def test_check_cuda_backend_on_cpu_is_a_clear_error(capsys):
    assert main(["check", "--device", "cpu", "--backend", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "backend 'cuda' cannot run on cpu" in err and "CUDA tensors" in err


def test_help_answers_without_importing_torch():
    code = ("import sys\nfrom reft_kernels.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: reft-kernels" in proc.stdout and proc.stdout.strip().endswith("False")


def test_train_prints_no_third_party_load_noise(tmp_path):
    """With the test extra installed, transformers imports torchao, whose loggers speak at import
    (optional CUDA libraries absent, pytree deprecations): the CLI keeps them quiet, and sets
    OpenMP's short spin (``cli.SPIN_COUNT``) before torch loads."""
    pytest.importorskip("transformers")
    from .hf._models import tiny_model, tiny_tokenizer

    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "TRITON_INTERPRET")}
    code = ("import os, sys\nfrom reft_kernels.cli import main\n"
            f"rc = main(['train', '--model', {str(folder)!r}, '--steps', '1', '--layers', '0', '--positions', 'f1',"
            f" '--out', {str(tmp_path / 'out')!r}, '--device', 'cpu'])\n"
            "print('OMP', os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))\nsys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    both = proc.stdout + proc.stderr
    assert "step 1/1" in both and "OMP None 1000" in both
    for noise in ("Failed to load", "_pytree", "register_constant"):
        assert noise not in both, both


def test_threads_wait_sets_a_short_spin_unless_the_user_chose(monkeypatch):
    """``_threads_wait``: GOMP_SPINCOUNT per command (``bench``'s own, the default for the rest),
    left alone when the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT."""
    from reft_kernels import cli

    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):  # recorded, so the test restores them
        monkeypatch.setenv(var, "x")
        monkeypatch.delenv(var)
    cli._threads_wait("bench")
    assert os.environ["GOMP_SPINCOUNT"] == cli.SPIN_COUNTS["bench"]
    del os.environ["GOMP_SPINCOUNT"]
    cli._threads_wait("train")
    assert os.environ["GOMP_SPINCOUNT"] == cli.SPIN_COUNT != cli.SPIN_COUNTS["bench"]
    os.environ["GOMP_SPINCOUNT"] = "5"
    cli._threads_wait("bench")
    assert os.environ["GOMP_SPINCOUNT"] == "5"
    del os.environ["GOMP_SPINCOUNT"]
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    cli._threads_wait("train")
    assert "GOMP_SPINCOUNT" not in os.environ


_MALLOC_PROBE = """
import ctypes, ctypes.util, sys
from reft_kernels._malloc import keep_freed_memory
libc = ctypes.CDLL(ctypes.util.find_library("c"))
class Info(ctypes.Structure):  # struct mallinfo2 (glibc >= 2.33): size_t fields
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
applied = keep_freed_memory()
before = libc.mallinfo2().hblks
p = libc.malloc(8 << 20)  # 8 MiB: mmapped by glibc's default threshold (128 KiB at start)
mapped = libc.mallinfo2().hblks - before
libc.free(p)
print("applied", applied, "mapped", mapped)
"""


def test_keep_freed_memory_serves_mib_blocks_from_the_heap(tmp_path):
    """``_malloc.keep_freed_memory`` (what ``bench`` calls): on glibc an 8 MiB block
    then comes from the heap, not its own mapping (as it does by default), and nothing is set
    when the user chose a malloc setting."""
    import ctypes.util

    if not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None:
        pytest.skip("glibc's mallopt: Linux only")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    probe = tmp_path / "probe.py"
    probe.write_text(_MALLOC_PROBE)
    run = lambda env: subprocess.run([sys.executable, str(probe)], env=env, capture_output=True,  # noqa: E731
                                     text=True, timeout=120)
    proc = run(env)
    if proc.returncode != 0 and "mallinfo2" in proc.stderr:
        pytest.skip("no mallinfo2 (glibc < 2.33, or not glibc)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["applied", "True", "mapped", "0"], proc.stdout
    proc = run({**env, "MALLOC_TRIM_THRESHOLD_": str(128 << 10)})  # the user's choice: left alone
    assert proc.stdout.split() == ["applied", "False", "mapped", "1"], proc.stdout + proc.stderr

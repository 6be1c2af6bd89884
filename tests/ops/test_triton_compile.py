"""The Triton kernels compile for a real GPU target (sm_90a) without spilling registers or
exceeding shared memory, checked ahead of time on this CPU-only machine
(tools/triton_compile_check.py; the CPU interpreter used by the other tests cannot see this)."""
import os
import pathlib
import subprocess
import sys

import pytest

from reft_kernels import _triton

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not _triton.HAS_TRITON, reason="triton is not installed")
def test_kernels_compile_for_sm90_without_spills():
    cuobjdump = pathlib.Path(_triton.triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("this Triton build ships no NVIDIA tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "triton_compile_check.py"), "--quick", "--arch", "90"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "all compiled within limits" in proc.stdout

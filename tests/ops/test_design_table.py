"""The README's kernel design table is what tools/design_table.py prints for the code as it is
(registers and shared memory from the kernels compiled ahead of time for sm_90a), so the table
cannot drift from the kernels."""
import os
import pathlib
import subprocess
import sys

import pytest

from reft_kernels import _triton

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not _triton.HAS_TRITON, reason="triton is not installed")
def test_readme_design_table_matches_the_compiled_kernels():
    cuobjdump = pathlib.Path(_triton.triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("this Triton build ships no NVIDIA tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "design_table.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    assert len(table) == 14 and "compile failed" not in proc.stdout
    readme = (ROOT / "README.md").read_text()
    same_triton = f"with Triton {_triton.triton.__version__} " in readme
    readme_rows = {ln.split("|")[1].strip(): ln for ln in readme.splitlines() if ln.startswith("| ")}
    for line in table:
        if same_triton:  # registers and occupancy as compiled by the Triton the README names
            assert line in readme, f"README's design table lacks or differs from: {line}"
        else:  # another Triton may allocate registers differently: the design columns must still match
            cells = [c.strip() for c in line.split("|")[1:-1]]
            if cells[0].startswith("---") or cells[0].startswith("kernel"):
                continue
            want = [c.strip() for c in readme_rows[cells[0]].split("|")[1:-1]]
            keep = [0, 1, 2, 3, 6, 8]  # kernel, rows, bytes, launches, warps, grid
            assert [cells[i] for i in keep] == [want[i] for i in keep], line

"""The kernel design tables of docs/design.md are what tools/design_table.py prints for the code as it is
(registers and shared memory from the kernels compiled ahead of time for sm_90a), so the tables
cannot drift from the kernels. One table per supported Triton (register allocation differs
between releases): the installed Triton's output must equal the page's table for that version;
a Triton without a table of its own must still match the newest table's design columns."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

from reft_kernels import _triton, _versions

ROOT = pathlib.Path(__file__).resolve().parents[2]
HEADING = re.compile(r"^Compiled with Triton (\S+) for sm_90a:$")


DESIGN_DOC = ROOT / "docs" / "design.md"


def readme_tables(text: str) -> dict:
    """{Triton version: table lines} of docs/design.md's tables of Triton kernels: each table
    is the run of ``|`` lines after a "Compiled with Triton X for sm_90a:" line."""
    section = text
    tables, version = {}, None
    for line in section.splitlines():
        m = HEADING.match(line)
        if m:
            version = m.group(1)
            tables[version] = []
        elif version is not None and line.startswith("|"):
            tables[version].append(line)
        elif version is not None and tables[version]:
            version = None  # the table ended
    return tables


def test_readme_keeps_a_table_for_each_end_of_the_supported_range():
    tables = readme_tables(DESIGN_DOC.read_text())
    lowest = _versions.SUPPORTED["triton"][0]
    assert any(v == lowest or v.startswith(lowest + ".") for v in tables), sorted(tables)
    assert len(tables) >= 2 and all(len(t) == 14 for t in tables.values()), {v: len(t) for v, t in tables.items()}


@pytest.mark.skipif(not _triton.HAS_TRITON, reason="triton is not installed")
def test_readme_design_table_matches_the_compiled_kernels():
    cuobjdump = pathlib.Path(_triton.triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("this Triton build ships no NVIDIA tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "design_table.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    version = _triton.triton.__version__
    assert lines[0] == f"Compiled with Triton {version} for sm_90a:", lines[0]
    table = [ln for ln in lines if ln.startswith("|")]
    assert len(table) == 14 and "compile failed" not in proc.stdout
    tables = readme_tables(DESIGN_DOC.read_text())
    if version in tables:  # registers and occupancy as compiled by this very Triton
        assert table == tables[version], "\n".join(
            f"docs/design.md: {a}\nnow:    {b}" for a, b in zip(tables[version], table) if a != b)
        return
    # another Triton allocates registers differently: the design columns must still match the
    # newest table (kernel, rows, bytes, launches, warps)
    newest = tables[max(tables, key=_versions.parse)]
    want_rows = {ln.split("|")[1].strip(): ln for ln in newest}
    for line in table[2:]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        want = [c.strip() for c in want_rows[cells[0]].split("|")[1:-1]]
        keep = [0, 1, 2, 3, 6]
        assert [cells[i] for i in keep] == [want[i] for i in keep], line

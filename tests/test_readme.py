"""The python examples of the README and of every page in docs/ run as written, the error table
(docs/numerics.md) raises what it says, every link between the pages resolves, and the README's
two set-up commands match .ci/run."""
import builtins
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
BLOCKS = [(f"{p.relative_to(ROOT)} block {i}", block) for p in PAGES
          for i, block in enumerate(re.findall(r"```python\n(.*?)```", p.read_text(), flags=re.S))]
NUMERICS = (ROOT / "docs" / "numerics.md").read_text()


def test_readme_has_examples():
    assert sum(name.startswith("README.md") for name, _ in BLOCKS) >= 2
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("name,block", BLOCKS, ids=[name for name, _ in BLOCKS])
def test_readme_example_runs(name, block, capsys):
    exec(compile(block, name, "exec"), {})
    out = capsys.readouterr().out
    assert "False" not in out


def test_readme_fits_a_few_screens():
    assert len(README.splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_links_between_pages_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_setup_commands():
    commands = [ln.strip() for ln in README.splitlines() if ln.strip().startswith("pip install torch==2.13.0")]
    assert len(commands) == 2, commands
    assert commands[0].endswith("reft-kernels train")
    test_cmd = commands[1].split("&&")[-1].strip()
    assert test_cmd == "python -m pytest -q"
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    for step in commands[1].split("&&"):
        assert step.strip() in ci_lines, f".ci/run lacks the README step {step.strip()!r}"


def _error_rows():
    section = NUMERICS.split("\n## Errors", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (.+?) \| `(.+?)` \| `(\w+): (.+?)` \|$", section, flags=re.M)
    return rows


def test_error_table_present():
    assert len(_error_rows()) >= 25


@pytest.mark.parametrize("what,call,exc,fragment", _error_rows(), ids=[r[0] for r in _error_rows()])
def test_error_table_row(what, call, exc, fragment):
    """Each row of the README's error table: the call raises that error type with that text."""
    import torch

    import reft_kernels as rk

    if "backend=\"cuda\"" in call and rk._cuda.host_mode():
        pytest.skip("the whole-suite CUDA emulation lets backend='cuda' take CPU tensors")
    env = {"torch": torch, "rk": rk}
    exec("h = torch.randn(4, 8); B = torch.randn(2, 8); s = torch.randn(8); "
         "leaf = torch.randn(4, 8, requires_grad=True)", env)
    with pytest.raises(getattr(builtins, exc)) as info:
        eval(call, env)
    assert type(info.value).__name__ == exc
    assert fragment in str(info.value), (call, str(info.value))

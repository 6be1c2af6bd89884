"""The README's usage examples run as written, and its two set-up commands match .ci/run."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i, capsys):
    exec(compile(BLOCKS[i], f"README.md block {i}", "exec"), {})
    out = capsys.readouterr().out
    assert "False" not in out


def test_setup_commands():
    commands = [ln.strip() for ln in README.splitlines() if ln.strip().startswith("pip install torch==2.13.0")]
    assert len(commands) == 2, commands
    assert commands[0].endswith("reft-kernels check")
    test_cmd = commands[1].split("&&")[-1].strip()
    assert test_cmd == "python -m pytest -q"
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    for step in commands[1].split("&&"):
        assert step.strip() in ci_lines, f".ci/run lacks the README step {step.strip()!r}"

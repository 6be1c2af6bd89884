"""The Python examples of docs/huggingface-adapters.md run as written and print no False."""
import pathlib
import re

import pytest

pytest.importorskip("transformers")

GUIDE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "huggingface-adapters.md"
BLOCKS = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)


def test_guide_has_an_example():
    assert BLOCKS


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_guide_example_runs(i, capsys):
    exec(compile(BLOCKS[i], f"{GUIDE.name} block {i}", "exec"), {})
    out = capsys.readouterr().out
    assert out.count("True") >= 3 and "False" not in out, out

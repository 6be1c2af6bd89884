"""``reft-kernels plan``: the README's "What runs" block is the planners' output for the reference
shapes, the command takes variants and reports bad ones, and every op's plan prints."""
import pathlib
import re

import pytest

from reft_kernels import _plan_report as R
from reft_kernels.cli import main

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_what_runs_is_the_plan():
    block = re.search(r"## What runs\n.*?```text\n(.*?)```", README, flags=re.S).group(1)
    assert block.rstrip() == R.reference_report()


@pytest.mark.parametrize("method", ["loreft", "noreft", "direft", "nodireft", "consreft", "lobireft", "red"])
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_every_method_plans(method, backend, capsys):
    assert main(["plan", "--method", method, "--rows", "1000", "--d", "256", "--rank", "4", "--backend", backend,
                 "--device", "a100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{method}, 1000 rows x d=256") and f"backend {backend} on A100 SXM" in out


def test_plan_takes_variants_and_names_bad_ones(capsys):
    assert main(["plan", "--kernels", "lowrank_fwd=resident", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "kernels(lowrank_fwd='resident')" in out and "_lowrank_edit_fwd_resident_kernel" in out
    assert "forward  resident (requested)" in out
    assert main(["plan", "--kernels", "lowrank_fwd=fast"]) == 2
    assert "lowrank_fwd must be one of ('rowblock', 'split-d', 'resident')" in capsys.readouterr().err
    assert main(["plan", "--kernels", "resident"]) == 2
    assert "axis=variant pairs" in capsys.readouterr().err
    assert main(["plan", "--method", "red", "--index", "10"]) == 2
    with pytest.raises(SystemExit):  # argparse: not a method
        main(["plan", "--method", "lora"])

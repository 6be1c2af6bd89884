"""``reft-kernels train`` end to end on a tiny LLaMA saved to a folder (the real SmolLM2 default
runs in CI as the main-job check): it trains, lowers the loss, prints the before/after table,
and saves interventions that load back into the same base model."""
from __future__ import annotations

import pytest
import torch

from reft_kernels import cli
from reft_kernels.hf import load_interventions
from reft_kernels.hf import train_job

from ._models import tiny_model, tiny_tokenizer, transformers


@pytest.fixture
def tiny_folder(tmp_path):
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("method", ["loreft", "red"])
def test_train_command_runs_end_to_end(tiny_folder, tmp_path, capsys, method):
    out = tmp_path / "out"
    code = cli.main(["train", "--model", tiny_folder, "--steps", "12", "--method", method, "--layers", "0,2",
                     "--positions", "f2+l2", "--lr", "2e-2", "--out", str(out), "--device", "cpu"])
    assert code == 0
    text = capsys.readouterr().out
    assert "trainable params" in text and "step 12/12" in text and "tokens/s" in text
    for q in train_job.HELD_OUT:
        assert f"Q: {q}" in text
    first, last = (float(x) for x in text.split("\nloss ", 1)[1].split(" over")[0].split(" -> "))
    assert last < first
    # the saved interventions load into the same base model and change its outputs
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    ids = torch.randint(4, 64, (2, 7))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        load_interventions(base, out)
        assert [c.kind for c in base.reft.configs] == ["red" if method == "red" else "reft"]
        assert not torch.equal(base(input_ids=ids).logits, plain)


def test_train_returns_a_summary(tiny_folder, tmp_path):
    summary = train_job.run(model_name=tiny_folder, steps=3, layers=[1], positions="l2", rank=2,
                            out=str(tmp_path / "o"), device="cpu", max_new_tokens=3)
    assert len(summary["losses"]) == 3 and summary["tokens_per_s"] > 0
    assert len(summary["before"]) == len(summary["after"]) == len(train_job.HELD_OUT)


def test_train_rejects_bad_numbers(capsys):
    assert cli.main(["train", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err


class _Terminal:
    """A stream that says it is a terminal and records what is written to it."""

    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_draws_in_place_on_a_terminal(capsys):
    term = _Terminal()
    bar = train_job._Progress(3, term)
    for step in (1, 2, 3):
        bar.update(step, "loss 1.0")
    assert term.text.count("\r") == 3 and term.text.endswith("step 3/3 loss 1.0\n")
    assert term.text.count("\n") == 1  # one line, redrawn
    train_job._Progress(3).update(1, "x")  # pytest's captured stdout is no terminal: a plain line
    assert capsys.readouterr().out.endswith("step 1/3 x\n")


def test_train_prints_the_before_answers_before_training(tiny_folder, tmp_path, capsys):
    train_job.run(model_name=tiny_folder, steps=2, layers=[1], positions="l2", rank=2, out=str(tmp_path / "o"),
                  device="cpu", max_new_tokens=2)
    text = capsys.readouterr().out
    assert text.index("before training") < text.index("step 1/2") < text.index("load_interventions(model, ")

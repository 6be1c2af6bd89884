"""save_interventions interrupted at every file-system step: afterwards the folder reads as the
complete previous save or the complete new one, never a mix and never an error, and the next
save removes what the interrupted one left (other files in the folder stay).

Each step is a call of ``os.open``, ``os.write``, ``os.fsync``, ``os.close``, ``os.replace`` or
``os.unlink`` made while ``save_interventions`` runs; the k-th raises. Two ways to stop:
"exception" (only the k-th call fails, as a KeyboardInterrupt would: the save's clean-up code
runs) and "killed" (every call from the k-th on fails, as if the process died there: nothing
after it reaches the disk, clean-up included).
"""
from __future__ import annotations

import os

import pytest
import torch

from reft_kernels.hf import ReftConfig, REDConfig, get_reft_model, save_interventions
from reft_kernels.hf.io import CONFIG_NAME, WEIGHTS_NAME, read_interventions
from reft_kernels.hf.model_card import NAME as CARD_NAME

from ._models import tiny_model

STEPS = ("open", "write", "fsync", "close", "replace", "unlink")
CONFIGS = [ReftConfig(method="loreft", rank=2, positions="f1+l1", layers=[0]), REDConfig(layers=[1])]
OTHER_FILES = {"notes.txt": b"not ours", ".tmp-user": b"not ours either"}


class Interrupted(BaseException):
    """Stands for the interruption (derives from BaseException, as KeyboardInterrupt does)."""


def _model(scale):
    model = tiny_model("llama")
    get_reft_model(model, CONFIGS, verbose=False)
    with torch.no_grad():
        for i, p in enumerate(model.reft_interventions.parameters()):
            p.copy_(torch.full(p.shape, scale * (i + 1), dtype=p.dtype))
    return model


def _state(model):
    return {k: v.detach().clone() for k, v in model.reft_interventions.state_dict().items()}


class _Steps:
    """Counts the file-system calls; the ``fail_at``-th raises (and, ``killed``, every later one)."""

    def __init__(self, monkeypatch, fail_at=None, killed=False):
        self.calls, self.fail_at, self.killed = 0, fail_at, killed
        for name in STEPS:
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))

    def _wrap(self, real):
        def step(*args, **kwargs):
            k, self.calls = self.calls, self.calls + 1
            if self.fail_at is not None and (k == self.fail_at or (self.killed and k > self.fail_at)):
                raise Interrupted(f"interrupted at call {k} ({real.__name__})")
            return real(*args, **kwargs)
        return step


def _which(folder, old, new):
    """'old' or 'new': which complete save the folder reads as (fails on anything else)."""
    _, _, tensors = read_interventions(folder)
    for label, want in (("old", old), ("new", new)):
        if set(tensors) == set(want) and all(torch.equal(tensors[k], want[k]) for k in want):
            return label
    raise AssertionError(f"{folder} holds neither the old nor the new save")


def _count_steps(folder, model, *, over_a_save):
    """How many patched calls one save makes (into an empty folder, or over an earlier save)."""
    if over_a_save:
        save_interventions(model, folder)
    with pytest.MonkeyPatch.context() as mp:
        steps = _Steps(mp)
        save_interventions(model, folder)
    return steps.calls


@pytest.mark.parametrize("killed", [False, True], ids=["exception", "killed"])
def test_interrupted_save_leaves_old_or_new_save(tmp_path, killed):
    old_model, new_model = _model(0.25), _model(-0.5)
    old, new = _state(old_model), _state(new_model)
    n_steps = _count_steps(tmp_path / "count", new_model, over_a_save=True)
    assert n_steps >= 4  # the save does go through the patched calls
    seen = []
    for k in range(n_steps):
        folder = tmp_path / f"k{k}"
        save_interventions(old_model, folder)
        for name, data in OTHER_FILES.items():
            (folder / name).write_bytes(data)
        with pytest.MonkeyPatch.context() as mp:
            _Steps(mp, fail_at=k, killed=killed)
            with pytest.raises(Interrupted):
                save_interventions(new_model, folder)
        seen.append(_which(folder, old, new))
        # the next save finishes or removes what the interrupted one left
        save_interventions(new_model, folder)
        assert sorted(os.listdir(folder)) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, *OTHER_FILES]), k
        assert _which(folder, old, new) == "new"
        for name, data in OTHER_FILES.items():
            assert (folder / name).read_bytes() == data
    # the interruptions fell before and after the commit (the config's rename)
    assert seen[0] == "old" and seen[-1] == "new", seen


@pytest.mark.parametrize("killed", [False, True], ids=["exception", "killed"])
def test_interrupted_first_save_leaves_nothing_or_the_new_save(tmp_path, killed):
    model = _model(0.75)
    state = _state(model)
    n_steps = _count_steps(tmp_path / "count", model, over_a_save=False)
    for k in range(n_steps):
        folder = tmp_path / f"k{k}"
        with pytest.MonkeyPatch.context() as mp:
            _Steps(mp, fail_at=k, killed=killed)
            with pytest.raises(Interrupted):
                save_interventions(model, folder)
        try:
            assert _which(folder, state, state) in ("old", "new")
        except ValueError as exc:  # no complete save yet: said so, as for an empty folder
            assert "no saved interventions" in str(exc), exc
        save_interventions(model, folder)
        assert sorted(os.listdir(folder)) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]), k


def test_saved_files_get_the_mode_of_an_ordinary_file(tmp_path):
    """Files are written through a temporary file (``mkstemp`` makes 0o600); the saved ones get
    what ``open()`` would give under the current umask."""
    import os
    import stat

    from reft_kernels.hf import io

    old = os.umask(0o022)
    try:
        io._atomic_write(str(tmp_path / "f.bin"), b"abc")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f.bin").st_mode) == 0o644
    assert (tmp_path / "f.bin").read_bytes() == b"abc"

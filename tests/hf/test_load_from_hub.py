"""``load_interventions`` with a Hub repository id, offline: a saved folder is laid out in a
``huggingface_hub`` cache built here (``models--owner--name/{refs,snapshots,blobs}``), the hub
library pointed at it with offline mode on, and the loaded model compared with the saved one."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from reft_kernels.hf import ReftConfig, get_reft_model, load_interventions, save_interventions

from ._attach_common import randomize_
from ._models import padded_batch, tiny_model

hub_constants = pytest.importorskip("huggingface_hub.constants")

REPO = "someone/tiny-reft"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD = "fedcba9876543210fedcba9876543210fedcba98"


def _cache_snapshot(cache, folder, commit, ref=None):
    """Put ``folder``'s files into ``cache`` as the snapshot ``commit`` of ``REPO`` (blobs by name,
    the snapshot's files linked to them, as huggingface_hub lays them out)."""
    repo = cache / ("models--" + REPO.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in os.listdir(folder):
        blob = repo / "blobs" / f"{commit[:8]}-{name}"
        shutil.copyfile(folder / name, blob)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


def _saved(tmp_path, name, layers, seed):
    model = tiny_model("llama", dtype=torch.float64)
    get_reft_model(model, ReftConfig(layers=layers, rank=4, positions="f2+l2", backend="torch"), verbose=False)
    randomize_(model.reft_interventions, seed=seed)
    save_interventions(model, tmp_path / name)
    return model


def _logits(model):
    ids, mask = padded_batch((6, 4), 6, "right")
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_repository_id_loads_from_the_cache(tmp_path, offline_cache):
    main = _saved(tmp_path, "main", [0, 1], seed=1)
    old = _saved(tmp_path, "old", [2], seed=2)
    _cache_snapshot(offline_cache, tmp_path / "main", COMMIT, ref="main")
    _cache_snapshot(offline_cache, tmp_path / "old", OLD)
    got = load_interventions(tiny_model("llama", dtype=torch.float64), REPO)
    torch.testing.assert_close(_logits(got), _logits(main), rtol=0, atol=0)
    at_old = load_interventions(tiny_model("llama", dtype=torch.float64), REPO, revision=OLD)
    assert [k for k, _, _ in at_old.reft.sites[0]] == ["layer2"]
    torch.testing.assert_close(_logits(at_old), _logits(old), rtol=0, atol=0)


def test_missing_repository_raises_value_error_offline(offline_cache):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="someone/absent.*not a local folder.*could not be fetched"):
        load_interventions(model, "someone/absent")
    assert getattr(model, "reft", None) is None


def test_local_folder_wins_over_a_repository_id(tmp_path, offline_cache, monkeypatch):
    saved = _saved(tmp_path, "owner/name", [1], seed=3)
    monkeypatch.chdir(tmp_path)
    got = load_interventions(tiny_model("llama", dtype=torch.float64), "owner/name")
    torch.testing.assert_close(_logits(got), _logits(saved), rtol=0, atol=0)
    with pytest.raises(ValueError, match="revision applies to a Hub repository id"):
        load_interventions(tiny_model("llama"), "owner/name", revision="main")
    with pytest.raises(TypeError, match="revision must be None or a string"):
        load_interventions(tiny_model("llama"), "owner/name", revision=3)

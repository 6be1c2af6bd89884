"""``get_reft_model(..., modules_to_save=[...])``: named base modules (a classification head) train
beside the interventions, are saved and loaded with them (checksummed), and ``remove()`` restores
their values and ``requires_grad``.

References: clones of the parameters taken before attaching and after training, the parameter
names of the named module as the model lists them, and a fresh model of the same seed.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from reft_kernels.hf import REDConfig, ReftConfig, get_reft_model, load_interventions, save_interventions

from ._models import padded_batch, tiny_model

CONFIGS = {"red": REDConfig(layers="all"), "loreft": ReftConfig(layers="all", rank=4, positions="f1+l1")}
PREFIX = "reft_interventions."


def _batch():
    ids, mask = padded_batch([6, 4, 5], 6, "right", seed=2)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1])}


def _params(model, prefix=""):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(prefix)}


def _train(model, steps=5):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(**_batch()).loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_classifier_trains_saves_and_loads(arch, method, tmp_path):
    model = tiny_model(arch)
    head = {f"classifier.{n}" for n, _ in model.classifier.named_parameters()}
    base_before = _params(model)
    get_reft_model(model, CONFIGS[method], verbose=False, modules_to_save=["classifier"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == head | {n for n, _ in model.named_parameters() if n.startswith(PREFIX)}
    _train(model)
    after = _params(model)
    assert all(not torch.equal(after[n], base_before[n]) for n in head), "the head did not train"
    assert all(torch.equal(after[n], base_before[n]) for n in base_before if n not in head)

    save_interventions(model, tmp_path)
    saved = load_file(os.path.join(tmp_path, "interventions.safetensors"))
    assert {k for k in saved if not k[0].isdigit()} == {f"modules_to_save.{n}" for n in head}
    assert json.loads((tmp_path / "reft_config.json").read_text())["modules_to_save"] == ["classifier"]

    fresh = tiny_model(arch)
    load_interventions(fresh, tmp_path)
    assert fresh.reft.modules_to_save == ("classifier",)
    assert all(torch.equal(p, after[n]) for n, p in _params(fresh).items())
    with torch.no_grad():
        assert torch.equal(fresh(**_batch()).logits, model(**_batch()).logits)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == trainable


def test_remove_restores_values_and_requires_grad():
    model = tiny_model("roberta")
    model.classifier.dense.weight.requires_grad_(False)  # a mixed state, to see each flag restored
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = _params(model)
    get_reft_model(model, CONFIGS["red"], verbose=False, modules_to_save=["classifier"])
    assert model.classifier.dense.weight.requires_grad
    _train(model)
    assert not torch.equal(model.classifier.out_proj.weight, before["classifier.out_proj.weight"])
    model.reft.remove()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(p, before[n]) for n, p in _params(model).items())


def test_suffix_match_and_nested_modules():
    """An entry matches the full name or its last dotted parts; a module inside another one that is
    saved is covered by it."""
    model = tiny_model("roberta")
    get_reft_model(model, CONFIGS["red"], verbose=False, modules_to_save=["classifier", "out_proj"])
    assert [n for n, _ in model.reft.extra_modules] == ["classifier"]
    model.reft.remove()
    get_reft_model(model, CONFIGS["red"], verbose=False, modules_to_save=["roberta.embeddings.word_embeddings"])
    assert [n for n, _ in model.reft.extra_modules] == ["roberta.embeddings.word_embeddings"]


@pytest.mark.parametrize("value,exc,match", [
    ("classifier", TypeError, "modules_to_save must be None or a list"),
    (["nothing_like_this"], ValueError, "modules_to_save: no module of the model is named 'nothing_like_this'"),
    (["dropout"], ValueError, "has no parameters to train"),
    (["classifier", "classifier"], ValueError, "more than once"),
    ([3], ValueError, "modules_to_save entries must be module names"),
])
def test_bad_modules_to_save(value, exc, match):
    model = tiny_model("bert")
    before = _params(model)
    with pytest.raises(exc, match=match):
        get_reft_model(model, CONFIGS["red"], verbose=False, modules_to_save=value)
    assert not hasattr(model, "reft") and not hasattr(model, "reft_interventions")
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in _params(model).items())


def test_load_checks_the_modules_and_their_checksum(tmp_path):
    model = tiny_model("bert")
    get_reft_model(model, CONFIGS["red"], verbose=False, modules_to_save=["classifier"])
    _train(model, steps=2)
    save_interventions(model, tmp_path)

    other = tiny_model("bert")
    get_reft_model(other, CONFIGS["red"], verbose=False)  # attached without the head
    with pytest.raises(ValueError, match="modules_to_save="):
        load_interventions(other, tmp_path)

    path = tmp_path / "interventions.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x55  # a flipped byte in the last tensor's data
    path.write_bytes(bytes(blob))
    fresh = tiny_model("bert")
    before = _params(fresh)
    with pytest.raises(ValueError, match="checksum"):
        load_interventions(fresh, tmp_path)
    assert not hasattr(fresh, "reft")
    assert all(torch.equal(p, before[n]) for n, p in _params(fresh).items())


def test_folder_without_modules_to_save_key_loads(tmp_path):
    """A folder written before modules_to_save existed (no such key in its config) still loads."""
    model = tiny_model("bert")
    get_reft_model(model, CONFIGS["red"], verbose=False)
    save_interventions(model, tmp_path)
    meta = json.loads((tmp_path / "reft_config.json").read_text())
    del meta["modules_to_save"]
    (tmp_path / "reft_config.json").write_text(json.dumps(meta))
    fresh = tiny_model("bert")
    load_interventions(fresh, tmp_path)
    assert fresh.reft.modules_to_save == ()

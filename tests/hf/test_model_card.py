"""The model card (README.md) of a saved intervention folder: what it says (base model, type,
method, layers, positions, rank, the library's version), that a re-save replaces it, that a card
already there keeps its text, and that loading ignores it."""
from __future__ import annotations

import torch

import reft_kernels
from reft_kernels.hf import REDConfig, ReftConfig, get_reft_model, load_interventions, save_interventions
from reft_kernels.hf.model_card import BEGIN, END

from ._attach_common import randomize_
from ._models import padded_batch, tiny_model


def _attached(configs, name="org/tiny-llama"):
    model = tiny_model("llama", dtype=torch.float64)
    model.config._name_or_path = name
    get_reft_model(model, configs, verbose=False)
    randomize_(model.reft_interventions)
    return model


def _card(folder):
    return (folder / "README.md").read_text()


def test_card_describes_the_interventions(tmp_path):
    model = _attached([ReftConfig(layers=[0, 2], rank=4, positions="f2+l3", share_weights=False, method="direft",
                                  component="mlp_output"),
                       REDConfig(layers=[1])])
    save_interventions(model, tmp_path)
    card = _card(tmp_path)
    assert card.startswith("---\nbase_model: org/tiny-llama\nlibrary_name: reft_kernels\ntags:\n- red\n- reft\n---\n")
    assert f"reft_kernels {reft_kernels.__version__}" in card
    assert "- model type: llama" in card and "- hidden size: 32" in card
    assert "| ReFT (direft) | mlp_output | 0, 2 | f2+l3 (first and last: separate weights) | 4 |" in card
    assert "| RED | MLP output | 1 | every token | - |" in card
    assert 'AutoModel.from_pretrained("org/tiny-llama")' in card
    assert card.count(BEGIN) == 1 and card.count(END) == 1


def test_card_names_t5_stacks_and_unknown_base(tmp_path):
    model = tiny_model("t5")
    get_reft_model(model, ReftConfig(layers=[1], rank=2, positions="l1"), verbose=False)
    save_interventions(model, tmp_path)
    card = _card(tmp_path)
    assert "| ReFT (loreft) | block_output | 1 (decoder and encoder) | l1 | 2 |" in card
    assert "- base model: unknown" in card and "base_model:" not in card


def test_resave_replaces_the_card_and_keeps_other_text(tmp_path):
    model = _attached([ReftConfig(layers=[0], rank=4, positions="l1")])
    (tmp_path / "README.md").write_text("# My adapter\n\nNotes written by hand.\n")
    save_interventions(model, tmp_path)
    first = _card(tmp_path)
    assert first.startswith("# My adapter\n\nNotes written by hand.\n\n" + BEGIN)
    model.reft.remove()
    other = _attached([ReftConfig(layers=[1], rank=2, positions="f1+l1")])
    save_interventions(other, tmp_path)
    second = _card(tmp_path)
    assert second.startswith("# My adapter\n\nNotes written by hand.\n\n" + BEGIN)
    assert second.count(BEGIN) == 1 and "| ReFT (loreft) | block_output | 1 | f1+l1 | 2 |" in second
    assert "| 0 | l1 | 4 |" not in second


def test_save_pretrained_writes_the_card_and_loading_ignores_it(tmp_path):
    model = _attached([ReftConfig(layers=[0, 1], rank=4, positions="f2+l2")])
    model.save_pretrained(tmp_path)
    assert "| ReFT (loreft) | block_output | 0, 1 | f2+l2 | 4 |" in _card(tmp_path)
    (tmp_path / "README.md").write_text("not a card at all {")
    ids, mask = padded_batch((6, 4), 6, "right")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = load_interventions(tiny_model("llama", dtype=torch.float64), tmp_path)(input_ids=ids,
                                                                                      attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)

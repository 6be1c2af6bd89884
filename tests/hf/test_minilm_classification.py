"""End to end on the real all-MiniLM-L6-v2 (a BERT): sequence classification with LoReFT and the
new head in ``modules_to_save``, as in the ReFT paper's GLUE setting. A few steps learn a tiny
task (does the sentence name an animal?), the adapter is saved with ``save_pretrained`` (what the
Trainer's ``save_model`` calls), and a fresh model loaded from the files with ``from_pretrained``
+ ``load_interventions`` has the same logits and accuracy.

References: the labels of held-out sentences, and the trained model's own logits.
"""
from __future__ import annotations

import os

import torch

from reft_kernels.hf import ReftConfig, get_reft_model, load_interventions

from ._minilm import folder_or_skip
from ._models import transformers

ANIMALS = "cat dog horse bird fish cow sheep mouse lion tiger".split()
THINGS = "car table book chair phone lamp house road cup door".split()
PLACES = ["in the garden", "near the river", "on the hill", "by the window", "in the city"]


def _data():
    """(train, test): 'the <animal> is <place>' (1) and 'the <thing> is <place>' (0); every
    fourth (word, place) pair held out."""
    train, test = [], []
    for i, (animal, thing) in enumerate(zip(ANIMALS, THINGS)):
        for j, place in enumerate(PLACES):
            rows = [(f"the {animal} is {place}", 1), (f"the {thing} is {place}", 0)]
            (test if (i + j) % 4 == 0 else train).extend(rows)
    return train, test


def _batch(tokenizer, rows):
    out = tokenizer([text for text, _ in rows], padding=True, return_tensors="pt")
    out["labels"] = torch.tensor([label for _, label in rows])
    return out


def _logits_and_accuracy(model, tokenizer, rows):
    batch = _batch(tokenizer, rows)
    with torch.no_grad():
        logits = model(**batch).logits
    return logits, (logits.argmax(-1) == batch["labels"]).float().mean().item()


def test_minilm_classification_trains_saves_and_reloads(tmp_path):
    path = folder_or_skip()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    head = {n: p.detach().clone() for n, p in model.classifier.named_parameters()}
    get_reft_model(model, ReftConfig(method="loreft", layers="all", rank=4, positions="f1+l1"),
                   modules_to_save=["classifier"], verbose=False)
    train, test = _data()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(12):
        rows = [train[i] for i in torch.randperm(len(train), generator=g)[:8].tolist()]
        loss = model(**_batch(tokenizer, rows)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    logits, accuracy = _logits_and_accuracy(model, tokenizer, test)
    assert accuracy >= 0.9, f"held-out accuracy {accuracy} after training"
    assert all(not torch.equal(p, head[n]) for n, p in model.classifier.named_parameters())

    model.save_pretrained(tmp_path)
    assert os.path.getsize(tmp_path / "interventions.safetensors") < 256 * 1024  # not the 90 MB base
    fresh = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    untrained, _ = _logits_and_accuracy(fresh, tokenizer, test)
    load_interventions(fresh, tmp_path)
    again, same = _logits_and_accuracy(fresh, tokenizer, test)
    assert same == accuracy and torch.equal(again, logits)
    assert not torch.allclose(untrained, logits, atol=1e-3)

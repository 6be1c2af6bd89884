"""ReftDataCollator against a per-example construction written here: token layout, label masking,
padding on either side, truncation, and locations that follow the prompt."""
from __future__ import annotations

import pytest
import torch

from reft_kernels.hf import ReftDataCollator, intervention_locations

PAD, BOS, EOS = 0, 1, 2


class WordTokenizer:
    """A whitespace tokenizer with a growing vocabulary: "w" -> an id >= 3; BOS is prepended when
    ``add_special_tokens`` (as LLaMA's tokenizer does)."""

    pad_token_id, eos_token_id = PAD, EOS

    def __init__(self, padding_side="right"):
        self.padding_side = padding_side
        self.vocab = {}

    def __call__(self, text, add_special_tokens=True):
        ids = [self.vocab.setdefault(w, 3 + len(self.vocab)) for w in text.split()]
        return {"input_ids": ([BOS] if add_special_tokens else []) + ids}


EXAMPLES = [("a b c d e f", "x y"), {"prompt": "g h", "response": "z"}, ("i j k l m n o p q", "w v u t")]


def _expected(tok, examples, side, positions, share, add_eos=True, max_length=None):
    """The batch built one example at a time."""
    rows = []
    for ex in examples:
        p, r = (ex["prompt"], ex["response"]) if isinstance(ex, dict) else ex
        pi = tok(p)["input_ids"]
        ri = tok(r, add_special_tokens=False)["input_ids"] + ([EOS] if add_eos else [])
        if max_length is not None:
            pi = pi[:max_length]
            ri = ri[: max_length - len(pi)]
        rows.append((pi + ri, len(pi)))
    width = max(len(ids) for ids, _ in rows)
    ids_t, mask_t, lab_t, plen = [], [], [], []
    for ids, n in rows:
        padn = width - len(ids)
        lab = [-100] * n + ids[n:]
        if side == "left":
            ids_t.append([PAD] * padn + ids)
            mask_t.append([0] * padn + [1] * len(ids))
            lab_t.append([-100] * padn + lab)
        else:
            ids_t.append(ids + [PAD] * padn)
            mask_t.append([1] * len(ids) + [0] * padn)
            lab_t.append(lab + [-100] * padn)
        plen.append(n)
    mask = torch.tensor(mask_t)
    loc = intervention_locations(mask, positions, torch.tensor(plen), share_weights=share)
    return torch.tensor(ids_t), mask, torch.tensor(lab_t), loc


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("positions, share", [("f2+l2", True), ("f2+l3", False), ("l1", True), ("all", True)])
def test_collator_matches_per_example_construction(side, positions, share):
    tok = WordTokenizer(padding_side=side)
    batch = ReftDataCollator(tok, positions, share_weights=share)(EXAMPLES)
    ids, mask, labels, loc = _expected(tok, EXAMPLES, side, positions, share)
    assert torch.equal(batch["input_ids"], ids)
    assert torch.equal(batch["attention_mask"], mask)
    assert torch.equal(batch["labels"], labels)
    assert torch.equal(batch["intervention_locations"], loc)


def test_locations_stay_inside_the_prompt_and_include_its_last_token():
    tok = WordTokenizer()
    batch = ReftDataCollator(tok, "f1+l1", padding_side="left")(EXAMPLES)
    for b in range(len(EXAMPLES)):
        prompt_cols = (batch["labels"][b] == -100) & (batch["attention_mask"][b] == 1)
        last_prompt = int(prompt_cols.nonzero().max())
        first_prompt = int(prompt_cols.nonzero().min())
        assert batch["intervention_locations"][b].tolist() == [first_prompt, last_prompt]


def test_truncation_and_no_eos():
    tok = WordTokenizer()
    batch = ReftDataCollator(tok, "f2+l2", max_length=6, add_eos=False)(EXAMPLES)
    ids, mask, labels, loc = _expected(tok, EXAMPLES, "right", "f2+l2", True, add_eos=False, max_length=6)
    assert batch["input_ids"].shape[1] == 6
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["labels"], labels)
    assert torch.equal(batch["intervention_locations"], loc)


def test_collator_errors():
    tok = WordTokenizer()
    with pytest.raises(ValueError, match="positions must be"):
        ReftDataCollator(tok, "first7")
    with pytest.raises(ValueError, match="max_length"):
        ReftDataCollator(tok, max_length=0)
    with pytest.raises(ValueError, match="padding_side"):
        ReftDataCollator(tok, padding_side="middle")
    col = ReftDataCollator(tok)
    with pytest.raises(ValueError, match="'prompt' and 'response'"):
        col([{"text": "a"}])
    with pytest.raises(TypeError, match="pair or a dict"):
        col(["just a prompt"])
    with pytest.raises(ValueError, match="empty"):
        col([])
    tok.pad_token_id = tok.eos_token_id = None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS"):
        ReftDataCollator(tok)

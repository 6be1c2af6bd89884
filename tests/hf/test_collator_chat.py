"""ReftDataCollator on chat examples: a real tokenizer (``_models.tiny_tokenizer``) with a small
jinja chat template set here; the expected token ids are written out from the template by hand
(roles as the vocabulary words "how"/"who"/"what", each turn closed by ``</s>``)."""
from __future__ import annotations

import pytest
import torch

from reft_kernels.hf import ReftDataCollator, intervention_locations

from ._models import WORDS, tiny_tokenizer

BOS, EOS, PAD = 1, 2, 0
TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
            "{% if m['role'] == 'user' %}who {% elif m['role'] == 'assistant' %}what {% else %}how {% endif %}"
            "{{ m['content'] }} {{ eos_token }} {% endfor %}{% if add_generation_prompt %}what {% endif %}")


def ids(text):
    return [4 + WORDS.index(w) for w in text.split()]


def chat_tokenizer(side="right"):
    tok = tiny_tokenizer(side)
    tok.chat_template = TEMPLATE
    return tok


CHATS = [
    {"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "a dog runs"}]},
    [{"role": "system", "content": "is good"}, {"role": "user", "content": "red sky"},
     {"role": "assistant", "content": "blue"}, {"role": "user", "content": "and the sun"},
     {"role": "assistant", "content": "is hot"}],
]
# (prompt ids, response ids) per chat, from the template by hand
EXPECTED = [
    ([BOS] + ids("who the cat") + [EOS] + ids("what"), ids("a dog runs") + [EOS]),
    ([BOS] + ids("how is good") + [EOS] + ids("who red sky") + [EOS] + ids("what blue") + [EOS]
     + ids("who and the sun") + [EOS] + ids("what"), ids("is hot") + [EOS]),
]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
def test_chat_batch_matches_hand_written_layout(side, share):
    tok = chat_tokenizer(side)
    batch = ReftDataCollator(tok, "f2+l2", share_weights=share)(CHATS)
    width = max(len(p) + len(r) for p, r in EXPECTED)
    want_ids = torch.full((2, width), PAD)
    want_labels = torch.full((2, width), -100)
    want_mask = torch.zeros(2, width, dtype=torch.long)
    for b, (p, r) in enumerate(EXPECTED):
        n = len(p) + len(r)
        start = width - n if side == "left" else 0
        want_ids[b, start:start + n] = torch.tensor(p + r)
        want_labels[b, start + len(p):start + n] = torch.tensor(r)
        want_mask[b, start:start + n] = 1
    assert torch.equal(batch["input_ids"], want_ids)
    assert torch.equal(batch["labels"], want_labels)
    assert torch.equal(batch["attention_mask"], want_mask)
    prompts = torch.tensor([len(p) for p, _ in EXPECTED])
    assert torch.equal(batch["intervention_locations"],
                       intervention_locations(want_mask, "f2+l2", prompts, share_weights=share))


def test_chat_and_pairs_mix_in_one_batch():
    tok = chat_tokenizer()
    batch = ReftDataCollator(tok, "l1", add_eos=False)([CHATS[0], ("the dog", "runs")])
    row = batch["input_ids"][1][batch["attention_mask"][1] == 1].tolist()
    assert row == [BOS] + ids("the dog runs")  # a pair: BOS from the tokenizer, no EOS asked
    chat = batch["input_ids"][0][batch["attention_mask"][0] == 1].tolist()
    assert chat == EXPECTED[0][0] + EXPECTED[0][1]  # the template's own end-of-turn token


def test_add_eos_appends_when_the_template_ends_otherwise():
    tok = chat_tokenizer()
    tok.chat_template = TEMPLATE.replace(" {{ eos_token }} ", " ")
    batch = ReftDataCollator(tok, "l1")([CHATS[0]])
    assert batch["input_ids"][0].tolist() == [BOS] + ids("who the cat what a dog runs") + [EOS]
    assert batch["labels"][0].tolist() == [-100] * 5 + ids("a dog runs") + [EOS]


@pytest.mark.parametrize("bad,err,match", [
    ([{"role": "user", "content": "the cat"}], ValueError, "must be the assistant's"),
    ([{"role": "assistant", "content": "the cat"}], ValueError, "at least one message before"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
     ValueError, "must be the assistant's"),
    ([{"role": "user"}, {"role": "assistant", "content": "b"}], ValueError, "needs a string 'role' and a 'content'"),
])
def test_bad_conversations_are_refused(bad, err, match):
    with pytest.raises(err, match=match):
        ReftDataCollator(chat_tokenizer(), "l1")([{"messages": bad}])


def test_messages_must_be_a_list_of_messages():
    with pytest.raises(TypeError, match="messages must be a non-empty list"):
        ReftDataCollator(chat_tokenizer(), "l1")([{"messages": "the cat"}])


def test_tokenizer_without_template_is_refused():
    with pytest.raises(ValueError, match="chat template"):
        ReftDataCollator(tiny_tokenizer(), "l1")([CHATS[0]])


def test_template_whose_prompt_is_not_a_prefix_is_refused():
    tok = chat_tokenizer()
    tok.chat_template = ("{% if add_generation_prompt %}what {% endif %}"
                         "{% for m in messages %}{{ m['content'] }} {% endfor %}")
    with pytest.raises(ValueError, match="cannot be told apart"):
        ReftDataCollator(tok, "l1")([CHATS[0]])

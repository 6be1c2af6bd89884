"""``ReftDataCollator``: (prompt, response) pairs -> a padded training batch with intervention
locations, for a plain loop or ``transformers.Trainer(data_collator=...)``."""
from __future__ import annotations

import torch

from .chat import is_messages, render_chat
from .positions import intervention_locations, parse_positions


class ReftDataCollator:
    """Builds ``input_ids``, ``attention_mask``, ``labels`` (-100 on the prompt and the padding) and
    ``intervention_locations`` (the config's positions within each prompt) from examples.

    Args:
        tokenizer: a Hugging Face tokenizer (anything with ``__call__(text, add_special_tokens=)``
            returning ``{"input_ids": [...]}``, ``pad_token_id``, ``eos_token_id`` and
            ``padding_side``).
        positions, share_weights: as in the ``ReftConfig`` the model was built with.
        max_length: truncate each example to this many tokens (the response first, then the
            prompt's end); None keeps everything.
        add_eos: append the EOS token to each response (so the model learns to stop).
        padding_side: "left" or "right"; None takes the tokenizer's.

    Each example is a ``(prompt, response)`` pair or a dict with ``"prompt"`` and ``"response"``.
    The prompt is tokenized with the tokenizer's special tokens (BOS), the response without; the
    prompt length is the prompt's token count, so ``l{k}`` ends at the final prompt token (the
    ReFT paper's convention; pyreft's bundled datasets stop one token earlier).

    An example may also be a chat: a dict ``{"messages": [{"role": "user", "content": ...}, ...,
    {"role": "assistant", "content": ...}]}`` or the list of messages itself. The tokenizer's chat
    template renders it (``reft_kernels.hf.chat``): the prompt is every message before the last,
    which must be the assistant's, rendered with ``add_generation_prompt=True``; the response is
    the assistant's turn as the template writes it (its end-of-turn text included). Both are
    tokenized without added special tokens (the template writes its own); ``add_eos`` appends
    EOS only where the response does not already end with it.

    With ``transformers.Trainer``, examples as ``(prompt, response)`` tuples work with default
    arguments; dict examples need ``TrainingArguments(remove_unused_columns=False)``, whatever the
    dataset type: by default the Trainer drops the keys that the model's forward does not name
    (``prompt``, ``response``, ``messages``) before the collator sees them.
    """

    def __init__(self, tokenizer, positions: str = "f7+l7", *, share_weights: bool = True, max_length=None,
                 add_eos: bool = True, padding_side=None, label_pad_id: int = -100):
        parse_positions(positions)
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be None or a positive int, got {max_length!r}")
        side = padding_side or getattr(tokenizer, "padding_side", "right")
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        self.tokenizer, self.positions, self.share_weights = tokenizer, positions, share_weights
        self.max_length, self.add_eos, self.padding_side = max_length, add_eos, side
        self.pad_id, self.label_pad_id = pad, label_pad_id

    def _pair(self, ex):
        """(prompt, response, whether the prompt gets the tokenizer's special tokens)."""
        if isinstance(ex, dict) and "messages" in ex:
            return (*render_chat(self.tokenizer, ex["messages"]), False)
        if is_messages(ex):
            return (*render_chat(self.tokenizer, ex), False)
        if isinstance(ex, dict):
            if "prompt" not in ex or "response" not in ex:
                hint = ("; with transformers.Trainer, pass TrainingArguments(remove_unused_columns=False) "
                        "(by default it drops the keys the model's forward does not name) or give "
                        "(prompt, response) tuples") if not ex else ""
                raise ValueError(f"an example dict needs 'prompt' and 'response' keys (or 'messages'), got "
                                 f"{sorted(ex)}{hint}")
            return ex["prompt"], ex["response"], True
        if isinstance(ex, (tuple, list)) and len(ex) == 2:
            return ex[0], ex[1], True
        raise TypeError(f"an example must be a (prompt, response) pair or a dict, or a list of chat messages, "
                        f"got {type(ex).__name__}")

    def encode(self, prompt: str, response: str, add_special_tokens: bool = True):
        """(token ids, prompt length) of one example, truncated to ``max_length``; the prompt gets
        the tokenizer's special tokens (BOS) when ``add_special_tokens``."""
        p = list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        r = list(self.tokenizer(response, add_special_tokens=False)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if self.add_eos and eos is not None and (add_special_tokens or not r or r[-1] != eos):
            r.append(eos)
        if self.max_length is not None:
            p = p[: self.max_length]
            r = r[: self.max_length - len(p)]
        return p + r, len(p)

    def __call__(self, examples):
        if not examples:
            raise ValueError("ReftDataCollator got an empty list of examples")
        encoded = [self.encode(*self._pair(ex)) for ex in examples]
        width = max(len(ids) for ids, _ in encoded)
        bsz = len(encoded)
        input_ids = torch.full((bsz, width), self.pad_id, dtype=torch.long)
        labels = torch.full((bsz, width), self.label_pad_id, dtype=torch.long)
        mask = torch.zeros((bsz, width), dtype=torch.long)
        prompt_lengths = torch.empty(bsz, dtype=torch.long)
        for b, (ids, n_prompt) in enumerate(encoded):
            start = width - len(ids) if self.padding_side == "left" else 0
            span = slice(start, start + len(ids))
            input_ids[b, span] = torch.tensor(ids, dtype=torch.long)
            mask[b, span] = 1
            labels[b, start + n_prompt: start + len(ids)] = torch.tensor(ids[n_prompt:], dtype=torch.long)
            prompt_lengths[b] = n_prompt
        locations = intervention_locations(mask, self.positions, prompt_lengths, share_weights=self.share_weights)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                "intervention_locations": locations}

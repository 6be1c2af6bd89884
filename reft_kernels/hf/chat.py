"""Chat examples for ``ReftDataCollator``: a conversation (a list of ``{"role", "content"}``
messages) rendered with the tokenizer's chat template into a (prompt, response) pair of texts.

The response is the last message, which must be the assistant's; the prompt is everything
before it, rendered with ``add_generation_prompt=True`` (so it ends where the assistant's turn
starts, as at generation). The response text is what the whole conversation's rendering adds
after the prompt's (the assistant's content and the template's end-of-turn text). The texts carry
the template's own special tokens, so they are tokenized without adding any.
"""
from __future__ import annotations


def is_messages(value) -> bool:
    """Whether ``value`` is a list of chat messages (dicts with a "role")."""
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(m, dict) and "role" in m for m in value))


def check_messages(messages) -> list:
    if not is_messages(messages):
        raise TypeError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"message {i} needs a string 'role' and a 'content', got keys {sorted(m)}")
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last message of a training conversation must be the assistant's (the response); "
                         f"got role {messages[-1]['role']!r}")
    if len(messages) < 2:
        raise ValueError("a training conversation needs at least one message before the assistant's response")
    return list(messages)


def render_chat(tokenizer, messages) -> tuple:
    """(prompt text, response text) of a conversation; ValueError when the tokenizer has no chat
    template or the template does not render the prompt as a prefix of the conversation."""
    messages = check_messages(messages)
    if not getattr(tokenizer, "chat_template", None) or not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise ValueError("chat examples need a tokenizer with a chat template (tokenizer.chat_template); "
                         "set one or give (prompt, response) pairs")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if not isinstance(prompt, str) or not isinstance(full, str) or not full.startswith(prompt):
        raise ValueError("the tokenizer's chat template does not render the conversation as its prompt (with "
                         "add_generation_prompt=True) followed by the assistant's turn, so the response cannot "
                         "be told apart; give (prompt, response) pairs instead")
    return prompt, full[len(prompt):]

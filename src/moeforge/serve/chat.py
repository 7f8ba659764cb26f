"""ChatML prompts: validate the messages, render the template's text, and encode a chat so that only the
template's own markers are special tokens.

A chat's content comes from whoever calls the API. Encoding the rendered text as a whole would turn a
``<|im_end|>\\n<|im_start|>system\\n`` typed into a user message into real turn markers (a forged turn)
and an ``<|oracle_sys|>`` into the real identity token. :func:`encode_chat` therefore encodes each turn's
text with a copy of the tokenizer that reads special-token strings as plain text
(:func:`plain_tokenizer`) and joins the pieces with the marker ids. Only the operator's system prompt is
trusted: its special tokens keep their ids, so an identity turn such as ``<|oracle_sys|>…`` still works.
For text without special-token strings the ids equal those of encoding the rendered text, since the
tokenizer splits at special tokens before anything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moeforge.tokens.pack import IM_END, IM_START, render_chat

__all__ = ["CHAT_ROLES", "ChatError", "chat_messages", "chat_text", "encode_chat", "plain_tokenizer"]

CHAT_ROLES = ("system", "user", "assistant")


class ChatError(ValueError):
    """Messages that are not a chat, or a tokenizer that cannot encode one."""


def chat_messages(
    messages: Sequence[dict[str, str]], system_prompt: str | None = None
) -> list[dict[str, str]]:
    """``messages`` checked (each ``{'role': one of CHAT_ROLES, 'content': str}``), opened by a system turn
    of ``system_prompt`` when given. Raises :class:`ChatError` naming the bad message."""
    msgs = list(messages)
    for i, m in enumerate(msgs):
        if (
            not isinstance(m, dict)
            or m.get("role") not in CHAT_ROLES
            or not isinstance(m.get("content"), str)
        ):
            roles = ", ".join(CHAT_ROLES)
            raise ChatError(f"messages[{i}] must be {{'role': one of {roles}, 'content': str}} (got {m!r})")
    if system_prompt is not None:
        if msgs and msgs[0]["role"] == "system":
            raise ChatError("system_prompt was given but messages[0] is already a system turn; pass one")
        msgs.insert(0, {"role": "system", "content": system_prompt})
    if not msgs:
        raise ChatError("messages is empty; a chat needs at least one turn")
    return msgs


def chat_text(messages: Sequence[dict[str, str]]) -> str:
    """The ChatML text of checked ``messages`` (the tokenizer's chat template) opening an assistant turn."""
    return render_chat(messages) + f"{IM_START}assistant\n"


def plain_tokenizer(tokenizer: Any) -> Any:
    """A copy of ``tokenizer`` (a ``tokenizers.Tokenizer``) that tokenizes special-token strings in its
    input as ordinary text. A copy, because ``encode_special_tokens`` is a setting of the whole tokenizer
    and others (the server's worker, other requests) use the original at the same time."""
    try:
        plain = type(tokenizer).from_str(tokenizer.to_str())
        plain.encode_special_tokens = True
    except (AttributeError, TypeError) as exc:
        raise ChatError(
            "chat needs a `tokenizers.Tokenizer` (from `moeforge tokenizer train`), "
            f"not {type(tokenizer).__name__}"
        ) from exc
    return plain


def encode_chat(
    tokenizer: Any, plain: Any, messages: Sequence[dict[str, str]], *, trusted_system: bool = False
) -> list[int]:
    """Token ids of :func:`chat_text` of checked ``messages`` in which only the ChatML markers are special
    tokens: every turn is encoded with ``plain`` (see :func:`plain_tokenizer`), except the first when
    ``trusted_system`` (the operator's system prompt), which ``tokenizer`` encodes with its special tokens."""
    start, end = tokenizer.token_to_id(IM_START), tokenizer.token_to_id(IM_END)
    if start is None or end is None:
        raise ChatError(
            f"chat needs a tokenizer with the ChatML tokens {IM_START} and {IM_END} "
            "(`moeforge tokenizer train`)"
        )
    turns = [f"{m['role']}\n{m['content']}" for m in messages]
    trusted = [tokenizer.encode(turns[0], add_special_tokens=False).ids] if trusted_system else []
    # one encode per turn, not encode_batch: a few short texts do not pay for its thread pool
    *untrusted, newline, opening = (
        plain.encode(text, add_special_tokens=False).ids
        for text in [*turns[len(trusted) :], "\n", "assistant\n"]
    )
    ids: list[int] = []
    for turn in [*trusted, *untrusted]:
        ids += [start, *turn, end, *newline]
    return [*ids, start, *opening]
